"""FlowMatchScheduler: integrate an image's latents from noise (t = 0) to clean (t = 1) along the model's velocity.

A small object in the shape of diffusers' schedulers:

    scheduler = FlowMatchScheduler(solver="euler", shift=1.0)
    scheduler.set_timesteps(25)
    x = noise
    for t in scheduler.timesteps:            # the flow times at which the model is evaluated, in order
        x = scheduler.step(velocity(x, t), t, x)
    # x is the sample at t = 1

Convention (megafusion's, docs/objectives.md): t = 1 is clean, z_t = t * z1 + (1 - t) * z0 and the model predicts
v = dz/dt = z1 - z0, so a step is x <- x + (t_next - t) * v. diffusers' flow-match schedulers use the noise level
sigma = 1 - t and a model output dx/dsigma = -v; the two give the same trajectory (tests/inference/test_scheduler.py
checks it against FlowMatchEulerDiscreteScheduler).

The grid: t_i = i / N for i = 0..N, then the shift t' = t / (t + s * (1 - t)) (megafusion.objectives.flow_matching
.shift_timesteps, the same form training samples with; in sigma terms diffusers' s * sigma / (1 + (s - 1) * sigma)).
Solvers:
  euler     x_{i+1} = x_i + h v(x_i, t_i)                                    N model calls
  heun      x~ = x_i + h v1, v2 = v(x~, t_{i+1}), x_{i+1} = x_i + h (v1 + v2) / 2      2N calls (the last at t = 1)
  midpoint  x~ = x_i + h/2 v1, v2 = v(x~, t_i + h/2), x_{i+1} = x_i + h v2          2N calls
For the second-order solvers `timesteps` lists both evaluation times of each step and `step` returns the
intermediate point after the first call of a step (like diffusers' Heun scheduler), so the loop above is the same.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megafusion.inference.settings import SOLVERS
from megafusion.objectives.flow_matching import shift_timesteps


class FlowMatchScheduler:
    def __init__(self, solver: str = "euler", shift: float = 1.0):
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r} is not one of {list(SOLVERS)}")
        self.solver = solver
        self.shift = float(shift)
        self.order = 1 if solver == "euler" else 2
        self.grid: Optional[torch.Tensor] = None  # [N + 1] flow times from 0 to 1
        self.timesteps: List[float] = []
        self._index = 0
        self._x0: Optional[torch.Tensor] = None  # a second-order step's starting point
        self._v1: Optional[torch.Tensor] = None  # its first velocity

    def set_timesteps(self, num_inference_steps: int) -> None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
        grid = torch.linspace(0.0, 1.0, num_inference_steps + 1, dtype=torch.float64)
        self.grid = shift_timesteps(grid, self.shift)
        g = self.grid.tolist()
        if self.solver == "euler":
            self.timesteps = g[:-1]
        elif self.solver == "heun":
            self.timesteps = [t for a, b in zip(g[:-1], g[1:]) for t in (a, b)]
        else:
            self.timesteps = [t for a, b in zip(g[:-1], g[1:]) for t in (a, (a + b) / 2)]
        self._index, self._x0, self._v1 = 0, None, None

    @property
    def num_steps(self) -> int:
        return 0 if self.grid is None else self.grid.numel() - 1

    def step(self, velocity: torch.Tensor, timestep: float, sample: torch.Tensor) -> torch.Tensor:
        """One model evaluation's update: returns the next point to evaluate (or, after the last, the sample at
        t = 1). `timestep` must be the current entry of `timesteps` (checked, so a loop that skips one fails)."""
        if self.grid is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        if self._index >= len(self.timesteps):
            raise RuntimeError(f"step() called {self._index + 1} times for {len(self.timesteps)} timesteps")
        expected = self.timesteps[self._index]
        if abs(float(timestep) - expected) > 1e-9:
            raise ValueError(f"step() got t={float(timestep)} but the next timestep is {expected}")
        i, sub = divmod(self._index, self.order)
        self._index += 1
        h = float(self.grid[i + 1] - self.grid[i])
        dtype = torch.promote_types(sample.dtype, torch.float32)  # integrate in fp32 at least (fp64 stays fp64)
        x, v = sample.to(dtype), velocity.to(dtype)
        if self.order == 1:
            return x + h * v
        if sub == 0:  # first call of a second-order step: go to the intermediate point
            self._x0, self._v1 = x, v
            return x + (h if self.solver == "heun" else h / 2) * v
        x0, v1 = self._x0, self._v1
        self._x0 = self._v1 = None
        if self.solver == "heun":
            return x0 + h * 0.5 * (v1 + v)
        return x0 + h * v
