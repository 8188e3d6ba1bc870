"""Loss weighting: fixed arithmetic, the adaptive EMA formula step by step, missing terms, state round trip.
(The EMA on 2 data-parallel ranks with different local losses: test_objectives_distributed.py.)"""

import pytest
import torch

from megafusion.config.schema import ObjectiveConfig
from megafusion.objectives.loss_weighting import (
    AdaptiveWeighting,
    FixedWeighting,
    build_loss_weighting,
    reduce_for_weighting,
)

ALPHA, MU = 0.3, 0.9


def _stream(n=12, seed=0):
    """Synthetic (L_ce, L_fm) per step: CE decays from ~8, FM hovers near 0.5 — very different scales."""
    g = torch.Generator().manual_seed(seed)
    ce = 8.0 * torch.exp(-0.1 * torch.arange(n)) + 0.1 * torch.rand(n, generator=g)
    fm = 0.5 + 0.05 * torch.randn(n, generator=g)
    return ce.tolist(), fm.tolist()


def test_build_from_config():
    assert isinstance(build_loss_weighting(ObjectiveConfig()), FixedWeighting)
    w = build_loss_weighting(ObjectiveConfig(loss_weighting="adaptive", adaptive_alpha=ALPHA, adaptive_mu=MU))
    assert isinstance(w, AdaptiveWeighting) and (w.alpha, w.mu) == (ALPHA, MU)


def test_fixed_weighting_arithmetic():
    w = build_loss_weighting(ObjectiveConfig(ce_weight=0.7, fm_weight=2.5))
    ce = torch.tensor(3.0, requires_grad=True)
    fm = torch.tensor(0.4, requires_grad=True)
    w_ce, w_fm = w.weights(ce.detach(), fm.detach())
    total = w_ce * ce + w_fm * fm
    assert total.item() == pytest.approx(0.7 * 3.0 + 2.5 * 0.4)
    total.backward()
    assert ce.grad.item() == pytest.approx(0.7) and fm.grad.item() == pytest.approx(2.5)
    # an absent term (count 0) gets weight 0
    assert w.weights(torch.tensor(3.0), torch.tensor(0.0), 10, 0)[1].item() == 0.0
    w.commit(3.0, 0.4)
    assert w.state_dict() == {"kind": "fixed"}


def test_adaptive_follows_formula_step_by_step():
    ce, fm = _stream()
    w = AdaptiveWeighting(ALPHA, MU)
    b_prev = None
    for k, (l_ce, l_fm) in enumerate(zip(ce, fm)):
        a_k = ALPHA * l_ce + (1 - ALPHA) * l_fm
        b_k = a_k if b_prev is None else MU * b_prev + (1 - MU) * a_k  # B_0 = A_0
        w_ce, w_fm = w.weights(torch.tensor(l_ce), torch.tensor(l_fm))
        assert w_ce.item() == pytest.approx(b_k / l_ce, rel=1e-5)
        assert w_fm.item() == pytest.approx(b_k / l_fm, rel=1e-5)
        # each weighted term equals B_k in value
        assert (w_ce * l_ce).item() == pytest.approx(b_k, rel=1e-5)
        assert (w_fm * l_fm).item() == pytest.approx(b_k, rel=1e-5)
        committed = w.commit(l_ce, l_fm)  # one micro-batch, one rank: local = global
        assert committed == pytest.approx(b_k, rel=1e-12)
        b_prev = b_k
    assert w.num_updates == len(ce)
    # the centre moved towards alpha*CE + (1-alpha)*FM while CE fell: the weights rebalance the two terms
    assert w.weights(torch.tensor(ce[-1]), torch.tensor(fm[-1]))[0].item() > 1 / ce[-1]


def test_adaptive_weights_are_detached_scalars():
    w = AdaptiveWeighting(ALPHA, MU)
    ce = torch.tensor(2.0, requires_grad=True)
    w_ce, w_fm = w.weights(ce, torch.tensor(1.0))
    assert not w_ce.requires_grad and not w_fm.requires_grad and w_ce.dim() == 0


def test_adaptive_missing_term():
    w = AdaptiveWeighting(ALPHA, MU)
    # before the EMA exists a lone term keeps weight 1, the missing one gets 0
    w_ce, w_fm = w.weights(torch.tensor(4.0), torch.tensor(0.0), 100, 0)
    assert (w_ce.item(), w_fm.item()) == (1.0, 0.0)
    assert w.commit(4.0, 0.0) is None and w.num_partial == 1 and w.num_updates == 0
    w.commit(4.0, 0.5)
    b1 = ALPHA * 4.0 + (1 - ALPHA) * 0.5
    assert w.ema == pytest.approx(b1)
    # a step without latents: CE held at B_{k-1}, FM weight 0, EMA unchanged; no inf / nan anywhere
    w_ce, w_fm = w.weights(torch.tensor(2.0), torch.tensor(0.0), 100, 0)
    assert w_ce.item() == pytest.approx(b1 / 2.0) and w_fm.item() == 0.0
    w_ce, w_fm = w.weights(torch.tensor(0.0), torch.tensor(0.8), 0, 100)
    assert w_ce.item() == 0.0 and w_fm.item() == pytest.approx(b1 / 0.8)
    assert w.commit(2.0, 0.0) == pytest.approx(b1)
    assert w.commit(float("nan"), 0.5) == pytest.approx(b1)  # a non-finite step never enters the EMA
    assert w.ema == pytest.approx(b1) and w.num_partial == 3


def test_adaptive_state_dict_round_trip():
    ce, fm = _stream(10, seed=1)
    a = AdaptiveWeighting(ALPHA, MU)
    for l_ce, l_fm in zip(ce[:5], fm[:5]):
        a.commit(l_ce, l_fm)
    state = a.state_dict()
    b = AdaptiveWeighting(ALPHA, MU)
    b.load_state_dict(state)
    assert b.state_dict() == state
    for l_ce, l_fm in zip(ce[5:], fm[5:]):
        wa = a.weights(torch.tensor(l_ce), torch.tensor(l_fm))
        wb = b.weights(torch.tensor(l_ce), torch.tensor(l_fm))
        assert torch.equal(wa[0], wb[0]) and torch.equal(wa[1], wb[1])
        assert a.commit(l_ce, l_fm) == b.commit(l_ce, l_fm)
    with pytest.raises(ValueError, match="loss_weighting"):
        AdaptiveWeighting().load_state_dict(FixedWeighting().state_dict())


def test_reduce_for_weighting_single_process_means_over_present_microbatches():
    ce, fm = reduce_for_weighting([2.0, 4.0, 0.0], torch.tensor([0.0, 0.5, 1.5]))
    assert ce.item() == pytest.approx(3.0) and fm.item() == pytest.approx(1.0)
    ce, fm = reduce_for_weighting(2.0, 0.0)
    assert ce.item() == 2.0 and fm.item() == 0.0
