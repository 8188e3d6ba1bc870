"""Physical vs logical batch size: the SDE reparameterisation of AdamW's hyperparameters (optimizer.sde_rescale).

The tri-modal masked-diffusion paper (../shared/REFERENCES.md; the formula is marked unconfirmed there) tunes
AdamW at a logical batch B_base and token horizon D_base and moves the tuned values to the batch B the hardware
wants and this run's horizon D with one factor

    kappa = (D_base / D)^gamma * (B / B_base)          (gamma ~ 0.44)
    lr -> lr * sqrt(kappa)     beta -> beta^kappa     eps -> eps / sqrt(kappa)

applied here to the peak and final learning rates (the whole schedule), both Adam betas and every epsilon
(optimizer.adam_eps and the per-module optimizer.groups.*.eps). Weight decay is left as configured: what the
paper does with it is not stated in what we could read. The rule holds only while the physical batch stays below
the critical batch it states, B_crit = D / (L * S_crit) sequences for sequence length L and a critical step count
S_crit (optimizer.sde_rescale.critical_steps); a larger physical batch is refused.

    cfg = rescaled_config(cfg, total_steps)     # once, before the optimizer is built (training/loop.py)

Works for both model families (it touches only the optimizer section).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

from megafusion.config.schema import PARAM_GROUPS, Config


@dataclass(frozen=True)
class Rescaling:
    kappa: float
    lr: float
    min_lr: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    critical_batch: Optional[float]
    """B_crit in sequences (None: no critical step count given)."""

    def describe(self) -> str:
        crit = f", critical batch {self.critical_batch:.0f} sequences" if self.critical_batch else ""
        return (f"kappa {self.kappa:.4g}: lr {self.lr:.4g}, min_lr {self.min_lr:.4g}, betas ({self.adam_beta1:.6g}, "
                f"{self.adam_beta2:.6g}), eps {self.adam_eps:.4g}{crit}")


def kappa(physical_batch: float, logical_batch: float, tokens: float, base_tokens: float, gamma: float) -> float:
    """(D_base / D)^gamma * (B / B_base)."""
    for name, value in (("physical_batch", physical_batch), ("logical_batch", logical_batch), ("tokens", tokens),
                        ("base_tokens", base_tokens)):
        if not value > 0:
            raise ValueError(f"SDE rescaling needs a positive {name}, got {value}")
    return (base_tokens / tokens) ** gamma * (physical_batch / logical_batch)


def critical_batch(tokens: float, seq_length: int, critical_steps: float) -> float:
    """B_crit = D / (L * S_crit), in sequences."""
    return tokens / (seq_length * critical_steps)


def rescale(cfg: Config, total_steps: int) -> Optional[Rescaling]:
    """The rescaled AdamW values for this run (None when optimizer.sde_rescale is off); ValueError when the physical
    batch is above the critical batch."""
    s, o, t = cfg.optimizer.sde_rescale, cfg.optimizer, cfg.training
    if s.logical_batch_size is None:
        return None
    batch, seq = t.global_batch_size, cfg.data.seq_length
    tokens = float(total_steps) * batch * seq
    if tokens <= 0:
        raise ValueError("optimizer.sde_rescale needs a token horizon: training.train_steps (or flops_budget) > 0")
    base = s.base_tokens if s.base_tokens is not None else tokens
    crit = critical_batch(tokens, seq, s.critical_steps) if s.critical_steps is not None else None
    if crit is not None and batch > crit:
        raise ValueError(
            f"optimizer.sde_rescale: the physical batch training.global_batch_size={batch} is above the critical "
            f"batch D / (L * S_crit) = {tokens:.4g} / ({seq} * {s.critical_steps:g}) = {crit:.1f} sequences, where "
            f"the SDE rule no longer holds; lower training.global_batch_size or train longer")
    k = kappa(batch, s.logical_batch_size, tokens, base, s.gamma)
    root = math.sqrt(k)
    return Rescaling(kappa=k, lr=o.lr * root, min_lr=o.min_lr * root, adam_beta1=o.adam_beta1 ** k,
                     adam_beta2=o.adam_beta2 ** k, adam_eps=o.adam_eps / root, critical_batch=crit)


def rescaled_config(cfg: Config, total_steps: int) -> Config:
    """A copy of `cfg` whose optimizer section carries the rescaled values (`cfg` itself when the rescaling is
    off). The per-module epsilons (optimizer.groups.*.eps) are divided by sqrt(kappa) too."""
    r = rescale(cfg, total_steps)
    if r is None:
        return cfg
    out = copy.deepcopy(cfg)
    o = out.optimizer
    o.lr, o.min_lr, o.adam_beta1, o.adam_beta2, o.adam_eps = r.lr, r.min_lr, r.adam_beta1, r.adam_beta2, r.adam_eps
    for name in PARAM_GROUPS:
        group = getattr(o.groups, name)
        if group.eps is not None:
            group.eps = group.eps / math.sqrt(r.kappa)
    return out
