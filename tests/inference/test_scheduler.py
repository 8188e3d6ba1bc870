"""FlowMatchScheduler: exact on straight paths, first / second order on a curved field, the same trajectory as
diffusers' FlowMatchEulerDiscreteScheduler (sigma = 1 - t, model output -v), and misuse errors."""

from __future__ import annotations

import pytest
import torch

from megafusion.inference.scheduler import FlowMatchScheduler
from megafusion.objectives.flow_matching import shift_timesteps


def integrate(scheduler: FlowMatchScheduler, velocity, x, steps: int) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t), t, x)
    return x


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_exact_endpoint_on_a_straight_path(solver, shift):
    # z_t = t * z1 + (1 - t) * z0 has the constant velocity z1 - z0: every solver lands exactly on z1
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    out = integrate(FlowMatchScheduler(solver, shift), lambda x, t: z1 - z0, z0.clone(), steps=3)
    torch.testing.assert_close(out, z1, atol=1e-12, rtol=0)


def curved(x, t):
    return x * x + t  # a Riccati field with no symmetry that could cancel the leading error term


def exact_curved(x0: float) -> float:
    # reference solution by a fine classical RK4 in float64
    x, n = x0, 20000
    h = 1.0 / n
    for i in range(n):
        t = i * h
        k1 = x * x + t
        k2 = (x + h / 2 * k1) ** 2 + t + h / 2
        k3 = (x + h / 2 * k2) ** 2 + t + h / 2
        k4 = (x + h * k3) ** 2 + t + h
        x += h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_convergence_order_on_a_curved_field(solver, order):
    x0 = torch.tensor([0.3, -0.5], dtype=torch.float64)  # float64 samples are integrated in float64
    exact = torch.tensor([exact_curved(0.3), exact_curved(-0.5)], dtype=torch.float64)
    errors = []
    for steps in (8, 16, 32):
        out = integrate(FlowMatchScheduler(solver), curved, x0.clone(), steps)
        errors.append(float((out - exact).abs().max()))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    for ratio in ratios:
        assert 2 ** order * 0.8 < ratio < 2 ** order * 1.25, (solver, errors, ratios)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_matches_diffusers_flow_match_euler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = 10
    ours = FlowMatchScheduler("euler", shift)
    ours.set_timesteps(steps)
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift)
    # diffusers' noise levels sigma = 1 - t of the unshifted grid t_i = i / N; it applies the same shift itself
    theirs.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)])
    torch.testing.assert_close(1.0 - theirs.sigmas[:-1], torch.tensor(ours.timesteps, dtype=torch.float32))

    def v(x, t):  # megafusion's velocity dz/dt; diffusers' model output is dz/dsigma = -v
        return torch.sin(x) * (1.0 + t)

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    a, b = x.clone(), x.clone()
    for t, sigma_t in zip(ours.timesteps, theirs.timesteps):
        a = ours.step(v(a, t), t, a)
        sigma = theirs.sigmas[theirs.step_index if theirs.step_index is not None else 0]
        b = theirs.step(-v(b, 1.0 - float(sigma)), sigma_t, b).prev_sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_shift_is_the_training_objectives_shift():
    s = FlowMatchScheduler("euler", 3.0)
    s.set_timesteps(4)
    expected = shift_timesteps(torch.linspace(0, 1, 5, dtype=torch.float64), 3.0)
    torch.testing.assert_close(s.grid, expected)
    assert s.timesteps[0] == 0.0 and s.grid[-1] == 1.0 and s.num_steps == 4


def test_second_order_timesteps_and_misuse_errors():
    heun = FlowMatchScheduler("heun")
    heun.set_timesteps(2)
    assert heun.timesteps == [0.0, 0.5, 0.5, 1.0]
    mid = FlowMatchScheduler("midpoint")
    mid.set_timesteps(2)
    assert mid.timesteps == [0.0, 0.25, 0.5, 0.75]
    x = torch.zeros(2)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        FlowMatchScheduler().step(x, 0.0, x)
    with pytest.raises(ValueError, match="the next timestep is 0.5"):
        heun.step(x, 0.0, x)
        heun.step(x, 1.0, x)
    with pytest.raises(ValueError, match="solver='rk4'"):
        FlowMatchScheduler("rk4")
