"""NaN / Inf guard: every rank agrees, in the same step, whether the step's losses and gradient norm are finite.

    guard = NanGuard(policy=cfg.training.nan_policy)       # "skip" or "halt"
    for step in ...:
        losses = forward_backward(...)                      # {"ce": ..., "fm": ..., "aux": ...} (this rank's view)
        optimizer.prepare_grads()                           # megatron: main grads ready, nothing applied yet
        grad_norm = optimizer.get_grad_norm()               # before any update
        if not guard.check(step, losses, grad_norm):        # collective; raises NonFiniteError under "halt"
            continue                                        # skipped: no update, no EMA / scheduler step
        optimizer.step()                                    # clips and applies the update
        ... scheduler.step(); weighting.update(...); maybe save_checkpoint(..., nan_guard=guard)

`check_finite(loss_values, grad_norm, group)` is the collective primitive: one all-reduce (MAX) of a single flag
per call, so every rank takes the same branch; only when some rank saw a non-finite value does a second round
(all_gather_object) collect which ranks and which terms, for the message. Ranks may pass different loss terms
(with pipeline parallelism only the last stage has losses; others pass {}), and any term may be a python float or
a tensor of any shape.

Policies:
  skip  the update is not applied: the loop must not call optimizer.step(), not advance the LR scheduler, not
        update the loss-weighting EMA (a NaN would poison it); the step counter and data position do advance (the
        bad batch is consumed, not replayed). Counted in `guard.skipped` and logged on rank 0.
  halt  NonFiniteError naming the step, the rank(s) and the loss term(s) (or grad_norm), raised on every rank.

Checkpoints after a bad step (`guard.assert_checkpoint_allowed(step)`, which
megafusion.checkpoint.save_checkpoint(..., nan_guard=guard) calls):
  skip  allowed. A skipped step changes no weight, optimizer moment, LR-schedule position or loss-weighting EMA, so
        the state saved is exactly the last good step's, with the counters of the step just taken (step,
        skipped_steps) and the data position past the bad batch: a resume continues exactly as the run would have,
        and never replays the bad batch. A save that is due on a skipped step (save_interval, exit_interval, a stop
        signal, the end of training) is therefore taken, not lost. save_checkpoint still refuses when any rank's
        weights hold NaN/Inf.
  halt  CheckpointRefused: the run stops at the bad step, and nothing may be saved for it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Union

import torch
import torch.distributed as dist

from megafusion.parallel.initialize import collective_device

logger = logging.getLogger(__name__)

NAN_POLICIES = ("skip", "halt")
GRAD_NORM = "grad_norm"

Number = Union[float, int, torch.Tensor, None]


class NonFiniteError(RuntimeError):
    """A loss term or the gradient norm was NaN/Inf under nan_policy=halt."""


@dataclass
class FiniteCheck:
    """The verdict of one check, identical on every rank of the group."""

    ok: bool
    bad_ranks: List[int] = field(default_factory=list)
    """Global ranks that saw a non-finite value (empty when ok)."""
    bad_terms: List[str] = field(default_factory=list)
    """Names of the non-finite loss terms, and "grad_norm" when the norm was not finite (empty when ok)."""
    detail: List[str] = field(default_factory=list)
    """One "rank R: term, term" line per bad rank."""

    def describe(self) -> str:
        return "; ".join(self.detail) if self.detail else "all finite"


def _is_finite(value: Number) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all().item())
    return math.isfinite(float(value))



def local_bad_terms(loss_values: Mapping[str, Number], grad_norm: Number) -> List[str]:
    """The names of this rank's non-finite values (no communication)."""
    bad = [name for name, value in sorted(loss_values.items()) if not _is_finite(value)]
    if not _is_finite(grad_norm):
        bad.append(GRAD_NORM)
    return bad


def check_finite(loss_values: Mapping[str, Number], grad_norm: Number = None, group=None) -> FiniteCheck:
    """Collective over `group` (None: the world): are every rank's loss terms and gradient norm finite?"""
    bad = local_bad_terms(loss_values, grad_norm)
    if not dist.is_initialized():
        return FiniteCheck(ok=not bad, bad_ranks=[0] if bad else [], bad_terms=bad,
                           detail=[f"rank 0: {', '.join(bad)}"] if bad else [])
    flag = torch.tensor([1 if bad else 0], dtype=torch.int32, device=collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not flag.item():
        return FiniteCheck(ok=True)
    gathered: List[Optional[tuple]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (dist.get_rank(), bad), group=group)
    bad_ranks, terms, detail = [], [], []
    for rank, names in gathered:
        if names:
            bad_ranks.append(rank)
            detail.append(f"rank {rank}: {', '.join(names)}")
            terms.extend(n for n in names if n not in terms)
    return FiniteCheck(ok=False, bad_ranks=bad_ranks, bad_terms=terms, detail=detail)


class NanGuard:
    """Applies a nan policy to each step's check and remembers whether a checkpoint is allowed."""

    def __init__(self, policy: str = "halt"):
        if policy not in NAN_POLICIES:
            raise ValueError(f"training.nan_policy={policy!r} is not one of {list(NAN_POLICIES)}")
        self.policy = policy
        self.skipped = 0
        """Steps skipped so far in this process's run (TrainState.skipped_steps carries it across restarts)."""
        self.last_step: Optional[int] = None
        self.last_ok = True
        self.last_check: Optional[FiniteCheck] = None

    def check(self, step: int, loss_values: Mapping[str, Number], grad_norm: Number = None, group=None) -> bool:
        """Collective: True when the step's update may be applied; False (skip) or NonFiniteError (halt)."""
        verdict = check_finite(loss_values, grad_norm, group)
        self.last_step, self.last_ok, self.last_check = step, verdict.ok, verdict
        if verdict.ok:
            return True
        message = (f"step {step}: non-finite {', '.join(verdict.bad_terms)} on rank(s) "
                   f"{', '.join(map(str, verdict.bad_ranks))} ({verdict.describe()})")
        if self.policy == "halt":
            raise NonFiniteError(f"{message}. training.nan_policy=halt stops here, before the update; no "
                                 f"checkpoint is written for this step. Resume from the last checkpoint (lower "
                                 f"the learning rate or inspect the data at this step), or set "
                                 f"training.nan_policy=skip to skip such steps.")
        self.skipped += 1
        if not dist.is_initialized() or dist.get_rank() == 0:
            logger.warning("%s: update skipped (training.nan_policy=skip; %d skipped so far)", message, self.skipped)
        return False

    def assert_checkpoint_allowed(self, step: int) -> None:
        """Raise CheckpointRefused when the most recent checked step was not finite under nan_policy=halt.

        Under skip the bad step's update was not applied, so the state is the last good one and may be saved (the
        weights are checked for NaN/Inf by save_checkpoint itself)."""
        if self.last_ok or self.policy == "skip":
            return
        from megafusion.checkpoint.checkpointer import CheckpointRefused

        raise CheckpointRefused(
            f"not saving a checkpoint at step {step}: step {self.last_step} had non-finite values "
            f"({self.last_check.describe() if self.last_check else '?'}) and training.nan_policy=halt stops there; "
            f"resume from the last checkpoint, or use training.nan_policy=skip to skip such steps and keep saving")
