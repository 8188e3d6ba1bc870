"""Flow matching on latent patches: flow-time sampling, noising a Batch, condition dropout, and the velocity loss.

Convention (docs/objectives.md): t in [0, 1] with t = 1 clean and t = 0 pure noise,

    z0 ~ N(0, I),   z_t = t * z1 + (1 - t) * z0,   target v = dz_t/dt = z1 - z0,

one t per visual block (an image, or one video frame). `noise_batch` fills the flow-matching fields of a loader
Batch (megafusion/data/batch.py), drops the text conditioning of whole media items for classifier-free guidance by
moving their `context_start` forward, and (objective.captioning = "transfusion") limits the noise of a fraction of
the media items followed by a caption to the cleaner flow times (`captioned_items`); `flow_matching_loss` is the
MSE of the predicted velocity over the noised rows. Everything is vectorised over latent rows; the random draws
come from one torch.Generator in a fixed order (t per block, then noise per row, then one dropout draw per media
item, then one captioning draw per media item), so a seed fixes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megafusion.config.schema import ObjectiveConfig
from megafusion.data.batch import Batch
from megafusion.data.special_tokens import SPECIAL_TOKENS


# ---------------------------------------------------------------------------------------------- flow time
def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Move t towards noise: t' = t / (t + s * (1 - t)) for s >= 1 (s = 1 is the identity).

    With t = 1 clean this is the SD3 resolution shift written for the noise level sigma = 1 - t:
    sigma' = s * sigma / (1 + (s - 1) * sigma). For s > 1 and t in (0, 1), t' < t; 0 and 1 are fixed points.
    """
    if shift < 1.0:
        raise ValueError(f"objective.timestep_shift={shift} must be >= 1 (values below 1 would move t towards clean)")
    if shift == 1.0:
        return t
    return t / (t + shift * (1.0 - t))


def sample_timesteps(n: int, cfg: ObjectiveConfig, generator: Optional[torch.Generator] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """[n] float32 flow times: uniform on [0, 1) or sigmoid(N(mean, std)), then shifted (`shift_timesteps`).

    Drawn on the generator's device (without a generator: from the global RNG of `device`, default CPU).
    """
    device = generator.device if generator is not None else torch.device(device or "cpu")
    if cfg.timestep_sampling == "uniform":
        t = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    elif cfg.timestep_sampling == "logit_normal":
        normal = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
        t = torch.sigmoid(cfg.logit_normal_mean + cfg.logit_normal_std * normal)
    else:
        raise ValueError(f"objective.timestep_sampling={cfg.timestep_sampling!r}; choose uniform or logit_normal")
    return shift_timesteps(t, cfg.timestep_shift)


# ---------------------------------------------------------------------------------------------- latent rows
@dataclass
class LatentIndex:
    """Where each latent row of a Batch sits, and which block and media item it belongs to (all [N] unless said)."""

    rows: torch.Tensor  # batch row of the position
    positions: torch.Tensor  # sequence position
    block_index: torch.Tensor  # 0..num_blocks-1, global over the batch, in latent-row order
    item_index: torch.Tensor  # 0..num_items-1: media item = maximal run of adjacent blocks, no text between them
    noised: torch.Tensor  # bool, the row carries z_t
    item_start: torch.Tensor  # [num_items] sequence position of each item's first latent row
    item_noised: torch.Tensor  # [num_items] bool, the item holds at least one noised row
    item_row: torch.Tensor  # [num_items] batch row of each item
    item_end: torch.Tensor  # [num_items] sequence position of each item's last latent row
    num_blocks: int
    num_items: int

    @classmethod
    def from_batch(cls, batch: Batch) -> "LatentIndex":
        rows, positions = torch.nonzero(batch.image_positions, as_tuple=True)  # row-major = latent-row order
        n = rows.numel()
        if n != batch.num_latent_positions:
            raise ValueError(f"Batch has {n} latent positions but {batch.num_latent_positions} latent rows; "
                             f"check Batch.validate()")
        block = batch.block_ids[rows, positions]
        doc = batch.document_ids[rows, positions]
        noised = batch.noised[rows, positions]
        same_row = rows[1:] == rows[:-1]
        block_first = torch.ones(n, dtype=torch.bool, device=rows.device)
        block_first[1:] = ~same_row | (block[1:] != block[:-1])
        # A latent row continues the previous media item when it directly follows it in the same document.
        continues = torch.zeros(n, dtype=torch.bool, device=rows.device)
        continues[1:] = same_row & (positions[1:] == positions[:-1] + 1) & (doc[1:] == doc[:-1])
        item_first = block_first & ~continues
        block_index = torch.cumsum(block_first.long(), 0) - 1
        item_index = torch.cumsum(item_first.long(), 0) - 1
        num_blocks, num_items = int(block_first.sum().item()), int(item_first.sum().item())
        item_noised = torch.zeros(num_items, dtype=torch.long, device=rows.device)
        item_noised = item_noised.index_add_(0, item_index, noised.long()) > 0
        item_last = torch.ones(n, dtype=torch.bool, device=rows.device)  # the row before the next item's first
        item_last[:-1] = item_first[1:]
        return cls(rows, positions, block_index, item_index, noised, positions[item_first], item_noised,
                   rows[item_first], positions[item_last], num_blocks, num_items)


def captioned_items(batch: Batch, index: Optional[LatentIndex] = None) -> torch.Tensor:
    """[num_items] bool: the media item is followed by a caption in its document (Transfusion's captioning rule).

    A *caption token* is a position whose token is ordinary text (id >= SPECIAL_TOKENS.num_reserved, so not
    PAD / BOS / EOS / BOI / EOI / FRAME) and is a CE target: the position before it has loss_mask 1 (it is predicted,
    and its prediction reads everything earlier in the document, the image included). An item is followed by a
    caption when a caption token lies after the item's last latent position (hence after its EOI) in the same row
    and document. So `BOI img EOI text EOS` is captioned (the EOI predicts the first caption token), while
    `caption BOI img EOI EOS`, an image followed only by another image, or an image whose caption continues in the
    next packed row (a new document segment there) are not. Vectorised: the last caption position of every
    (row, document) by one scatter-amax, compared with each item's last latent position.
    """
    index = index if index is not None else LatentIndex.from_batch(batch)
    b, s = batch.tokens.shape
    device = batch.tokens.device
    target = torch.zeros(b, s, dtype=torch.bool, device=device)
    target[:, 1:] = batch.loss_mask[:, :-1] > 0
    caption = target & (batch.tokens >= SPECIAL_TOKENS.num_reserved)
    position = torch.arange(s, device=device).expand(b, s)
    key = torch.arange(b, device=device).unsqueeze(1) * s + batch.document_ids.clamp(min=0)  # [b, s]
    last = torch.full((b * s,), -1, dtype=torch.long, device=device)
    last = last.scatter_reduce(0, key.reshape(-1), torch.where(caption, position, -1).reshape(-1), "amax")
    item_doc = batch.document_ids[index.item_row, index.item_end]
    return last[index.item_row * s + item_doc.clamp(min=0)] > index.item_end


# ---------------------------------------------------------------------------------------------- noising
def noise_batch(batch: Batch, cfg: ObjectiveConfig, generator: Optional[torch.Generator] = None) -> Batch:
    """Return a new Batch with z_t, latent_t, velocity_target, fm_loss_mask and CFG condition dropout filled.

    Call once on a loader Batch (noisy_latents = latents, latent_t = 1). Random draws, in this order, on the
    generator's device (the global RNG of the batch's device when generator is None): `sample_timesteps` for every
    block (clean blocks ignore theirs), z0 ~ N(0, I) [N, patch_dim] for every latent row, one uniform per media
    item (the item is dropped when it is < cfg.cond_dropout and the item holds a noised block), and with
    cfg.captioning = "transfusion" one more uniform per media item (the item's flow times are limited to
    [cfg.caption_min_t, 1] when it is < cfg.caption_fraction and `captioned_items` says the item is followed by a
    caption). The captioning draw comes last, so the other draws are the same with and without it.
    See `apply_noise` for what is written.
    """
    index = LatentIndex.from_batch(batch)
    device = batch.latents.device
    gen_device = generator.device if generator is not None else device
    n, d = batch.latents.shape
    t_block = sample_timesteps(index.num_blocks, cfg, generator, device=gen_device)
    z0 = torch.randn(n, d, generator=generator, device=gen_device, dtype=torch.float32)
    drop_draw = torch.rand(index.num_items, generator=generator, device=gen_device, dtype=torch.float32)
    limit_item = None
    if cfg.captioning == "transfusion":
        caption_draw = torch.rand(index.num_items, generator=generator, device=gen_device, dtype=torch.float32)
        limit_item = (caption_draw.to(device) < cfg.caption_fraction) & captioned_items(batch, index)
    return apply_noise(batch, t_block.to(device), z0.to(device), drop_draw.to(device) < cfg.cond_dropout, index,
                       limit_item=limit_item, caption_min_t=cfg.caption_min_t)


def apply_noise(batch: Batch, t_block: torch.Tensor, z0: torch.Tensor, drop_item: torch.Tensor,
                index: Optional[LatentIndex] = None, limit_item: Optional[torch.Tensor] = None,
                caption_min_t: float = 0.5) -> Batch:
    """The deterministic half of `noise_batch`, for given draws.

    t_block [num_blocks] flow time per visual block (latent-row order over the whole batch); z0 [N, patch_dim]
    noise per latent row; drop_item [num_items] bool, drop the media item's text conditioning (ignored for items
    without a noised block); limit_item [num_items] bool or None, map the flow times of the item's noised blocks
    into [caption_min_t, 1]: t' = caption_min_t + (1 - caption_min_t) * t (Transfusion's captioning rule; None or
    all False leaves every t as drawn, bit for bit). Noised rows get z_t = t * z1 + (1 - t) * z0 (computed in
    fp32, stored in the latents' dtype), latent_t = t, velocity_target = z1 - z0 and fm_loss_mask 1; clean rows
    keep z1, t = 1, a zero target and fm_loss_mask 0. Every latent position of a dropped item gets context_start =
    the item's first latent position, so it attends only to itself (earlier frames of the same video included) —
    the unconditional form the sampler builds for the classifier-free-guidance pass. Text positions are never
    changed.
    """
    index = index if index is not None else LatentIndex.from_batch(batch)
    device = batch.latents.device
    if t_block.shape != (index.num_blocks,):
        raise ValueError(f"t_block has shape {tuple(t_block.shape)}, expected ({index.num_blocks},): one t per block")
    if z0.shape != batch.latents.shape:
        raise ValueError(f"z0 has shape {tuple(z0.shape)}, expected {tuple(batch.latents.shape)} like Batch.latents")
    if drop_item.shape != (index.num_items,):
        raise ValueError(f"drop_item has shape {tuple(drop_item.shape)}, expected ({index.num_items},): one flag "
                         f"per media item")
    if limit_item is not None and limit_item.shape != (index.num_items,):
        raise ValueError(f"limit_item has shape {tuple(limit_item.shape)}, expected ({index.num_items},): one flag "
                         f"per media item")
    if not 0.0 <= caption_min_t < 1.0:
        raise ValueError(f"caption_min_t={caption_min_t} (objective.caption_min_t) must be in [0, 1)")
    noised = index.noised
    t_drawn = t_block.float()[index.block_index]  # [N]
    if limit_item is not None:
        limited_row = limit_item.bool()[index.item_index]
        t_drawn = torch.where(limited_row, caption_min_t + (1.0 - caption_min_t) * t_drawn, t_drawn)
    t_row = torch.where(noised, t_drawn, torch.ones((), device=device))  # [N]
    z1, z0 = batch.latents.float(), z0.float()
    t_col, noised_col = t_row.unsqueeze(1), noised.unsqueeze(1)
    z_t = t_col * z1 + (1.0 - t_col) * z0
    noisy_latents = torch.where(noised_col, z_t.to(batch.latents.dtype), batch.latents)
    velocity_target = torch.where(noised_col, z1 - z0, torch.zeros((), device=device)).to(batch.latents.dtype)

    dropped_row = (drop_item.bool() & index.item_noised)[index.item_index]  # [N]
    context_start = batch.context_start.clone()
    old = context_start[index.rows, index.positions]
    context_start[index.rows, index.positions] = torch.where(dropped_row, index.item_start[index.item_index], old)

    return batch.replace(
        noisy_latents=noisy_latents,
        latent_t=t_row,
        velocity_target=velocity_target,
        fm_loss_mask=noised.float(),
        context_start=context_start,
    )


# ---------------------------------------------------------------------------------------------- loss
def flow_matching_loss(velocity_pred: torch.Tensor, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """MSE between velocity_pred [N, patch_dim] and batch.velocity_target, mean over noised rows and the patch dim.

    Returns (loss, count): a float32 scalar (0 with the graph connected to velocity_pred when no row is noised)
    and the number of noised rows as a detached int64 scalar. Computed in fp32 whatever the prediction dtype.
    """
    if batch.velocity_target is None or batch.fm_loss_mask is None:
        raise ValueError("Batch.velocity_target / fm_loss_mask are None: call "
                         "megafusion.objectives.flow_matching.noise_batch on the batch before the loss")
    if velocity_pred.shape != batch.velocity_target.shape:
        raise ValueError(f"velocity prediction has shape {tuple(velocity_pred.shape)}, expected "
                         f"{tuple(batch.velocity_target.shape)} = [num_latent_rows, patch_dim]")
    mask = batch.fm_loss_mask.float()  # [N]
    sq = (velocity_pred.float() - batch.velocity_target.float()).pow(2).sum(dim=-1)  # [N]
    count = mask.sum()
    denom = (count * velocity_pred.shape[-1]).clamp(min=1.0)
    loss = (sq * mask).sum() / denom
    return loss, count.detach().long()
