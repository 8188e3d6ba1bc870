"""Engine.generate: interleaved text and image generation for a batch of prompts.

    engine = Engine(model, vocab_size=V, context_length=S)            # model: a MultimodalModel in eval mode
    results = engine.generate([Prompt(parts=[token_ids, patches, ...], seed=0)], GenerationConfig(...))

A prompt is BOS followed by its parts in order: text token ids, and media items (an image, or a video's frames:
patches [frames, patches_per_frame, patch_dim] of clean latents), each laid out as BOI blocks.. EOI as in training
(docs/DATA_FORMAT.md). Generation then alternates two modes per row:

  text   sample the next token from the last logits (megafusion.inference.sampling) and append it; stop on EOS,
         after `max_new_tokens` sampled tokens, or when the context is full. Sampling BOI (or `force_image`
         right after the prompt) switches the row to
  image  for each frame: draw N(0, I) latents with the row's generator, integrate them from t = 0 to t = 1 with
         the scheduler (megafusion.inference.scheduler) under classifier-free guidance (conditional and
         unconditional rows in one batched forward; the unconditional rows see only the frames of the item so far,
         the rule training's condition dropout uses), then append the finished frame to the sequence as
         conditioning; after the last frame append EOI and go back to text.

How a finished image conditions what follows depends on how the checkpoint was trained (`conditioning`):
"transfusion" appends it as a noised block at t = 1 (what later text saw in training: its image, with the
cleaner-half noise of the captioning rule); "bagel" appends a clean block after the positions of the hidden noised
copy (BAGEL's clean copy under hide_noised_latents). Rows of a batch proceed independently: a row's tokens and
noise come only from its own generator (seeded per prompt), so a prompt generates the same alone or batched; rows
that reach an image together denoise together, the others wait. The model runs through a CachedRunner (KV cache)
or, as the test reference, a RecomputeRunner (megafusion/inference/runners.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from megafusion.data.special_tokens import SPECIAL_TOKENS, SpecialTokens
from megafusion.inference.runners import CachedRunner, RecomputeRunner, Segment
from megafusion.inference.sampling import banned_ids, sample_token
from megafusion.inference.scheduler import FlowMatchScheduler
from megafusion.inference.settings import GenerationConfig

CONDITIONINGS = ("transfusion", "bagel")


class PromptTooLongError(ValueError):
    """A prompt (plus a forced image) does not fit in the model's context."""


@dataclass
class Prompt:
    parts: List[Union[Sequence[int], torch.Tensor]]
    """Text token ids, or one media item's clean latent patches [frames, patches_per_frame, patch_dim]."""
    seed: int = 0
    """Seed of this prompt's generator (text sampling and image noise)."""
    id: str = ""
    """Name used in errors and outputs."""
    force_image: Optional[bool] = None
    """Start an image right after the prompt (None = GenerationConfig.force_image)."""
    frames: Optional[int] = None
    """Frames of each generated image (None = GenerationConfig.frames)."""


@dataclass
class GenerationResult:
    id: str
    seed: int
    tokens: List[int]
    """Everything appended after the prompt: sampled tokens, BOI, EOI (a stopping EOS is not appended)."""
    media: List[torch.Tensor]
    """One [frames, patches_per_frame, patch_dim] tensor of clean latent patches per generated image or video."""
    pieces: List[Tuple[str, object]]
    """The output in order: ("text", [token ids]) and ("media", index into `media`)."""
    stop_reason: str
    """eos | length (max_new_tokens) | context (the model's context is full)."""
    prompt_length: int
    """Positions the prompt took (BOS, text, images)."""


@dataclass
class _Row:
    prompt: Prompt
    generator: torch.Generator
    frames: int
    logits: Optional[torch.Tensor] = None
    tokens: List[int] = field(default_factory=list)
    media: List[torch.Tensor] = field(default_factory=list)
    pieces: List[Tuple[str, object]] = field(default_factory=list)
    sampled: int = 0
    pending_image: bool = False
    stop_reason: Optional[str] = None

    def add_text(self, token: int) -> None:
        self.tokens.append(token)
        if self.pieces and self.pieces[-1][0] == "text":
            self.pieces[-1][1].append(token)
        else:
            self.pieces.append(("text", [token]))


class Engine:
    def __init__(self, model, *, vocab_size: int, context_length: int, conditioning: str = "transfusion",
                 special: SpecialTokens = SPECIAL_TOKENS, use_cache: bool = True,
                 device: Optional[torch.device] = None):
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning={conditioning!r} is not one of {list(CONDITIONINGS)}")
        config = model.config
        if conditioning == "bagel" and not config.hide_noised_latents:
            raise ValueError("conditioning='bagel' needs a model trained with model.hide_noised_latents=true (the "
                             "noised copy of an image is invisible to later positions)")
        self.model, self.special, self.use_cache = model, special, use_cache
        self.vocab_size, self.context_length, self.conditioning = vocab_size, context_length, conditioning
        self.device = device if device is not None else next(model.parameters()).device
        self.patch_dim = config.patch_dim
        self.patches_per_frame = (config.latent_size // config.patch_size) ** 2

    # ------------------------------------------------------------------ layout of images in the sequence
    def _frame_positions(self) -> int:
        return self.patches_per_frame * (2 if self.conditioning == "bagel" else 1)

    def image_positions(self, frames: int) -> int:
        """Positions one generated item takes after its BOI: its frames and EOI."""
        return frames * self._frame_positions() + 1

    def _conditioning_block(self, patches: torch.Tensor) -> List[Segment]:
        """How a finished (or given) frame conditions later positions (see the module docstring)."""
        if self.conditioning == "bagel":
            return [Segment(latents=patches, t=1.0, noised=True, hidden=True), Segment(latents=patches, noised=False)]
        return [Segment(latents=patches, t=1.0, noised=True)]

    def _prompt_segments(self, prompt: Prompt, force_image: bool) -> List[Segment]:
        s = self.special
        segments = [Segment(tokens=[s.bos])]
        for i, part in enumerate(prompt.parts):
            if isinstance(part, torch.Tensor) and part.is_floating_point():
                if part.dim() != 3 or tuple(part.shape[1:]) != (self.patches_per_frame, self.patch_dim):
                    raise ValueError(f"prompt {prompt.id!r} part {i}: media patches have shape {tuple(part.shape)}, "
                                     f"the model expects [frames, {self.patches_per_frame}, {self.patch_dim}]")
                segments.append(Segment(tokens=[s.boi]))
                for frame in part:
                    segments += self._conditioning_block(frame.float())
                segments.append(Segment(tokens=[s.eoi]))
            else:
                ids = [int(x) for x in part]
                bad = [x for x in ids if not 0 <= x < self.vocab_size]
                if bad:
                    raise ValueError(f"prompt {prompt.id!r} part {i}: token ids {bad[:5]} outside the vocabulary "
                                     f"[0, {self.vocab_size})")
                if ids:
                    segments.append(Segment(tokens=ids))
        if force_image:
            segments.append(Segment(tokens=[s.boi]))
        return segments

    # ------------------------------------------------------------------ the loop
    def validate(self, prompts: List[Prompt], settings: GenerationConfig) -> None:
        """Raise the error generate() would raise for a bad prompt (lengths, shapes, ids), computing nothing."""
        self._prepare(prompts, settings)

    def _prepare(self, prompts: List[Prompt], settings: GenerationConfig):
        rows, segments = [], []
        for p in prompts:
            force = settings.force_image if p.force_image is None else p.force_image
            row = _Row(p, torch.Generator().manual_seed(int(p.seed)), p.frames or settings.frames)
            segs = self._prompt_segments(p, force)
            length = sum(len(seg) for seg in segs)
            need = length + (self.image_positions(row.frames) if force else 0)
            if need > self.context_length:
                extra = f" (+ {self.image_positions(row.frames)} for the forced image)" if force else ""
                raise PromptTooLongError(f"prompt {p.id!r} needs {length} positions{extra} but the model's context "
                                         f"is {self.context_length} (data.seq_length of the checkpoint)")
            row.pending_image = force
            if force:
                row.tokens.append(self.special.boi)
            rows.append(row)
            segments.append(segs)
        return rows, segments

    def generate(self, prompts: List[Prompt], settings: GenerationConfig,
                 on_model_call: Optional[Callable[[str], None]] = None) -> List[GenerationResult]:
        """Generate for a batch of prompts (see the module docstring); `on_model_call(kind)` is called after every
        model forward (kind: prefill | decode | denoise), e.g. to drive a progress bar."""
        if not prompts:
            return []
        rows, segments = self._prepare(prompts, settings)
        runner_cls = CachedRunner if self.use_cache else RecomputeRunner
        banned = banned_ids(self.vocab_size, settings.allow_images, self.special)
        with torch.inference_mode():  # no autograd bookkeeping at all: a decode step is mostly per-op overhead
            runner = runner_cls(self.model, len(rows), self.context_length, self.device)
            logits = runner.prefill(segments)
            prompt_lengths = list(runner.positions)
            self._notify(on_model_call, "prefill")
            for row, lg in zip(rows, logits):
                row.logits = lg
            while True:
                waiting = [i for i, row in enumerate(rows) if row.pending_image and row.stop_reason is None]
                if waiting:
                    for frames in sorted({rows[i].frames for i in waiting}):
                        self._media(runner, rows, [i for i in waiting if rows[i].frames == frames], frames, settings,
                                    on_model_call)
                    continue
                if not self._text_step(runner, rows, settings, banned):
                    break
                self._notify(on_model_call, "decode")
        return [GenerationResult(id=row.prompt.id, seed=int(row.prompt.seed), tokens=row.tokens, media=row.media,
                                 pieces=row.pieces, stop_reason=row.stop_reason or "length", prompt_length=n)
                for row, n in zip(rows, prompt_lengths)]

    @staticmethod
    def _notify(callback, kind: str) -> None:
        if callback is not None:
            callback(kind)

    def _text_step(self, runner, rows: List[_Row], settings: GenerationConfig, banned: torch.Tensor) -> bool:
        """Sample one token for every running row and run them; False when no row is running any more."""
        s = self.special
        tokens, appended = [], []
        for i, row in enumerate(rows):
            token, keep = s.pad, False
            if row.stop_reason is None:
                if row.sampled >= settings.max_new_tokens:
                    row.stop_reason = "length"
                else:
                    token = sample_token(row.logits, settings, banned, row.generator)
                    row.sampled += 1
                    room = self.context_length - runner.positions[i]
                    if token == s.eos:
                        row.stop_reason = "eos"
                    elif room < 1 or (token == s.boi and room < 1 + self.image_positions(row.frames)):
                        row.stop_reason = "context"
                    else:
                        keep = True
                        if token == s.boi:
                            row.tokens.append(token)
                            row.pending_image = True
                        else:
                            row.add_text(token)
            tokens.append(token if keep else s.pad)
            appended.append(keep)
        if not any(appended):
            return False
        logits = runner.decode(tokens, appended)
        for row, keep, lg in zip(rows, appended, logits):
            if keep:
                row.logits = lg
        return True

    def _media(self, runner, rows: List[_Row], which: List[int], frames: int, settings: GenerationConfig,
               on_model_call) -> None:
        """Generate one image / video for rows `which` (all waiting after a BOI, all with `frames` frames)."""
        guided_any = settings.cfg_scale != 1.0 and settings.cfg_interval[0] <= settings.cfg_interval[1]
        phase = runner.media(which, guided_any, frames)
        scheduler = FlowMatchScheduler(settings.solver, settings.timestep_shift)
        done: List[List[torch.Tensor]] = [[] for _ in which]
        logits = None
        for f in range(frames):
            noise = [torch.randn(self.patches_per_frame, self.patch_dim, generator=rows[i].generator) for i in which]
            x = torch.stack(noise).to(self.device)
            scheduler.set_timesteps(settings.steps)
            for t in scheduler.timesteps:
                guided = settings.guided(t)
                v_cond, v_uncond = phase.velocity(x, t, guided)
                v = v_cond if v_uncond is None else v_uncond + settings.cfg_scale * (v_cond - v_uncond)
                x = scheduler.step(v, t, x)
                self._notify(on_model_call, "denoise")
            last = f == frames - 1
            for k in range(len(which)):
                done[k].append(x[k].detach().float().cpu())
            frame = [self._conditioning_block(x[k]) + ([Segment(tokens=[self.special.eoi])] if last else [])
                     for k in range(len(which))]
            uncond = [self._conditioning_block(x[k]) for k in range(len(which))] if guided_any and not last else None
            logits = phase.commit(frame, uncond, eoi=last)
        phase.close()
        for k, i in enumerate(which):
            row = rows[i]
            row.media.append(torch.stack(done[k]))
            row.pieces.append(("media", len(row.media) - 1))
            row.tokens.append(self.special.eoi)
            row.logits = logits[k]
            row.pending_image = False
