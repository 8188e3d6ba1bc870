"""How the generation engine runs the model: with a KV cache (CachedRunner) or by recomputing every sequence from
its first position at every call (RecomputeRunner, the reference the cached path is tested against).

Both take the same requests from megafusion.inference.engine, each a list of Segments per row:

    prefill(rows)                  the prompts, committed; -> logits of each row's last position
    decode(tokens, active)         one token per row (inactive rows run a dummy, nothing committed); -> logits
    media(rows, guided) -> phase   one image / video of those rows:
        phase.velocity(x, t, guided)   velocity of the block being denoised: conditional, and unconditional when
                                       guided (the unconditional rows see only the item's earlier frames)
        phase.commit(x, last)          append the finished frame (and EOI after the last); -> EOI's logits
        phase.close()

Positions: a row's positions are numbered from its first prompt token; a Segment marked `hidden` (the noised copy
of a BAGEL-style image, which no later position may see) takes positions but is never run by the cached runner.
The unconditional branch numbers the positions of its media item from 0 (RoPE is relative, so this equals any
offset). Logits come back over the full vocabulary (gathered over tensor-parallel ranks), in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from megafusion.data.batch import MODALITY_IMAGE, MODALITY_TEXT, Batch
from megafusion.data.special_tokens import SPECIAL_TOKENS
from megafusion.inference.kv_cache import CacheGroup, InferenceStep, KVCache


@dataclass
class Segment:
    """Positions appended to one row: text tokens, or one visual block (an image or a video frame)."""

    tokens: Optional[List[int]] = None
    latents: Optional[torch.Tensor] = None  # [patches, patch_dim]: z_t while denoising, z1 when committed
    t: float = 1.0  # flow time of the block (its timestep embedding is added where `noised`)
    noised: bool = True  # False: a clean conditioning block (no timestep embedding)
    hidden: bool = False  # takes positions but is invisible to every later position (hide_noised_latents)

    def __len__(self) -> int:
        return len(self.tokens) if self.tokens is not None else int(self.latents.shape[0])


def build_batch(rows: Sequence[Sequence[Segment]], patch_dim: int, device, pad_id: int = SPECIAL_TOKENS.pad
                ) -> Tuple[Batch, List[int]]:
    """One Batch of the rows' segments laid end to end (one document per row, right padding) and the number of
    positions of each row."""
    lengths = [sum(len(seg) for seg in segs) for segs in rows]
    b, s = len(rows), max(max(lengths), 1)
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    modality = torch.full((b, s), MODALITY_TEXT, dtype=torch.long)
    block_ids = torch.full((b, s), -1, dtype=torch.long)
    noised = torch.zeros((b, s), dtype=torch.bool)
    document_ids = torch.full((b, s), -1, dtype=torch.long)
    latents, latent_t = [], []
    for r, segs in enumerate(rows):
        pos, block = 0, 0
        document_ids[r, : lengths[r]] = 0
        for seg in segs:
            n = len(seg)
            if seg.tokens is not None:
                tokens[r, pos:pos + n] = torch.as_tensor(seg.tokens, dtype=torch.long)
            else:
                modality[r, pos:pos + n] = MODALITY_IMAGE
                block_ids[r, pos:pos + n] = block
                noised[r, pos:pos + n] = seg.noised
                latents.append(seg.latents.float())
                latent_t.append(torch.full((n,), float(seg.t) if seg.noised else 1.0))
                block += 1
            pos += n
    lat = torch.cat(latents) if latents else torch.zeros(0, patch_dim)
    t = torch.cat(latent_t) if latent_t else torch.zeros(0)
    zeros = torch.zeros((b, s), dtype=torch.long)
    batch = Batch(tokens=tokens, labels=zeros, loss_mask=zeros.float(), modality=modality, block_ids=block_ids,
                  document_ids=document_ids, context_start=zeros, noised=noised, latents=lat, noisy_latents=lat,
                  latent_t=t)
    return batch.to(device), lengths


def full_vocab_logits(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [..., V/tp] -> [..., V] fp32 (all-gathered over the tensor-parallel group)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits.float()


def _last_block(velocity: torch.Tensor, batch: Batch, n: int) -> torch.Tensor:
    """Velocity rows of each row's last n latent positions -> [b, n, patch_dim]."""
    counts = batch.image_positions.sum(1).tolist()
    ends = torch.tensor(counts).cumsum(0).tolist()
    return torch.stack([velocity[end - n:end] for end in ends])


class _Base:
    def __init__(self, model, num_rows: int, capacity: int, device):
        self.model, self.device = model, device
        config = model.config
        self.patch_dim = config.patch_dim
        self.patches_per_frame = (config.latent_size // config.patch_size) ** 2
        self.num_rows, self.capacity = num_rows, capacity
        self.positions = [0] * num_rows  # next position of each row


# ---------------------------------------------------------------------------------------------- cached
class CachedRunner(_Base):
    def __init__(self, model, num_rows: int, capacity: int, device):
        super().__init__(model, num_rows, capacity, device)
        self.cache = KVCache(num_rows, capacity + 1, device)  # + 1: a finished row's dummy decode slot

    def _run(self, groups: List[CacheGroup], rows: List[List[Segment]], starts: List[int], want_logits: bool,
             commit: bool):
        """Forward the non-hidden segments of `rows`, positions numbered from `starts` (hidden ones skipped)."""
        visible, positions = [], []
        for segs, start in zip(rows, starts):
            pos, keep, row_pos = start, [], []
            for seg in segs:
                if not seg.hidden:
                    keep.append(seg)
                    row_pos.extend(range(pos, pos + len(seg)))
                pos += len(seg)
            visible.append(keep)
            positions.append(row_pos)
        batch, lengths = build_batch(visible, self.patch_dim, self.device)
        width = batch.seq_length
        pos = torch.tensor([p + [p[-1] if p else 0] * (width - len(p)) for p in positions], dtype=torch.long)
        advance = torch.tensor(lengths if commit else [0] * len(lengths), dtype=torch.long)
        last = torch.tensor([max(n - 1, 0) for n in lengths], dtype=torch.long) if want_logits else None
        step = InferenceStep(groups=groups, positions=pos, advance=advance, logit_positions=last)
        out = self.model(batch, inference_context=step)
        if commit:
            step.commit()
        logits = full_vocab_logits(out.logits[0]) if want_logits else None  # [b, V]
        return logits, out.velocity, batch

    def prefill(self, rows: List[List[Segment]]) -> torch.Tensor:
        logits, _, _ = self._run([CacheGroup(self.cache, 0, self.num_rows)], rows, [0] * self.num_rows, True, True)
        self.positions = [sum(len(s) for s in segs) for segs in rows]
        return logits

    def decode(self, tokens: List[int], active: List[bool]) -> torch.Tensor:
        batch, _ = build_batch([[Segment(tokens=[tok])] for tok in tokens], self.patch_dim, self.device)
        group = CacheGroup(self.cache, 0, self.num_rows)
        pos = torch.tensor(self.positions, dtype=torch.long).view(-1, 1)
        advance = torch.tensor([1 if a else 0 for a in active], dtype=torch.long)
        step = InferenceStep(groups=[group], positions=pos, advance=advance,
                             logit_positions=torch.zeros(self.num_rows, dtype=torch.long))
        out = self.model(batch, inference_context=step)
        step.commit()
        self.positions = [p + int(a) for p, a in zip(self.positions, active)]
        return full_vocab_logits(out.logits[0])

    def media(self, rows: List[int], guided: bool, frames: int) -> "_CachedMedia":
        return _CachedMedia(self, rows, guided, frames)


class _CachedMedia:
    def __init__(self, runner: CachedRunner, rows: List[int], guided: bool, frames: int):
        self.runner, self.rows = runner, list(rows)
        everyone = self.rows == list(range(runner.num_rows))
        self.cache = runner.cache if everyone else runner.cache.subset(self.rows)
        self.uncond = KVCache(len(rows), frames * runner.patches_per_frame + 1, runner.device) if guided else None
        self.uncond_position = 0

    def _starts(self) -> List[int]:
        return [self.runner.positions[r] for r in self.rows]

    def velocity(self, x: torch.Tensor, t: float, guided: bool):
        """x [R, patches, patch_dim] -> (v_cond, v_uncond or None), each [R, patches, patch_dim]."""
        r, n = x.shape[0], x.shape[1]
        seg = [[Segment(latents=x[i], t=t)] for i in range(r)]
        groups = [CacheGroup(self.cache, 0, r)]
        starts = self._starts()
        if guided:
            groups.append(CacheGroup(self.uncond, r, 2 * r))
            seg = seg + seg
            starts = starts + [self.uncond_position] * r
        _, velocity, _ = self.runner._run(groups, seg, starts, want_logits=False, commit=False)
        v = velocity.view(len(seg), n, -1)
        return (v[:r], v[r:]) if guided else (v, None)

    def commit(self, frame: List[List[Segment]], uncond_frame: Optional[List[List[Segment]]], eoi: bool):
        """Append `frame` (per row: [hidden copy?] + clean block [+ EOI]) to the conditional rows, and
        `uncond_frame` to the unconditional ones when given; -> logits at EOI (when `eoi`)."""
        r = len(self.rows)
        starts = self._starts()
        logits, _, _ = self.runner._run([CacheGroup(self.cache, 0, r)], frame, starts, want_logits=eoi, commit=True)
        for i, row in enumerate(self.rows):
            self.runner.positions[row] += sum(len(s) for s in frame[i])
        if uncond_frame is not None and self.uncond is not None:
            self.runner._run([CacheGroup(self.uncond, 0, r)], uncond_frame, [self.uncond_position] * r,
                             want_logits=False, commit=True)
            self.uncond_position += sum(len(s) for s in uncond_frame[0])
        return logits

    def close(self) -> None:
        if self.cache is not self.runner.cache:
            self.runner.cache.merge(self.cache, self.rows)


# ---------------------------------------------------------------------------------------------- recompute
class RecomputeRunner(_Base):
    """Runs every request as one plain forward of each row's whole sequence (no cache, positions 0..s-1)."""

    def __init__(self, model, num_rows: int, capacity: int, device):
        super().__init__(model, num_rows, capacity, device)
        self.history: List[List[Segment]] = [[] for _ in range(num_rows)]

    def _forward(self, histories: List[List[Segment]], new: List[List[Segment]]):
        rows = [h + n for h, n in zip(histories, new)]
        batch, lengths = build_batch(rows, self.patch_dim, self.device)
        out = self.model(batch)
        last = torch.tensor([n - 1 for n in lengths])
        logits = full_vocab_logits(out.logits[last, torch.arange(len(rows))])  # [b, V]
        return logits, out.velocity, batch

    def prefill(self, rows: List[List[Segment]]) -> torch.Tensor:
        self.history = [list(r) for r in rows]
        self.positions = [sum(len(s) for s in r) for r in rows]
        logits, _, _ = self._forward([[] for _ in rows], rows)
        return logits

    def decode(self, tokens: List[int], active: List[bool]) -> torch.Tensor:
        new = [[Segment(tokens=[tok])] for tok in tokens]
        logits, _, _ = self._forward(self.history, new)
        for r, a in enumerate(active):
            if a:
                self.history[r] = self.history[r] + new[r]
                self.positions[r] += 1
        return logits

    def media(self, rows: List[int], guided: bool, frames: int) -> "_RecomputeMedia":
        return _RecomputeMedia(self, rows)


class _RecomputeMedia:
    def __init__(self, runner: RecomputeRunner, rows: List[int]):
        self.runner, self.rows = runner, list(rows)
        self.uncond: List[List[Segment]] = [[] for _ in rows]

    def velocity(self, x: torch.Tensor, t: float, guided: bool):
        r, n = x.shape[0], x.shape[1]
        new = [[Segment(latents=x[i], t=t)] for i in range(r)]
        histories = [self.runner.history[row] for row in self.rows]
        _, v, batch = self.runner._forward(histories, new)
        v_cond = _last_block(v, batch, n)
        if not guided:
            return v_cond, None
        _, v, batch = self.runner._forward(self.uncond, new)
        return v_cond, _last_block(v, batch, n)

    def commit(self, frame: List[List[Segment]], uncond_frame: Optional[List[List[Segment]]], eoi: bool):
        histories = [self.runner.history[row] for row in self.rows]
        logits = None
        if eoi:
            logits, _, _ = self.runner._forward(histories, frame)
        for i, row in enumerate(self.rows):
            self.runner.history[row] = self.runner.history[row] + frame[i]
            self.runner.positions[row] += sum(len(s) for s in frame[i])
            if uncond_frame is not None:
                self.uncond[i] = self.uncond[i] + uncond_frame[i]
        return logits

    def close(self) -> None:
        pass
