"""The masked-diffusion objective (objective.kind = masked_diffusion): masking schedules, the forward process on a
discrete Batch, anti-masking, and the ELBO-weighted cross-entropy.

Forward process (per row): t ~ U[0, 1], floored at `t_floor`; every non-padding position of modality m is replaced
by MASK_m independently with probability beta_m(t), from one uniform u per position (masked iff u < beta_m(t)).
Schedules beta(t), all with beta(0) = 0, beta(1) = 1, increasing:

    linear       t
    cosine       sin(pi t / 2)   (MaskGIT's cos(pi r / 2) with r = 1 - t: masks more at a given t than linear)
    polynomial   t^a            (a = exponent)

Loss: the continuous-time ELBO of the masked process (MDLM / LLaDA) is

    E_t E_mask [ w(t) * sum over masked positions of -log p(x_i | x_masked) ],   w(t) = beta'(t) / beta(t)

which is 1/t for the linear schedule (LLaDA's 1/t weight) and a/t for the polynomial one. A schedule's
`weighting: none` drops the weight (MaskGIT's mask-prediction CE: heavily masked states count more than in the
ELBO, which helps conditional media generation early in training; the loss is then not a bound). Substituting b = beta(t)
shows the expectation does not depend on the schedule (test_masked_diffusion checks this against the exact sum
over all masks of a small sequence). The per-micro-batch loss is that sum divided by the number of non-padding
positions (an unbiased estimate of the NELBO per token); per-modality losses divide each modality's share by its
own position count.

Anti-masking (objective.masked_diffusion.anti_masking): from the same uniforms, a second copy of each row masks the
complementary positions u > 1 - beta_m(t). Each copy alone is a sample of the forward process, so the average of
the two losses stays unbiased; the copies are negatively correlated (a position masked in one is likely visible
in the other), which lowers the variance of the estimate below that of two independent masks. This is MIRROR's
construction; the tri-modal paper's exact variant is not public. The copies are the micro-batch's rows
[0, b) and [b, 2b), so a micro-batch then runs 2 * training.micro_batch_size rows.

Conditioning rows (clean_text_fraction, clean_media_fraction): with one masking time for the whole row, a caption is
almost never fully visible while its image is mostly masked (at t = 0.7 a 6-token caption is whole with
probability 0.3^6), so the model would rarely learn to generate media from a clean prompt. A row holding image or
audio codes therefore keeps its text clean with probability clean_text_fraction (only the media is masked: the
conditional ELBO of the media given the text, as LLaDA's and MMaDA's fine-tuning keep the prompt clean), or its
media clean with probability clean_media_fraction (text given media); the remaining rows mask every position.

Random draws come from the caller's generator (seeded per micro-batch by the training loop), a fixed number per
micro-batch whatever its content, so every TP/PP/DP layout and a resumed run draw identical masks.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from megafusion.data.batch import Batch
from megafusion.discrete.batch import concat_batches
from megafusion.discrete.vocab import MODALITY_NAMES, UnifiedVocab

SCHEDULES = ("linear", "cosine", "polynomial")


def schedule_beta(kind: str, t: torch.Tensor, exponent: float = 1.0) -> torch.Tensor:
    """Masking probability beta(t) for t in [0, 1]."""
    if kind == "linear":
        return t
    if kind == "cosine":
        return torch.sin(0.5 * math.pi * t)
    if kind == "polynomial":
        return t.pow(exponent)
    raise ValueError(f"unknown masking schedule {kind!r}; choose one of {SCHEDULES}")


def schedule_weight(kind: str, t: torch.Tensor, exponent: float = 1.0) -> torch.Tensor:
    """The ELBO weight beta'(t) / beta(t) (t > 0)."""
    if kind == "linear":
        return 1.0 / t
    if kind == "cosine":
        half = 0.5 * math.pi * t
        return 0.5 * math.pi * torch.cos(half) / torch.sin(half)
    if kind == "polynomial":
        return exponent / t
    raise ValueError(f"unknown masking schedule {kind!r}; choose one of {SCHEDULES}")


def vocab_from_config(md_cfg) -> UnifiedVocab:
    """The unified vocabulary named by objective.masked_diffusion."""
    return UnifiedVocab(md_cfg.text_vocab_size, md_cfg.image_codebook_size, md_cfg.audio_codebook_size,
                        tuple(md_cfg.tasks))


def _per_modality(md_cfg, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """beta_m(t) and w_m(t) for every row and modality: two [b, 3] tensors."""
    betas, weights = [], []
    for name in MODALITY_NAMES:
        sched = getattr(md_cfg, f"{name}_schedule")
        betas.append(schedule_beta(sched.kind, t, sched.exponent))
        weights.append(schedule_weight(sched.kind, t, sched.exponent) if sched.weighting == "elbo"
                       else torch.ones_like(t))
    return torch.stack(betas, dim=1), torch.stack(weights, dim=1)


def draw(batch: Batch, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The uniforms of one micro-batch: t [b], u [b, s] and the conditioning draw c [b] (always b + b*s + b
    draws, in this order)."""
    b, s = batch.tokens.shape
    t = torch.rand(b, generator=generator, dtype=torch.float64)
    u = torch.rand(b, s, generator=generator, dtype=torch.float64)
    c = torch.rand(b, generator=generator, dtype=torch.float64)
    return t, u, c


def clean_positions(batch: Batch, md_cfg, c: torch.Tensor) -> torch.Tensor:
    """[b, s] bool: positions kept clean as conditioning. A row holding image or audio codes keeps its text clean
    when c < clean_text_fraction (the model learns media given text), else its media clean when c <
    clean_text_fraction + clean_media_fraction (text given media); other rows mask every position."""
    from megafusion.discrete.vocab import TEXT

    tm = batch.token_modality
    text = tm == TEXT
    media = (tm > TEXT)
    mixed = media.any(dim=1, keepdim=True)
    keep_text = mixed & (c < md_cfg.clean_text_fraction).unsqueeze(1)
    keep_media = mixed & ~keep_text & (c < md_cfg.clean_text_fraction + md_cfg.clean_media_fraction).unsqueeze(1)
    return (keep_text & text) | (keep_media & media)


def masked_copy(batch: Batch, vocab: UnifiedVocab, md_cfg, t: torch.Tensor, u: torch.Tensor,
                complementary: bool = False, clean: Optional[torch.Tensor] = None) -> Batch:
    """Mask `batch` (clean: labels = tokens) with flow times t [b] and uniforms u [b, s]; the complementary copy
    masks u > 1 - beta instead of u < beta; `clean` [b, s] positions stay unmasked and out of the loss."""
    if batch.token_modality is None:
        raise ValueError("masked diffusion needs a discrete Batch (token_modality set; megafusion.discrete)")
    t_eff = t.clamp(min=md_cfg.t_floor)
    beta, weight = _per_modality(md_cfg, t_eff)  # [b, 3]
    tm = batch.token_modality
    valid = tm >= 0
    index = tm.clamp(min=0)
    beta_pos = torch.gather(beta, 1, index)  # [b, s]
    weight_pos = torch.gather(weight, 1, index)
    masked = valid & ((u > 1.0 - beta_pos) if complementary else (u < beta_pos))
    if clean is not None:
        masked &= ~clean
    mask_ids = torch.tensor([vocab.mask(m) for m in range(len(MODALITY_NAMES))], dtype=batch.labels.dtype)
    tokens = torch.where(masked, mask_ids[index], batch.labels)
    loss_mask = torch.where(masked, weight_pos, torch.zeros_like(weight_pos)).float()
    return batch.replace(tokens=tokens, loss_mask=loss_mask)


def mask_batch(batch: Batch, md_cfg, vocab: UnifiedVocab, generator: torch.Generator) -> Batch:
    """The training input of one clean discrete micro-batch (two stacked copies with anti-masking)."""
    t, u, c = draw(batch, generator)
    clean = clean_positions(batch, md_cfg, c)
    first = masked_copy(batch, vocab, md_cfg, t, u, clean=clean)
    if not md_cfg.anti_masking:
        return first
    return concat_batches([first, masked_copy(batch, vocab, md_cfg, t, u, complementary=True, clean=clean)])


def drop_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """-inf at the padded vocabulary columns (ids >= vocab_size) of this TP rank's slice [s, b, V_padded/tp]: the
    softmax then runs over the unified vocabulary only, whatever padding the TP size implies."""
    from megatron.core import parallel_state

    local = logits.shape[-1]
    rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    first_padded = vocab_size - rank * local  # local column of id vocab_size
    if first_padded >= local:
        return logits
    columns = torch.arange(local, device=logits.device) >= max(first_padded, 0)
    return logits.masked_fill(columns, float("-inf"))


def masked_diffusion_loss(logits: torch.Tensor, batch: Batch,
                          vocab_size: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """ELBO-weighted CE of one masked micro-batch: (differentiable total, detached report).

    logits [s, b, V/tp] (vocab-parallel, one prediction per position, not shifted); columns of ids >= vocab_size
    (the padding megatron adds for TP divisibility) are left out of the softmax. The report holds, per
    modality m, `md_sum_<m>` (weighted CE summed over m's positions) and `md_count_<m>` (m's non-padding
    positions), plus the masked position count, so the loop can form per-modality losses over any number of
    micro-batches and ranks."""
    from megafusion.objectives.cross_entropy import per_token_cross_entropy

    b, s = batch.labels.shape
    if logits.dim() != 3 or logits.shape[0] != s or logits.shape[1] != b:
        raise ValueError(f"logits have shape {tuple(logits.shape)}, expected [s, b, V/tp] with s={s}, b={b}")
    weight = batch.loss_mask.t().float()  # [s, b]
    losses = per_token_cross_entropy(drop_vocab_padding(logits, vocab_size), batch.labels.t().contiguous())
    weighted = losses * weight
    tm = batch.token_modality.t()
    n_valid = (tm >= 0).sum()
    total = weighted.sum() / n_valid.clamp(min=1).float()
    report = {"masked_tokens": (weight > 0).sum().detach().float()}
    for m, name in enumerate(MODALITY_NAMES):
        sel = tm == m
        report[f"md_sum_{name}"] = weighted.detach()[sel].sum().float()
        report[f"md_count_{name}"] = sel.sum().float()
    return total, report
