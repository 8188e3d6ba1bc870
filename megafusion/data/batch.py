"""The Batch contract: one packed multimodal micro-batch, as every layer of megafusion sees it.

A packed sequence of length S interleaves text tokens and continuous latent patches. Per position it carries
(all [b, s], batch-first like megatron's `tokens`):

  tokens          text token id; a placeholder (PAD) at latent positions
  labels          the next text token to predict at this position (any value where `loss_mask` is 0)
  loss_mask       1.0 where the CE loss counts (next position is a text token of the same document)
  modality        MODALITY_TEXT or MODALITY_IMAGE (padding counts as text)
  block_ids       id of the visual block (one image, or one video frame) the position belongs to; -1 for text.
                  Ids are unique within a sequence and increase along it.
  document_ids    id of the packed document, increasing along the sequence; -1 for padding
  context_start   the first key index this position may attend to: its document's start, moved forward to the
                  first latent position of its media item (image or whole video) when that item's text
                  conditioning is dropped for classifier-free guidance
  noised          True at latent positions that carry noised latents z_t (trained with flow matching)
  token_modality  masked-diffusion family only (megafusion.discrete), else None: the discrete modality of each
                  token (0 text, 1 image codes, 2 audio codes; -1 at padding). There every position is a
                  discrete token (modality is MODALITY_TEXT throughout, no latent rows), each document is one
                  bidirectional block (block_ids = its document id at every valid position), labels are the
                  clean tokens themselves and loss_mask carries the ELBO weight of each masked position.

Latent patches travel separately, one row per latent position in row-major (b, s) order:

  latents         [N, patch_dim] clean patches z1 (patch_dim = C * p * p)
  noisy_latents   [N, patch_dim] the model's input: z_t at noised rows, z1 at clean rows
  latent_t        [N] flow time of the row's block (t = 1 is clean)
  velocity_target [N, patch_dim] z1 - z0 at noised rows
  fm_loss_mask    [N] 1.0 where the flow-matching loss counts

The loader fills the clean fields (noisy_latents = latents, latent_t = 1, no FM targets); the flow-matching
objective (megafusion.objectives.flow_matching.noise_batch) samples t, noise and condition dropout and fills the
rest. Every layer reads "which modality / which block" from here; nothing re-derives it from token ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

MODALITY_TEXT = 0
MODALITY_IMAGE = 1
NUM_MODALITIES = 2


@dataclass
class Batch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    modality: torch.Tensor
    block_ids: torch.Tensor
    document_ids: torch.Tensor
    context_start: torch.Tensor
    noised: torch.Tensor
    latents: torch.Tensor
    noisy_latents: torch.Tensor
    latent_t: torch.Tensor
    velocity_target: Optional[torch.Tensor] = None
    fm_loss_mask: Optional[torch.Tensor] = None
    token_modality: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ shapes
    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def patch_dim(self) -> int:
        return self.latents.shape[-1]

    @property
    def num_text_targets(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def num_latent_positions(self) -> int:
        return self.latents.shape[0]

    @property
    def image_positions(self) -> torch.Tensor:
        """[b, s] bool, True at latent positions."""
        return self.modality == MODALITY_IMAGE

    # ------------------------------------------------------------------ movement
    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Batch":
        """Move every tensor to `device`; floating latent tensors are also cast to `dtype` when given."""

        def move(name, value):
            if value is None:
                return None
            if dtype is not None and name in _LATENT_FLOAT_FIELDS:
                return value.to(device=device, dtype=dtype)
            return value.to(device=device)

        return Batch(**{f.name: move(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)})

    def replace(self, **changes) -> "Batch":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "Batch":
        """Check the invariants of the contract; raise ValueError naming the field and the problem."""
        b, s = self.tokens.shape
        for name in ("labels", "loss_mask", "modality", "block_ids", "document_ids", "context_start", "noised"):
            value = getattr(self, name)
            if tuple(value.shape) != (b, s):
                raise ValueError(f"Batch.{name} has shape {tuple(value.shape)}, expected [b, s] = {(b, s)}")
        image = self.image_positions
        n = int(image.sum().item())
        for name in ("latents", "noisy_latents"):
            value = getattr(self, name)
            if value.dim() != 2 or value.shape[0] != n:
                raise ValueError(
                    f"Batch.{name} has shape {tuple(value.shape)}, expected [{n}, patch_dim]: one row per "
                    f"position with modality == MODALITY_IMAGE"
                )
        if self.latent_t.shape != (n,):
            raise ValueError(f"Batch.latent_t has shape {tuple(self.latent_t.shape)}, expected ({n},)")
        for name in ("velocity_target", "fm_loss_mask"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"Batch.{name} has {value.shape[0]} rows, expected {n}")
        if self.token_modality is not None:
            if tuple(self.token_modality.shape) != (b, s):
                raise ValueError(f"Batch.token_modality has shape {tuple(self.token_modality.shape)}, expected {(b, s)}")
            if n or ((self.block_ids >= 0) != (self.document_ids >= 0)).any():
                raise ValueError("a discrete (masked-diffusion) Batch has no latent positions and every valid "
                                 "position in its document's bidirectional block (block_ids >= 0 exactly where "
                                 "document_ids >= 0)")
        elif ((self.block_ids >= 0) != image).any():
            raise ValueError("Batch.block_ids must be >= 0 exactly at latent positions (modality == IMAGE)")
        if (self.noised & ~image).any():
            raise ValueError("Batch.noised is True at a text position; only latent positions can be noised")
        positions = torch.arange(s, device=self.tokens.device).expand(b, s)
        valid = self.document_ids >= 0
        if ((self.context_start > positions) & valid).any() or (self.context_start < 0).any():
            raise ValueError("Batch.context_start must lie in [0, position] for every non-padding position")
        if (self.loss_mask.bool() & ~valid).any():
            raise ValueError("Batch.loss_mask is set at a padding position (document_ids == -1)")
        return self


_LATENT_FLOAT_FIELDS = {"latents", "noisy_latents", "velocity_target"}


def contiguous_runs(values: torch.Tensor):
    """Split a 1-D tensor into maximal runs of equal values: yields (start, end, value) with end exclusive."""
    n = values.numel()
    if n == 0:
        return
    change = torch.nonzero(values[1:] != values[:-1]).flatten() + 1
    bounds = [0] + change.tolist() + [n]
    vals = values[torch.tensor(bounds[:-1], device=values.device)].tolist()
    for start, end, value in zip(bounds[:-1], bounds[1:], vals):
        yield start, end, value
