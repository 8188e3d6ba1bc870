"""Save -> load of model + optimizer (DistributedOptimizer, and a non-distributed one) + LR schedule + loss-weighting EMA + data position + RNG is
bit-exact, and training continues exactly as if it had never stopped. One process (gloo)."""

import json
import os
import random

import numpy as np
import pytest
import torch

from distributed import run_distributed


def _draws():
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():  # megatron's model-parallel stream (dropout under TP)
        tracked = float(torch.rand(1))
    return [random.random(), float(np.random.rand()), float(torch.rand(1)), tracked]


def _roundtrip_worker(rank, world_size, root):
    results = {name: _roundtrip(os.path.join(root, name), distributed)
               for name, distributed in (("distributed", True), ("param_space", False))}
    with open(os.path.join(root, "result.json"), "w") as f:
        json.dump(results, f)


def _roundtrip(root, distributed_optimizer):
    from ckpt_harness import build, full_weights, make_cfg, optimizer_tensors, train_step

    from megafusion.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from megafusion.checkpoint.publish import find_latest, list_published
    from megafusion.config.schema import ObjectiveConfig
    from megafusion.objectives.loss_weighting import build_loss_weighting

    cfg = make_cfg(tp=1, distributed_optimizer=distributed_optimizer)
    chunks, optimizer, scheduler = build(cfg, seed=1)
    weighting = build_loss_weighting(ObjectiveConfig(loss_weighting="adaptive"))
    # a step-0 checkpoint (fresh optimizer, no state yet)
    step0 = save_checkpoint(os.path.join(root, "step0"), TrainState(), chunks, optimizer, scheduler=scheduler)
    for step in range(2):
        train_step(chunks, optimizer, scheduler, step)
        weighting.commit(2.0 + step, 0.5)
    state = TrainState(step=2, consumed_samples=8, skipped_steps=1, total_flops=1.5e9)
    saved_weights = full_weights(chunks)
    saved_moments = optimizer_tensors(optimizer)
    saved_sched = scheduler.state_dict()
    saved_ema = weighting.state_dict()
    path = save_checkpoint(root, state, chunks, optimizer, scheduler=scheduler, loss_weighting=weighting,
                           data_state={"epoch": 0, "cursor": 8}, config_yaml="model:\n  num_layers: 2\n")
    expected_draws = _draws()  # what the generators produce right after the save
    train_step(chunks, optimizer, scheduler, 2)
    continued = full_weights(chunks)

    # a different model, optimizer state, schedule position, EMA and RNG stream...
    chunks2, optimizer2, scheduler2 = build(cfg, seed=2)
    weighting2 = build_loss_weighting(ObjectiveConfig(loss_weighting="adaptive"))
    train_step(chunks2, optimizer2, scheduler2, 7)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    _draws()  # advance every stream, megatron's tracked one included
    assert not torch.equal(full_weights(chunks2)["decoder.layers.0.mlp.linear_fc1.weight"],
                           saved_weights["decoder.layers.0.mlp.linear_fc1.weight"])
    # ...restored from the checkpoint `auto` finds
    assert find_latest(root) == path
    loaded = load_checkpoint(find_latest(root), chunks2, optimizer2, scheduler=scheduler2,
                             loss_weighting=weighting2)
    result = {
        "draws_equal": _draws() == expected_draws,
        "weights_equal": all(torch.equal(full_weights(chunks2)[k], v) for k, v in saved_weights.items()),
        "num_weights": len(saved_weights),
        "moments_equal": len(saved_moments) > 0 and all(
            torch.equal(a, b) for a, b in zip(optimizer_tensors(optimizer2), saved_moments)),
        "num_moments": len(saved_moments),
        "sched_equal": scheduler2.state_dict() == saved_sched,
        "ema_equal": str(weighting2.state_dict()) == str(saved_ema),
        "sched": [str(scheduler2.state_dict()), str(saved_sched)],
        "ema": [str(weighting2.state_dict()), str(saved_ema)],
        "train_state": loaded.train_state.to_dict(),
        "data_state": loaded.data_state,
        "config_yaml": loaded.config_yaml,
        "optimizer_loaded": loaded.optimizer_loaded,
        "rng_restored": loaded.rng_restored,
        "format": loaded_format(path),
    }
    train_step(chunks2, optimizer2, scheduler2, 2)
    result["continues_exactly"] = all(torch.equal(full_weights(chunks2)[k], v) for k, v in continued.items())
    # keep-last-K with real saves: steps 3 and 4 published with keep_last=2 leave iter 3 and 4
    for step in (3, 4):
        save_checkpoint(root, TrainState(step=step), chunks2, optimizer2, scheduler=scheduler2, keep_last=2)
    result["published"] = [p.name for _, p in list_published(root)]
    # resuming from the step-0 checkpoint reproduces the first step exactly
    chunks3, optimizer3, scheduler3 = build(cfg, seed=3)
    load_checkpoint(step0, chunks3, optimizer3, scheduler=scheduler3)
    for step in range(2):  # (the warmup starts at lr 0: step 1 is the first to move the weights)
        train_step(chunks3, optimizer3, scheduler3, step)
    result["step0_resume_exact"] = all(torch.equal(full_weights(chunks3)[k], v) for k, v in saved_weights.items())
    result["latest"] = open(os.path.join(root, "latest")).read().strip()
    return result


def loaded_format(path):
    from megafusion.checkpoint.train_state import read_train_state

    return read_train_state(path).optimizer_format


@pytest.mark.distributed
@pytest.mark.parametrize("optimizer_kind", ["distributed", "param_space"])
def test_save_load_round_trip_is_bit_exact(results, optimizer_kind):
    r = results[optimizer_kind]
    assert r["format"] == {"distributed": "distributed:fully_reshardable", "param_space": "param_space"}[optimizer_kind]
    assert r["weights_equal"] and r["num_weights"] > 5
    assert r["moments_equal"] and r["num_moments"] > 5  # Adam exp_avg / exp_avg_sq restored bit-exactly
    assert r["sched_equal"], r["sched"]
    assert r["ema_equal"], r["ema"]
    assert r["train_state"] == {"step": 2, "consumed_samples": 8, "skipped_steps": 1, "total_flops": 1.5e9}
    assert r["data_state"] == {"epoch": 0, "cursor": 8}
    assert r["config_yaml"].startswith("model:")
    assert r["optimizer_loaded"] and r["rng_restored"] and r["draws_equal"]
    assert r["continues_exactly"]  # the next step after resume equals the uninterrupted run's, bit for bit
    assert r["published"] == ["iter_0000003", "iter_0000004"] and r["latest"] == "iter_0000004"
    assert r["step0_resume_exact"]  # a checkpoint taken before the first optimizer step resumes exactly


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    run_distributed(_roundtrip_worker, world_size=1, args=(str(root),))  # one launch for both optimizers
    return json.loads((root / "result.json").read_text())
