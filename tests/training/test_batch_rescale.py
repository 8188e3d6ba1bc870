"""optimizer.sde_rescale (training/batch_rescale.py): kappa and the rescaled AdamW values on hand-computed cases,
the identity when nothing changes, the critical-batch refusal, and a training run that runs the rescaled values
while its saved config keeps the tuned ones."""

from __future__ import annotations

import math

import pytest
import yaml

from megafusion.config import load_config
from megafusion.training.batch_rescale import critical_batch, kappa, rescale, rescaled_config


def test_kappa_by_hand():
    assert kappa(256, 128, 1e9, 1e9, 0.44) == pytest.approx(2.0)
    assert kappa(256, 128, 1e9, 4e9, 0.44) == pytest.approx(2.0 * 4 ** 0.44)
    assert kappa(64, 128, 2e9, 1e9, 0.5) == pytest.approx(0.5 * 0.5 ** 0.5)
    assert critical_batch(1e9, 1000, 100) == pytest.approx(1e4)
    with pytest.raises(ValueError, match="positive logical_batch"):
        kappa(8, 0, 1, 1, 0.44)


def test_rescaled_values():
    # global batch 4 sequences of 128 tokens x 10 steps = 5120 tokens; tuned at batch 2 and 4 x the tokens
    cfg = load_config("tiny", ["training.train_steps=10", "optimizer.sde_rescale.logical_batch_size=2",
                               "optimizer.sde_rescale.base_tokens=20480", "optimizer.groups.mlp.eps=1e-6"])
    k = 2.0 * 4 ** 0.44
    r = rescale(cfg, 10)
    assert r.kappa == pytest.approx(k)
    o = cfg.optimizer
    assert r.lr == pytest.approx(o.lr * math.sqrt(k)) and r.min_lr == pytest.approx(o.min_lr * math.sqrt(k))
    assert r.adam_beta1 == pytest.approx(o.adam_beta1 ** k) and r.adam_beta2 == pytest.approx(o.adam_beta2 ** k)
    assert r.adam_eps == pytest.approx(o.adam_eps / math.sqrt(k))
    out = rescaled_config(cfg, 10)
    assert out.optimizer.lr == pytest.approx(r.lr) and out.optimizer.weight_decay == o.weight_decay
    assert out.optimizer.groups.mlp.eps == pytest.approx(1e-6 / math.sqrt(k))
    assert cfg.optimizer.lr == o.lr and cfg.optimizer.groups.mlp.eps == 1e-6  # the input is untouched


def test_identity_and_off():
    cfg = load_config("tiny", ["optimizer.sde_rescale.logical_batch_size=4"])  # = the global batch, same horizon
    r = rescale(cfg, 30)
    assert r.kappa == pytest.approx(1.0) and r.lr == pytest.approx(cfg.optimizer.lr)
    off = load_config("tiny")
    assert rescale(off, 30) is None and rescaled_config(off, 30) is off


def test_a_physical_batch_above_the_critical_batch_is_refused():
    # D = 30 steps x 4 x 128 = 15360 tokens; S_crit = 60 -> B_crit = 15360 / (128 x 60) = 2 sequences < 4
    cfg = load_config("tiny", ["optimizer.sde_rescale.logical_batch_size=2", "optimizer.sde_rescale.critical_steps=60"])
    with pytest.raises(ValueError, match=r"training\.global_batch_size=4 is above the critical batch"):
        rescale(cfg, 30)
    ok = load_config("tiny", ["optimizer.sde_rescale.logical_batch_size=2", "optimizer.sde_rescale.critical_steps=20"])
    assert rescale(ok, 30).critical_batch == pytest.approx(6.0)


def test_training_runs_the_rescaled_schedule(tmp_path):
    from megafusion.training.loop import train

    run = tmp_path / "run"
    records = train(load_config("tiny", [
        "optimizer.sde_rescale.logical_batch_size=2", "optimizer.warmup_steps=1", "training.train_steps=2",
        f"training.run_dir={run}", "data.num_workers=0", "logging.tensorboard=false"]))
    # kappa = 4 / 2 = 2 (same horizon): after the one warmup step the rate is the rescaled peak lr * sqrt(2)
    assert records[0]["lr"] == pytest.approx(1e-3 * math.sqrt(2))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optimizer"]["lr"] == pytest.approx(1e-3)  # the tuned value, not the rescaled one
