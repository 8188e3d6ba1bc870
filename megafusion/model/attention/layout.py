"""AttentionLayout: who may attend to whom in a packed multimodal sequence, built once per batch.

The rule (query q, key k, positions of one packed row):

    allowed(q, k) = valid[k]
                    and k >= context_start[q]                        # same document (or CFG-dropped context)
                    and (k <= q or (block[q] >= 0 and block[k] == block[q]))   # causal, bidirectional in a block
                    and not (hide_noised and noised[k] and block[k] != block[q])  # BAGEL: noised is private
    padding queries (valid[q] False) attend to themselves only, so every softmax row is finite.

Text is therefore causal; each visual block (an image, or one video frame) is bidirectional inside and sees
everything earlier, including earlier frames; documents packed into one row never see each other.

The layout object is what megafusion passes through megatron's `attention_mask` argument: the TransformerBlock
hands it unchanged to every layer, and the core attention (core_attention.py) and the modality FFN
(modality_mlp.py) read it. Backends cache what they derive from it (a dense mask, segments, a flex BlockMask) in
`cache`, so the work is done once per batch, not once per layer.

During generation the layout covers only the positions being run (a prompt, one text token, one image block) and
carries the inference state in `inference` (megafusion.inference.kv_cache.InferenceStep, handed to
MultimodalModel.forward as `inference_context`): the core attention then attends those positions to the cached
keys/values of earlier positions through it instead of running a backend over the layout alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from megafusion.data.batch import MODALITY_IMAGE, Batch


@dataclass(eq=False)
class AttentionLayout:
    block_ids: torch.Tensor  # [b, s] long, -1 for text
    context_start: torch.Tensor  # [b, s] long
    valid: torch.Tensor  # [b, s] bool, False at padding
    noised: torch.Tensor  # [b, s] bool
    modality: torch.Tensor  # [b, s] long
    hide_noised: bool = False
    cache: Dict[str, object] = field(default_factory=dict)
    inference: Optional[Any] = None  # generation state (KV cache) read by the core attention; None in training
    route: Optional[torch.Tensor] = None  # [b, s] FFN path per position when it differs from `modality`

    @classmethod
    def from_batch(cls, batch: Batch, hide_noised: bool = False) -> "AttentionLayout":
        return cls(
            block_ids=batch.block_ids,
            context_start=batch.context_start,
            valid=batch.document_ids >= 0,
            noised=batch.noised,
            modality=batch.modality,
            hide_noised=hide_noised,
            # masked-diffusion batches: every position is a discrete token (modality TEXT), the FFN path is its
            # discrete modality (text / image codes / audio codes; padding goes with text)
            route=batch.token_modality.clamp(min=0) if batch.token_modality is not None else None,
        )

    @property
    def batch_size(self) -> int:
        return self.block_ids.shape[0]

    @property
    def seq_length(self) -> int:
        return self.block_ids.shape[1]

    @property
    def device(self) -> torch.device:
        return self.block_ids.device

    def cached(self, key: str, build):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    # ------------------------------------------------------------------ the reference mask
    def dense_mask(self) -> torch.Tensor:
        """[b, 1, s, s] bool, True where query (row) may attend to key (column)."""
        return self.cached("dense_mask", self._build_dense_mask)

    def _build_dense_mask(self) -> torch.Tensor:
        s = self.seq_length
        pos = torch.arange(s, device=self.device)
        q_pos, k_pos = pos.view(1, s, 1), pos.view(1, 1, s)
        block_q, block_k = self.block_ids.unsqueeze(2), self.block_ids.unsqueeze(1)
        same_block = (block_q >= 0) & (block_q == block_k)
        allowed = (k_pos <= q_pos) | same_block
        allowed &= k_pos >= self.context_start.unsqueeze(2)
        allowed &= self.valid.unsqueeze(1)
        if self.hide_noised:
            allowed &= ~(self.noised.unsqueeze(1) & ~same_block)
        eye = torch.eye(s, dtype=torch.bool, device=self.device).unsqueeze(0)
        allowed = torch.where(self.valid.unsqueeze(2), allowed, eye)
        return allowed.unsqueeze(1)

    # ------------------------------------------------------------------ modality routing for the FFN
    def modality_rows(self, modality: int) -> torch.Tensor:
        """Indices into hidden states flattened from [s, b, h] to [s*b, h] whose position has `modality` (its FFN
        path: `route` where set, else `modality`)."""

        def build():
            paths = self.route if self.route is not None else self.modality
            flat = paths.transpose(0, 1).reshape(-1)  # [s*b], sequence-first like the hidden states
            return torch.nonzero(flat == modality).flatten()

        return self.cached(f"modality_rows_{modality}", build)

    @property
    def has_latents(self) -> bool:
        return bool(self.cached("has_latents", lambda: bool((self.modality == MODALITY_IMAGE).any().item())))
