"""UnmaskingScheduler: how many masked positions each step of masked-diffusion sampling reveals, and which.

A small object in the shape of diffusers' schedulers (and of megafusion.inference.scheduler.FlowMatchScheduler):

    scheduler = UnmaskingScheduler()
    scheduler.set_timesteps(num_steps=12, num_masked=256, schedule="cosine")
    for t in scheduler.timesteps:                       # one model call per entry
        masked = positions still MASK                   # scheduler.remaining[i] of them
        tokens = scheduler.step(logits[masked], masked, tokens, generator).tokens

Counts: the sampler walks the training forward process backwards on the grid t_k = 1 - k/N (k = 0..N): after step
k the number of positions still masked is round(num_masked * beta(t_k)), beta the schedule of
megafusion.objectives.masked_diffusion.schedule_beta (linear t, cosine sin(pi t / 2), polynomial t^a), then
corrected so that every step reveals at least one position and the last step reveals the rest. With fewer masked
positions than steps, N is cut to num_masked (one position per step; more steps would call the model for nothing).
Note the direction: beta(t) on t = 1 -> 0 makes the concave cosine schedule reveal few positions first and many at
the end (MaskGIT's cos(pi/2 * k/N) masked ratio), and the convex polynomial schedules (a > 1) the reverse.

A step samples a candidate for every masked position from the model's distribution restricted to `allowed_ids`
(the other ids get probability 0), with temperature / top-k / top-p as megafusion.inference.sampling does for text
(temperature 0 = argmax), then keeps k of them:
  confidence   the k whose candidate has the highest model probability (softmax of the restricted logits at
               temperature 1): LLaDA's low-confidence remasking, MaskGIT's confidence ordering; ties go to the
               earlier position;
  random       k positions drawn uniformly (LLaDA's "random" remasking).
The rest stay MASK. All draws use the caller's generator on the CPU, a number fixed by (n, V) and the settings, so
a sample's draws do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from megafusion.inference.sampling import filtered_probs
from megafusion.objectives.masked_diffusion import SCHEDULES, schedule_beta

ORDERS = ("confidence", "random")


@dataclass
class UnmaskingStepOutput:
    tokens: torch.Tensor
    """The updated copy of the tokens passed to step()."""
    revealed: torch.Tensor
    """Positions (entries of masked_positions) revealed by this step, in the order of masked_positions."""


class UnmaskingScheduler:
    def __init__(self):
        self.timesteps: List[float] = []  # t_k of the model call of each step, from 1 down
        self.remaining: List[int] = []  # positions still masked before step k (N + 1 entries, the last 0)
        self.reveal_counts: List[int] = []  # positions revealed by step k
        self._index = 0

    def set_timesteps(self, num_steps: int, num_masked: int, schedule: str = "linear", exponent: float = 1.0) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        if num_masked < 0:
            raise ValueError(f"num_masked={num_masked} must be >= 0")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown unmasking schedule {schedule!r}; choose one of {list(SCHEDULES)}")
        n_steps = min(num_steps, num_masked)
        grid = 1.0 - torch.arange(n_steps + 1, dtype=torch.float64) / max(n_steps, 1)
        target = torch.round(num_masked * schedule_beta(schedule, grid, exponent)).long().tolist()
        remaining = [num_masked]
        for k in range(1, n_steps + 1):  # >= 1 revealed per step, and enough left for one per later step
            remaining.append(max(min(target[k], remaining[-1] - 1), n_steps - k))
        self.timesteps = grid[:n_steps].tolist()
        self.remaining = remaining
        self.reveal_counts = [a - b for a, b in zip(remaining[:-1], remaining[1:])]
        self._index = 0

    @property
    def num_steps(self) -> int:
        return len(self.reveal_counts)

    @property
    def step_index(self) -> int:
        """Steps taken since set_timesteps."""
        return self._index

    @property
    def done(self) -> bool:
        return self._index >= self.num_steps

    def step(self, logits: torch.Tensor, masked_positions: torch.Tensor, tokens: torch.Tensor,
             generator: Optional[torch.Generator] = None, order: str = "confidence", temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, allowed_ids: Optional[torch.Tensor] = None) -> UnmaskingStepOutput:
        """Reveal this step's count of the positions `masked_positions` [n] of `tokens` (1-D ids) from
        logits [n, V] (or log-probabilities) at those positions; returns a new tensor, `tokens` is not changed."""
        if self.done:
            raise RuntimeError(f"step() called {self._index + 1} times for {self.num_steps} steps "
                               f"(call set_timesteps first)")
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not one of {list(ORDERS)}")
        n = int(masked_positions.numel())
        if logits.dim() != 2 or logits.shape[0] != n:
            raise ValueError(f"logits have shape {tuple(logits.shape)}, expected [{n}, V] (one row per masked "
                             f"position)")
        if n != self.remaining[self._index]:
            raise ValueError(f"step {self._index} expects {self.remaining[self._index]} masked positions, got {n}")
        k = self.reveal_counts[self._index]
        self._index += 1
        if allowed_ids is None:
            allowed_ids = torch.arange(logits.shape[1])
        allowed_ids = allowed_ids.long().cpu()
        scores = logits[:, allowed_ids.to(logits.device)].float().cpu()  # [n, A]
        confidence_probs = torch.softmax(scores, dim=-1)
        if temperature == 0.0:
            candidates = torch.argmax(scores, dim=-1)
        else:
            probs = filtered_probs(scores, temperature, top_k, top_p)
            candidates = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if order == "confidence":
            confidence = confidence_probs.gather(1, candidates[:, None]).squeeze(1)
            chosen = torch.sort(confidence, descending=True, stable=True).indices[:k]
        else:
            chosen = torch.randperm(n, generator=generator)[:k]
        chosen = torch.sort(chosen).values
        positions = masked_positions.long().cpu()[chosen]
        out = tokens.clone()
        out[positions.to(out.device)] = allowed_ids[candidates[chosen]].to(device=out.device, dtype=out.dtype)
        return UnmaskingStepOutput(tokens=out, revealed=positions)
