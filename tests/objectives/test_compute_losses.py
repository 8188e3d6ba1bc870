"""compute_losses: the weighted total of one micro-batch, its breakdown, absent terms, and step_losses."""

from types import SimpleNamespace

import pytest
import torch

from megafusion.config.schema import ObjectiveConfig
from megafusion.data.synthetic import SyntheticDocuments, SyntheticSpec
from megafusion.objectives.cross_entropy import text_cross_entropy
from megafusion.objectives.flow_matching import flow_matching_loss, noise_batch
from megafusion.objectives.loss_weighting import AdaptiveWeighting, build_loss_weighting, reduce_for_weighting
from megafusion.objectives.losses import LossBreakdown, compute_losses, step_losses

VOCAB, PATCH = 64, 4


def _batch(kind="mixed", seed=0):
    spec = SyntheticSpec(vocab_size=VOCAB, seq_length=96, patch_dim=PATCH, patches_per_frame=4, kind=kind)
    batch = SyntheticDocuments(spec, seed).batch(2).validate()
    return noise_batch(batch, ObjectiveConfig(), torch.Generator().manual_seed(seed))


def _output(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch.seq_length, batch.batch_size, VOCAB, generator=g).requires_grad_(True)
    velocity = torch.randn(batch.num_latent_positions, PATCH, generator=g).requires_grad_(True)
    return SimpleNamespace(logits=logits, velocity=velocity)


def test_fixed_total_and_breakdown():
    batch = _batch()
    out = _output(batch)
    lb = compute_losses(out, batch, build_loss_weighting(ObjectiveConfig(ce_weight=0.5, fm_weight=3.0)))
    ce, n_ce = text_cross_entropy(out.logits, batch)
    fm, n_fm = flow_matching_loss(out.velocity, batch)
    assert torch.allclose(lb.total, 0.5 * ce + 3.0 * fm)
    assert torch.equal(lb.ce, ce.detach()) and torch.equal(lb.fm, fm.detach())
    assert lb.num_text_tokens.item() == n_ce.item() == batch.num_text_targets
    assert lb.num_latent_tokens.item() == n_fm.item() == int(batch.fm_loss_mask.sum())
    lb.total.backward()
    ref_v = out.velocity.grad.clone()
    out.velocity.grad = None
    (3.0 * flow_matching_loss(out.velocity, batch)[0]).backward()
    assert torch.allclose(ref_v, out.velocity.grad)
    log = lb.as_log_dict("train/")
    assert set(log) == {"train/loss", "train/loss_ce", "train/loss_fm", "train/weight_ce", "train/weight_fm",
                        "train/text_tokens", "train/latent_tokens"}
    assert all(isinstance(v, float) for v in log.values())
    assert log["train/weight_fm"] == 3.0 and log["train/loss"] == pytest.approx(lb.total.item())


def test_adaptive_weighted_terms_equal_centre():
    batch = _batch()
    lb = compute_losses(_output(batch), batch, AdaptiveWeighting(0.4, 0.9))
    b0 = 0.4 * lb.ce + 0.6 * lb.fm  # first step: B_0 = A_0
    assert torch.allclose(lb.ce_weight * lb.ce, b0) and torch.allclose(lb.fm_weight * lb.fm, b0)
    assert torch.allclose(lb.total.detach(), 2 * b0)


def test_text_only_batch_has_zero_fm_and_grad_flows():
    batch = _batch("text")
    assert batch.num_latent_positions == 0
    out = _output(batch)
    for weighting in (build_loss_weighting(ObjectiveConfig()), AdaptiveWeighting()):
        lb = compute_losses(out, batch, weighting)
        assert lb.fm.item() == 0.0 and lb.fm_weight.item() == 0.0 and lb.num_latent_tokens.item() == 0
        assert torch.isfinite(lb.total) and lb.total.requires_grad
    # without a velocity head output at all
    lb = compute_losses(SimpleNamespace(logits=out.logits, velocity=None), batch, AdaptiveWeighting())
    lb.total.backward()
    assert out.logits.grad.abs().sum() > 0


def test_missing_velocity_with_noised_rows_is_an_error():
    batch = _batch("image")
    out = _output(batch)
    with pytest.raises(ValueError, match="velocity"):
        compute_losses(SimpleNamespace(logits=out.logits, velocity=None), batch, AdaptiveWeighting())


def test_step_losses_feed_the_weighting_commit():
    w = AdaptiveWeighting(0.5, 0.9)
    breakdowns = [compute_losses(_output(b, s), b, w) for s, b in enumerate([_batch(seed=1), _batch("text", 2)])]
    assert isinstance(breakdowns[0], LossBreakdown)
    ce, fm = step_losses(breakdowns)
    assert ce.shape == (2,) and fm[1].item() == 0.0
    g_ce, g_fm = reduce_for_weighting(ce, fm)
    assert g_ce.item() == pytest.approx(ce.mean().item()) and g_fm.item() == pytest.approx(fm[0].item())
    b1 = w.commit(g_ce, g_fm)
    assert b1 == pytest.approx(0.5 * g_ce.item() + 0.5 * g_fm.item(), rel=1e-6)
