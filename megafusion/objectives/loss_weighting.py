"""Weights of the joint loss L = lambda_ce * L_ce + lambda_fm * L_fm: fixed, or adaptive around an EMA centre.

Adaptive (the reference setup's ablation; formulas and choices in docs/objectives.md):

    A_k = alpha * L_ce,k + (1 - alpha) * L_fm,k          weighted centre, alpha in (0, 1)
    B_k = mu * B_{k-1} + (1 - mu) * A_k,  B_0 = A_0       EMA of the centre
    lambda_ce = B_k / L_ce,k,  lambda_fm = B_k / L_fm,k   detached; each weighted term equals B_k in value

`weights` serves one micro-batch (it forms a provisional B_k from B_{k-1} and the micro-batch's own losses);
`commit` advances the EMA once per optimizer step from the losses averaged over all micro-batches and all
data-parallel ranks (`reduce_for_weighting`), so the state is the same on every rank and belongs to the training
state (`state_dict`). A term is *active* when its loss is finite and > 0 (and its token count > 0 when given);
an inactive term gets weight 0 and never enters a division. A step where either term is inactive leaves the EMA
unchanged and weights the active term by B_{k-1} / L (by 1 before the EMA exists).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from megafusion.config.schema import ObjectiveConfig
from megafusion.parallel.initialize import collective_device

LossLike = Union[torch.Tensor, float]


def _as_tensor(x: LossLike) -> torch.Tensor:
    return x.detach().float() if isinstance(x, torch.Tensor) else torch.tensor(float(x))


def is_active(loss: torch.Tensor, count: Optional[LossLike] = None) -> torch.Tensor:
    """bool tensor: the term exists in this micro-batch / step (finite, > 0, and count > 0 when given)."""
    active = torch.isfinite(loss) & (loss > 0)
    if count is not None:
        active = active & (_as_tensor(count).to(loss.device) > 0)
    return active


class FixedWeighting:
    """lambda_ce = cfg.ce_weight, lambda_fm = cfg.fm_weight (0 for a term absent from the micro-batch)."""

    kind = "fixed"

    def __init__(self, ce_weight: float = 1.0, fm_weight: float = 1.0):
        self.ce_weight, self.fm_weight = float(ce_weight), float(fm_weight)

    def weights(self, l_ce: LossLike, l_fm: LossLike, n_ce: Optional[LossLike] = None,
                n_fm: Optional[LossLike] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        l_ce, l_fm = _as_tensor(l_ce), _as_tensor(l_fm)
        w_ce = torch.where(is_active(l_ce, n_ce), self.ce_weight, 0.0).to(l_ce)
        w_fm = torch.where(is_active(l_fm, n_fm), self.fm_weight, 0.0).to(l_fm)
        return w_ce, w_fm

    def commit(self, global_l_ce: LossLike, global_l_fm: LossLike) -> None:
        """Nothing to update."""

    def state_dict(self) -> Dict[str, object]:
        return {"kind": self.kind}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Fixed weights carry no state; a saved adaptive EMA is ignored (the config now asks for fixed)."""


class AdaptiveWeighting:
    """EMA-centred weights; see the module docstring and docs/objectives.md."""

    kind = "adaptive"

    def __init__(self, alpha: float = 0.5, mu: float = 0.99):
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"objective.adaptive_alpha={alpha} must be in (0, 1)")
        if not 0.0 < mu < 1.0:
            raise ValueError(f"objective.adaptive_mu={mu} must be in (0, 1)")
        self.alpha, self.mu = float(alpha), float(mu)
        self.ema: Optional[float] = None  # B_{k-1}; None before the first committed step
        self.num_updates = 0  # committed steps that moved the EMA
        self.num_partial = 0  # committed steps with a term missing (EMA unchanged)

    def centre(self, l_ce: torch.Tensor, l_fm: torch.Tensor) -> torch.Tensor:
        """A = alpha * L_ce + (1 - alpha) * L_fm."""
        return self.alpha * l_ce + (1.0 - self.alpha) * l_fm

    def next_ema(self, a: torch.Tensor) -> torch.Tensor:
        """B_k from B_{k-1} (this object's state) and A_k; B_0 = A_0."""
        return a if self.ema is None else self.mu * self.ema + (1.0 - self.mu) * a

    def weights(self, l_ce: LossLike, l_fm: LossLike, n_ce: Optional[LossLike] = None,
                n_fm: Optional[LossLike] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(lambda_ce, lambda_fm), detached fp32 scalars for this micro-batch; no host sync."""
        l_ce = _as_tensor(l_ce)
        l_fm = _as_tensor(l_fm).to(l_ce.device)
        on_ce, on_fm = is_active(l_ce, n_ce), is_active(l_fm, n_fm)
        one = torch.ones((), device=l_ce.device)
        safe_ce, safe_fm = torch.where(on_ce, l_ce, one), torch.where(on_fm, l_fm, one)
        both = on_ce & on_fm
        b_k = self.next_ema(self.centre(safe_ce, safe_fm))  # meaningful only where both terms are active
        if self.ema is None:  # a lone term before the EMA exists keeps its raw scale
            lone_ce, lone_fm = one, one
        else:  # a lone term is held at the previous centre
            lone_ce, lone_fm = self.ema / safe_ce, self.ema / safe_fm
        w_ce = torch.where(both, b_k / safe_ce, torch.where(on_ce, lone_ce, 0.0 * one))
        w_fm = torch.where(both, b_k / safe_fm, torch.where(on_fm, lone_fm, 0.0 * one))
        return w_ce, w_fm

    def commit(self, global_l_ce: LossLike, global_l_fm: LossLike) -> Optional[float]:
        """Advance the EMA with the step's losses (already averaged over micro-batches and DP ranks).

        Returns the new B_k. A step where either term is inactive (absent everywhere, 0, or non-finite) leaves
        the EMA as it is, so no division by zero and no jump of the centre.
        """
        l_ce, l_fm = _as_tensor(global_l_ce).cpu().double(), _as_tensor(global_l_fm).cpu().double()
        if not bool(is_active(l_ce) & is_active(l_fm)):
            self.num_partial += 1
            return self.ema
        a_k = self.alpha * float(l_ce) + (1.0 - self.alpha) * float(l_fm)
        self.ema = a_k if self.ema is None else self.mu * self.ema + (1.0 - self.mu) * a_k
        self.num_updates += 1
        return self.ema

    def state_dict(self) -> Dict[str, object]:
        return {"kind": self.kind, "ema": self.ema, "num_updates": self.num_updates,
                "num_partial": self.num_partial, "alpha": self.alpha, "mu": self.mu}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if state.get("kind") != self.kind or "ema" not in state:
            raise ValueError(f"loss-weighting state of kind {state.get('kind')!r} cannot restore the adaptive EMA; "
                             f"the checkpoint was trained with objective.loss_weighting={state.get('kind')!r} — "
                             f"set that value, or start the EMA fresh by not loading this state")
        ema = state["ema"]
        self.ema = None if ema is None else float(ema)
        self.num_updates = int(state.get("num_updates", 0))
        self.num_partial = int(state.get("num_partial", 0))


LossWeighting = Union[FixedWeighting, AdaptiveWeighting]


def build_loss_weighting(cfg: ObjectiveConfig) -> LossWeighting:
    if cfg.loss_weighting == "fixed":
        return FixedWeighting(cfg.ce_weight, cfg.fm_weight)
    if cfg.loss_weighting == "adaptive":
        return AdaptiveWeighting(cfg.adaptive_alpha, cfg.adaptive_mu)
    raise ValueError(f"objective.loss_weighting={cfg.loss_weighting!r}; choose fixed or adaptive")


def reduce_for_weighting(l_ce: Union[LossLike, Sequence[LossLike]], l_fm: Union[LossLike, Sequence[LossLike]],
                         group: Optional[dist.ProcessGroup] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean of each loss over every micro-batch of every rank of `group` that has the term.

    l_ce / l_fm: one loss per micro-batch of this rank (a sequence or 1-D tensor), or a scalar (counted as one
    entry). Inactive entries (0, non-finite) are left out of the mean; a term inactive everywhere comes back as 0,
    which `commit` treats as absent. Every rank gets the same values (one all-reduce of 4 float64 numbers).
    Without an initialised process group the local mean is returned.
    """
    def stack(x):
        if isinstance(x, torch.Tensor):
            return x.detach().double().reshape(-1)
        if isinstance(x, (list, tuple)):
            return torch.stack([_as_tensor(v).double().reshape(()) for v in x]) if x else torch.zeros(0).double()
        return torch.tensor([float(x)], dtype=torch.float64)

    ce, fm = stack(l_ce), stack(l_fm)
    device = ce.device if ce.numel() else fm.device
    if dist.is_available() and dist.is_initialized():
        device = collective_device(group)
    ce, fm = ce.to(device), fm.to(device)
    on_ce, on_fm = is_active(ce), is_active(fm)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    totals = torch.stack([torch.where(on_ce, ce, zero).sum(), on_ce.sum().double(),
                          torch.where(on_fm, fm, zero).sum(), on_fm.sum().double()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    mean_ce = totals[0] / totals[1].clamp(min=1.0)
    mean_fm = totals[2] / totals[3].clamp(min=1.0)
    return mean_ce.float(), mean_fm.float()
