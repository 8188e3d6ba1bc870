"""The training loop under interruption: resume bit-exactness, SIGTERM, NaN policies, kill -9 mid-save,
resharding a checkpoint across tensor-parallel layouts, and the FLOPs-budget step count."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distributed import run_distributed
from loop_harness import BASE, run_train

pytestmark = [pytest.mark.slow]

KEYS = ("loss", "loss_ce", "loss_fm", "grad_norm", "lr")


def _exactly_equal(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in KEYS:
            assert x[key] == y[key], (key, x["step"], x[key], y[key])


def test_resume_is_bit_exact(tmp_path):
    straight = run_train(tmp_path, "straight", ["training.train_steps=4"])
    ckpt = [f"checkpoint.save_dir={tmp_path}/ckpt", "training.train_steps=4"]
    first = run_train(tmp_path, "first", ckpt + ["training.exit_interval=2"])
    assert [r["step"] for r in first] == [1, 2]
    assert os.path.isdir(tmp_path / "ckpt" / "iter_0000002")
    second = run_train(tmp_path, "second", ckpt + ["checkpoint.load=auto"])
    _exactly_equal(straight[:2], first)
    _exactly_equal(straight[2:], second)


# ---------------------------------------------------------------------------------------------- SIGTERM
def _sigterm_worker(rank, world_size, overrides, out_file):
    from megafusion.config import load_config
    from megafusion.training import loop

    original = loop.Trainer.train_step

    def train_step(self):
        values = original(self)
        if rank == 1 and self.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # only one rank is signalled
        return values

    loop.Trainer.train_step = train_step
    records = loop.train(load_config("tiny", overrides))
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump([r["step"] for r in records], f)


@pytest.mark.distributed
def test_sigterm_on_one_rank_stops_all_at_the_same_step(tmp_path):
    out = str(tmp_path / "steps")
    overrides = BASE + [f"training.run_dir={tmp_path}/run", f"checkpoint.save_dir={tmp_path}/ckpt",
                        "training.train_steps=5"]
    run_distributed(_sigterm_worker, 2, args=(overrides, out))  # raises unless both ranks exit cleanly
    steps = [json.load(open(f"{out}.{r}")) for r in range(2)]
    assert steps[0] == steps[1] == [1, 2]
    assert (tmp_path / "ckpt" / "latest").read_text().strip().endswith("iter_0000002")


# ---------------------------------------------------------------------------------------------- NaN
def _nan_worker(rank, world_size, overrides, out_file):
    import torch

    from megafusion.config import load_config
    from megafusion.training import forward_step, loop
    from megafusion.training.nan_guard import NonFiniteError

    state = {"step": 0}
    original_loss = forward_step._loss_func

    def poisoned(batch, weighting, output):
        loss, report = original_loss(batch, weighting, output)
        if rank == 1 and state["step"] == 2:
            loss = loss * float("nan")
            report["loss_fm"] = report["loss_fm"] * float("nan")
        return loss, report

    forward_step._loss_func = poisoned
    original_step = loop.Trainer.train_step
    checksums = []

    def train_step(self):
        state["step"] = self.state.step + 1
        values = original_step(self)
        with torch.no_grad():
            checksums.append(sum(float(p.double().sum()) for m in self.model for p in m.parameters()))
        return values

    loop.Trainer.train_step = train_step
    result = {"checksums": checksums}
    try:
        records = loop.train(load_config("tiny", overrides))
        result["skipped"] = [r["skipped_steps"] for r in records]
    except NonFiniteError as e:
        result["error"] = str(e)
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump(result, f)


@pytest.mark.distributed
@pytest.mark.parametrize("policy", ["skip", "halt"])
def test_nan_on_one_rank(tmp_path, policy):
    out = str(tmp_path / "nan")
    overrides = BASE + [f"training.run_dir={tmp_path}/run", f"checkpoint.save_dir={tmp_path}/ckpt",
                        "training.train_steps=3", f"training.nan_policy={policy}", "checkpoint.save_interval=1"]
    run_distributed(_nan_worker, 2, args=(overrides, out))
    results = [json.load(open(f"{out}.{r}")) for r in range(2)]
    published = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("iter_"))
    if policy == "skip":
        for res in results:
            assert res["skipped"] == [0, 1, 1]
            sums = res["checksums"]
            assert sums[1] == sums[0], "a skipped step must leave the weights unchanged"
            assert sums[2] != sums[1]
        # the save due on the skipped step 2 is taken (the last good state, data position past the bad batch)
        assert published == ["iter_0000002", "iter_0000003"]
    else:
        for res in results:
            assert "step 2" in res["error"] and "rank(s)" in res["error"] and "loss_fm" in res["error"]
            assert len(res["checksums"]) == 1
        assert published == ["iter_0000001"]


# ---------------------------------------------------------------------------------------------- kill -9
def test_kill9_during_save_then_resume(tmp_path):
    overrides = [o for o in BASE if not o.startswith("checkpoint.save_at_end")] + [
        "training.train_steps=4", "checkpoint.save_interval=1", f"checkpoint.save_dir={tmp_path}/ckpt"]
    cmd = [sys.executable, "-m", "megafusion.cli", "train", "--config", "tiny", *overrides]
    # one intra-op thread, like the run_train processes (tests/distributed.py): the checkpoint this run leaves
    # must hold bitwise the weights a 1-thread run computes, or the resumed run cannot match the straight one
    proc = subprocess.Popen(cmd + [f"training.run_dir={tmp_path}/killed"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt = tmp_path / "ckpt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill while the second checkpoint is being staged
            if ckpt.is_dir() and any(p.name.startswith("tmp.iter_0000002") for p in ckpt.iterdir()):
                break
            time.sleep(0.005)
        else:
            pytest.fail("the run never started writing its second checkpoint")
    finally:
        proc.kill()
        proc.wait()
    assert (ckpt / "latest").read_text().strip().endswith("iter_0000001")
    resumed = run_train(tmp_path, "resumed", overrides + ["checkpoint.load=auto"])
    straight = run_train(tmp_path, "straight", [o for o in overrides if "save" not in o])
    assert resumed[0]["step"] == 2
    _exactly_equal(straight[1:], resumed)
    assert not any(p.name.startswith("tmp.") for p in ckpt.iterdir())


# ---------------------------------------------------------------------------------------------- reshard
def _eval_worker(rank, world_size, overrides, out_file):
    from megafusion.config import load_config
    from megafusion.parallel.initialize import destroy_parallel, initialize_parallel
    from megafusion.training.loop import Trainer

    cfg = load_config("tiny", overrides)
    trainer = Trainer(cfg, initialize_parallel(cfg.parallel, cfg.training.seed))
    try:
        loss = trainer.evaluate()
    finally:
        destroy_parallel()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(loss, f)


@pytest.mark.distributed
def test_reshard_tp2_checkpoint_to_tp1(tmp_path):
    ckpt = f"checkpoint.save_dir={tmp_path}/ckpt"
    run_train(tmp_path, "tp2", [ckpt, "training.train_steps=2", "checkpoint.save_at_end=true",
                                "parallel.tensor_model_parallel_size=2"], world_size=2)
    load = [f"checkpoint.load={tmp_path}/ckpt/iter_0000002", "checkpoint.load_optimizer=false",
            "training.train_steps=2", "training.eval_steps=2", f"training.run_dir={tmp_path}/eval"]
    losses = {}
    for tp in (2, 1):
        out = str(tmp_path / f"eval_tp{tp}.json")
        run_distributed(_eval_worker, tp, args=(BASE + load + [f"parallel.tensor_model_parallel_size={tp}"], out))
        losses[tp] = json.load(open(out))
    assert losses[1] == pytest.approx(losses[2], rel=1e-5)


# ---------------------------------------------------------------------------------------------- FLOPs budget
def test_flops_budget_sets_step_count(tmp_path):
    from megafusion.config import load_config
    from megafusion.model import build_transformer_config
    from megafusion.training.flops import TokenMix, flops_per_step

    cfg = load_config("tiny", BASE)
    per_step = flops_per_step(build_transformer_config(cfg), TokenMix.estimate(cfg, latent_fraction=0.5))
    records = run_train(tmp_path, "budget", ["training.train_steps=null", f"training.flops_budget={3.5 * per_step}"])
    assert [r["step"] for r in records] == [1, 2, 3]
