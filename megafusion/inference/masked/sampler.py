"""MaskedSampler: generation for the masked-diffusion family (objective.kind = masked_diffusion) by iterative
unmasking. Owns the prompt layout, the generation loop and its settings (MaskedGenerationConfig); how many positions
each step reveals, and which, is megafusion.inference.masked.scheduler's.

    sampler = MaskedSampler(model, vocab)                  # a MultimodalModel in eval mode, its UnifiedVocab
    prompt = MaskedPrompt(ids=vocab.document("image_text", [(TEXT, caption_ids)]), spans=[(IMAGE, 256)], seed=0)
    results = sampler.generate([prompt], MaskedGenerationConfig(cfg_scale=2.0))
    results[0].spans[0].codes                              # the image's codebook entries

Layout: a prompt is a list of unified ids (task token, BOS_t text EOS_t, ...) followed by its target spans, each
laid out as BOS_m, n x MASK_m, EOS_m; one prompt is one document, so one bidirectional block (discrete_batch), of
its own row. Spans are generated one after another, each over its modality's steps and schedule; a text span with
`block_length` is split into blocks unmasked left to right, each over its share of the steps (LLaDA's
semi-autoregressive sampling). Later spans and blocks stay MASK while earlier ones are generated. Text spans may
sample EOS_text (`text_eos`): the span's ids end before the first one. Image and audio spans take exactly n codes.

Every step runs the whole sequence: the model is bidirectional within a document, so a revealed token changes
every position's hidden states and there is no KV cache to reuse. One step = one forward of all active rows.

Classifier-free guidance (cfg_scale = s, 1 = off, no unconditional rows): the unconditional branch is the same
row with the prompt's content (every position before the first span except task tokens) replaced by MASK of its
modality (LLaDA). Both branches run in one forward of 2b rows and are combined in log-softmax space,
log p = log p_u + s (log p_c - log p_u) (s = LLaDA's cfg_scale + 1); that equals combining raw logits up to a
per-position constant, which the restricted softmax of the step removes.

Batching: rows are padded to the longest row of the call (or `seq_length`); documents never see padding, and each
prompt samples with its own torch.Generator seeded from its seed, on the CPU, with draws that depend only on its own
state, so a prompt gives the same tokens alone or in any batch, and temperature 0 is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megafusion.discrete.batch import discrete_batch
from megafusion.discrete.vocab import MODALITY_NAMES, TEXT, UnifiedVocab
from megafusion.inference.masked.scheduler import ORDERS, UnmaskingScheduler
from megafusion.objectives.masked_diffusion import SCHEDULES


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class MaskedGenerationConfig:
    text_steps: int = 32
    text_schedule: str = "linear"
    text_exponent: float = 1.0
    image_steps: int = 12
    image_schedule: str = "cosine"
    image_exponent: float = 1.0
    audio_steps: int = 16
    audio_schedule: str = "linear"
    audio_exponent: float = 1.0
    """Steps (model calls) per span of each modality and its unmasking schedule (polynomial: t^exponent)."""
    block_length: int = 0
    """Text spans are unmasked in blocks of this many positions, left to right (0 = the whole span at once)."""
    order: str = "confidence"
    """confidence: reveal the most probable candidates first (low-confidence remasking); random."""
    temperature: float = 0.0
    """0 = greedy (argmax) candidates; > 0 samples them from softmax(logits / temperature)."""
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    """log p = log p_uncond + s (log p_cond - log p_uncond); 1 = no guidance (no unconditional rows)."""
    text_eos: bool = True
    """Text spans may sample EOS_text, which ends the span's text."""
    seq_length: Optional[int] = None
    """Pad every row to this length (None = the longest row of the call)."""

    def __post_init__(self):
        for m in MODALITY_NAMES:
            steps, schedule, exponent = self.span_settings(MODALITY_NAMES.index(m))
            _check(steps >= 1, f"{m}_steps={steps} must be >= 1")
            _check(schedule in SCHEDULES, f"{m}_schedule={schedule!r} is not one of {list(SCHEDULES)}")
            _check(exponent > 0, f"{m}_exponent={exponent} must be > 0")
        _check(self.block_length >= 0, f"block_length={self.block_length} must be >= 0 (0 = one block)")
        _check(self.order in ORDERS, f"order={self.order!r} is not one of {list(ORDERS)}")
        _check(self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        _check(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)")
        _check(0.0 < self.top_p <= 1.0, f"top_p={self.top_p} must be in (0, 1]")
        _check(self.cfg_scale >= 0, f"cfg_scale={self.cfg_scale} must be >= 0 (1 = no guidance)")
        _check(self.seq_length is None or self.seq_length >= 1, f"seq_length={self.seq_length} must be >= 1")

    def span_settings(self, modality: int) -> Tuple[int, str, float]:
        name = MODALITY_NAMES[modality]
        return (getattr(self, f"{name}_steps"), getattr(self, f"{name}_schedule"), getattr(self, f"{name}_exponent"))

    @classmethod
    def from_objective(cls, md_cfg, **overrides) -> "MaskedGenerationConfig":
        """Settings whose schedules are the training run's (objective.masked_diffusion.<m>_schedule)."""
        fields = {}
        for name in MODALITY_NAMES:
            sched = getattr(md_cfg, f"{name}_schedule")
            fields.update({f"{name}_schedule": sched.kind, f"{name}_exponent": sched.exponent})
        fields.update(overrides)
        return cls(**fields)


@dataclass
class MaskedPrompt:
    ids: Sequence[int]
    """Unified ids of the prompt, e.g. task token, BOS_text, text ids, EOS_text."""
    spans: Sequence[Tuple[int, int]]
    """Target spans (modality, length), generated in this order after the prompt."""
    seed: int = 0


@dataclass
class SpanResult:
    modality: int
    ids: List[int]
    """Generated unified ids (text: those before the first EOS_text)."""
    codes: List[int]
    """The same as the modality's own ids: text tokenizer ids, or codebook entries of image / audio."""


@dataclass
class UnmaskEvent:
    call: int  # model call (0, 1, ...) of this prompt
    span: int
    block: int
    step: int  # step within the block
    positions: List[int]  # row positions revealed


@dataclass
class MaskedGenerationResult:
    spans: List[SpanResult]
    tokens: List[int]
    """The final row: prompt, then every span as BOS_m ids EOS_m (text spans keep their sampled EOS ids)."""
    trace: List[UnmaskEvent] = field(default_factory=list)


def layout_row(prompt: MaskedPrompt, vocab: UnifiedVocab) -> Tuple[np.ndarray, List[Tuple[int, int]]]:
    """The prompt's row before the first step, and [start, end) of every span's MASK positions."""
    ids = np.asarray(prompt.ids, dtype=np.int64).reshape(-1)
    _check(ids.size == 0 or (ids.min() >= 0 and ids.max() < vocab.size),
           f"prompt ids must lie in [0, {vocab.size}) (the unified vocabulary)")
    _check(not bool(vocab.is_mask(ids).any()), "prompt ids contain MASK ids; ask for target spans instead")
    _check(len(prompt.spans) > 0, "a prompt needs at least one target span (modality, length)")
    pieces, ranges, pos = [ids], [], ids.size
    for modality, length in prompt.spans:
        _check(modality in range(len(MODALITY_NAMES)), f"span modality {modality} is not TEXT, IMAGE or AUDIO")
        _check(vocab.content_sizes[modality] > 0, f"this vocabulary has no {MODALITY_NAMES[modality]} ids")
        _check(int(length) >= 1, f"span length {length} must be >= 1")
        pieces.append(np.array([vocab.bos(modality)] + [vocab.mask(modality)] * int(length) + [vocab.eos(modality)]))
        ranges.append((pos + 1, pos + 1 + int(length)))
        pos += int(length) + 2
    return np.concatenate(pieces).astype(np.int64), ranges


def unconditional_prompt(ids: Sequence[int], vocab: UnifiedVocab) -> np.ndarray:
    """The prompt with every position but task tokens replaced by MASK of its modality (the CFG branch)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    masks = np.array([vocab.mask(m) for m in range(len(MODALITY_NAMES))], dtype=np.int64)
    is_task = ids >= vocab.task(vocab.tasks[0])
    return np.where(is_task, ids, masks[vocab.modality_of(ids)])


def guide(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Guided log-probabilities log p_u + s (log p_c - log p_u) over the last dimension."""
    cond, uncond = torch.log_softmax(cond_logits.float(), -1), torch.log_softmax(uncond_logits.float(), -1)
    return uncond + scale * (cond - uncond)


def guidance_active(scale: float) -> bool:
    return scale != 1.0


@dataclass
class _Phase:  # one block of one span
    span: int
    block: int
    positions: torch.Tensor
    modality: int
    steps: int
    schedule: str
    exponent: float


class _Sample:
    def __init__(self, prompt: MaskedPrompt, vocab: UnifiedVocab, config: MaskedGenerationConfig):
        row, self.ranges = layout_row(prompt, vocab)
        self.tokens = torch.from_numpy(row)
        self.prompt_len = len(prompt.ids)
        self.uncond_prefix = torch.from_numpy(unconditional_prompt(prompt.ids, vocab))
        self.spans = list(prompt.spans)
        self.generator = torch.Generator().manual_seed(int(prompt.seed))
        self.trace: List[UnmaskEvent] = []
        self.phases: List[_Phase] = []
        for s, ((modality, length), (start, end)) in enumerate(zip(self.spans, self.ranges)):
            steps, schedule, exponent = config.span_settings(modality)
            size = config.block_length if modality == TEXT and config.block_length else length
            bounds = list(range(start, end, size))
            base, extra = divmod(steps, len(bounds))
            for b, lo in enumerate(bounds):
                self.phases.append(_Phase(s, b, torch.arange(lo, min(lo + size, end)), modality,
                                          max(1, base + (b < extra)), schedule, exponent))
        self.phase_index = -1
        self.scheduler = UnmaskingScheduler()
        self._next_phase()

    def _next_phase(self):
        self.phase_index += 1
        if not self.done:
            p = self.phase
            self.scheduler.set_timesteps(p.steps, p.positions.numel(), p.schedule, p.exponent)

    @property
    def phase(self) -> _Phase:
        return self.phases[self.phase_index]

    @property
    def done(self) -> bool:
        return self.phase_index >= len(self.phases)

    def uncond_row(self) -> torch.Tensor:
        return torch.cat([self.uncond_prefix, self.tokens[self.prompt_len:]])


class MaskedSampler:
    def __init__(self, model, vocab: UnifiedVocab, device=None, code_ranges: Optional[Dict[int, Callable]] = None):
        """`code_ranges`: per modality, position j of a span -> [lo, hi) of the codes allowed there (a tokenizer's
        `code_range`, e.g. Encodec's frame-major layout ties position j to residual codebook j % n_q); without one
        every position may take any of its modality's codes."""
        self.model, self.vocab = model, vocab
        self.code_ranges = dict(code_ranges or {})
        if device is None:
            params = getattr(model, "parameters", None)
            device = next(iter(params()), torch.zeros(0)).device if params else torch.device("cpu")
        self.device = torch.device(device)
        self.patch_dim = int(getattr(getattr(model, "config", None), "patch_dim", 1))

    @torch.no_grad()
    def forward(self, rows: Sequence[Sequence[int]], seq_length: Optional[int] = None) -> torch.Tensor:
        """One forward of `rows` (each one document) -> logits [s, len(rows), vocab.size] fp32 on the model's
        device (gathered over tensor-parallel ranks, the padding of the vocabulary cut off)."""
        from megafusion.inference.runners import full_vocab_logits

        rows = [np.asarray(r, dtype=np.int64) for r in rows]
        seq_length = seq_length or max(len(r) for r in rows)
        batch = discrete_batch([[r] for r in rows], seq_length, self.vocab, self.patch_dim).to(self.device)
        return full_vocab_logits(self.model(batch).logits)[..., : self.vocab.size]

    def generate(self, prompts: Sequence[MaskedPrompt], config: MaskedGenerationConfig) -> List[MaskedGenerationResult]:
        vocab = self.vocab
        samples = [_Sample(p, vocab, config) for p in prompts]
        longest = max((len(s.tokens) for s in samples), default=0)
        _check(config.seq_length is None or longest <= config.seq_length,
               f"a prompt and its spans need {longest} positions, more than seq_length={config.seq_length}")
        seq_length = config.seq_length or longest
        guided = guidance_active(config.cfg_scale)
        allowed = {m: vocab.allowed_ids(m, with_eos=(m == TEXT and config.text_eos)) for m in range(3)}
        call = 0
        while True:
            active = [s for s in samples if not s.done]
            if not active:
                break
            rows = [s.tokens for s in active] + ([s.uncond_row() for s in active] if guided else [])
            logits = self.forward(rows, seq_length)  # [s, rows, V]
            for j, sample in enumerate(active):
                phase = sample.phase
                masked = phase.positions[sample.tokens[phase.positions] == vocab.mask(phase.modality)]
                at = masked.to(logits.device)
                scores = logits[at, j]
                if guided:
                    scores = guide(scores, logits[at, len(active) + j], config.cfg_scale)
                if phase.modality in self.code_ranges:
                    scores = self._restrict(scores, masked - sample.ranges[phase.span][0], phase.modality)
                step = sample.scheduler.step_index
                out = sample.scheduler.step(scores, masked, sample.tokens, sample.generator, config.order,
                                            config.temperature, config.top_k, config.top_p, allowed[phase.modality])
                sample.tokens = out.tokens
                sample.trace.append(UnmaskEvent(call, phase.span, phase.block, step, out.revealed.tolist()))
                if sample.scheduler.done:
                    sample._next_phase()
            call += 1
        return [self._result(s) for s in samples]

    def _restrict(self, scores: torch.Tensor, offsets: torch.Tensor, modality: int) -> torch.Tensor:
        """-inf outside each position's code range (offsets: positions within the span)."""
        start = self.vocab.content_range(modality)[0]
        columns = torch.arange(scores.shape[-1], device=scores.device)
        bounds = torch.tensor([self.code_ranges[modality](int(j)) for j in offsets.tolist()],
                              dtype=torch.long, device=scores.device).view(-1, 2) + start
        inside = (columns >= bounds[:, :1]) & (columns < bounds[:, 1:])
        return scores.masked_fill(~inside, float("-inf"))

    def _result(self, sample: _Sample) -> MaskedGenerationResult:
        vocab, spans = self.vocab, []
        for (modality, _), (start, end) in zip(sample.spans, sample.ranges):
            ids = sample.tokens[start:end].tolist()
            if modality == TEXT and vocab.eos(TEXT) in ids:
                ids = ids[: ids.index(vocab.eos(TEXT))]
            spans.append(SpanResult(modality, ids, vocab.ids_to_codes(modality, ids).tolist()))
        return MaskedGenerationResult(spans=spans, tokens=sample.tokens.tolist(), trace=sample.trace)


def generate_masked(model, vocab: UnifiedVocab, prompts: Sequence[MaskedPrompt],
                    config: Optional[MaskedGenerationConfig] = None) -> List[MaskedGenerationResult]:
    """MaskedSampler(model, vocab).generate(prompts, config or MaskedGenerationConfig())."""
    return MaskedSampler(model, vocab).generate(prompts, config or MaskedGenerationConfig())
