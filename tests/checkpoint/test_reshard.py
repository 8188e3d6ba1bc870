"""Loading into another layout (2 gloo processes, one launch for all cases):
- a checkpoint saved with TP=2 loads into TP=1: identical full weights, optimizer state resharded (the next step
  matches the TP=2 run's next step); a DP-only optimizer format fails before loading anything, naming both layouts
  and checkpoint.load_optimizer, and loads weights only when asked to;
- virtual-pipeline chunks: PP=2 x VP=2 (four chunks, layers interleaved over two ranks) loads into PP=1 with every
  layer's weights where they belong."""

import json
import os

import pytest
import torch

from distributed import run_distributed


def _max_rel_diff(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in b)


LAYERS = 4


def _worker(rank, world_size, root):
    result = _tensor_parallel_case(os.path.join(root, "tp"))
    result.update(_pipeline_case(os.path.join(root, "pp")))
    with open(os.path.join(root, f"result{rank}.json"), "w") as f:
        json.dump(result, f)


def _pipeline_case(root):
    from ckpt_harness import build, global_weights, make_cfg

    from megafusion.checkpoint import TrainState, load_checkpoint, save_checkpoint

    chunks, optimizer, scheduler = build(make_cfg(pp=2, vp=2), seed=1, num_layers=LAYERS)
    saved = global_weights(chunks)
    path = save_checkpoint(root, TrainState(step=0), chunks, optimizer, scheduler=scheduler)
    chunks, optimizer, scheduler = build(make_cfg(pp=1), seed=2, num_layers=LAYERS)
    before = global_weights(chunks)
    loaded = load_checkpoint(path, chunks, optimizer, scheduler=scheduler)
    after = global_weights(chunks)
    return {
        "pp_names_equal": sorted(after) == sorted(saved),
        "pp_layers": sorted({k.split(".")[2] for k in saved if k.startswith("decoder.layers.")}),
        "pp_all_equal": all(torch.equal(after[k], saved[k]) for k in saved),
        "pp_seed_differs": not torch.equal(before["decoder.layers.3.mlp.linear_fc1.weight"],
                                           saved["decoder.layers.3.mlp.linear_fc1.weight"]),
        "pp_saved_layout": [loaded.saved_layout.pp, loaded.saved_layout.vp],
    }


def _tensor_parallel_case(root):
    from ckpt_harness import build, full_weights, make_cfg, train_step

    from megafusion.checkpoint import CheckpointLayoutError, TrainState, load_checkpoint, save_checkpoint

    # ---- TP=2 (dp=1): train, save in the reshardable format and in a DP-only one
    chunks, optimizer, scheduler = build(make_cfg(tp=2, distributed_optimizer=True), seed=1)
    for step in range(2):
        train_step(chunks, optimizer, scheduler, step)
    saved = full_weights(chunks)
    save_checkpoint(os.path.join(root, "full"), TrainState(step=2), chunks, optimizer, scheduler=scheduler)
    save_checkpoint(os.path.join(root, "dp_only"), TrainState(step=2), chunks, optimizer, scheduler=scheduler,
                    optimizer_sharding="dp_reshardable")
    train_step(chunks, optimizer, scheduler, 2)
    next_step = full_weights(chunks)

    # ---- TP=1 (dp=2): load the reshardable checkpoint
    chunks, optimizer, scheduler = build(make_cfg(tp=1, distributed_optimizer=True), seed=2)
    loaded = load_checkpoint(os.path.join(root, "full", "iter_0000002"), chunks, optimizer, scheduler=scheduler)
    result = {
        "weights_equal": all(torch.equal(full_weights(chunks)[k], v) for k, v in saved.items()),
        "same_names": sorted(full_weights(chunks)) == sorted(saved),
        "saved_tp": loaded.saved_layout.tp, "rng_restored": loaded.rng_restored,
    }
    train_step(chunks, optimizer, scheduler, 2)
    result["next_step_rel_diff"] = _max_rel_diff(full_weights(chunks), next_step)
    result["moved_rel"] = _max_rel_diff(next_step, saved)  # how far one step moves the weights (scale)

    # ---- the DP-only format refuses before touching any tensor
    chunks, optimizer, scheduler = build(make_cfg(tp=1, distributed_optimizer=True), seed=3)
    before = full_weights(chunks)
    dp_only = os.path.join(root, "dp_only", "iter_0000002")
    try:
        load_checkpoint(dp_only, chunks, optimizer, scheduler=scheduler)
        result["error"] = None
    except CheckpointLayoutError as exc:
        result["error"] = str(exc)
    result["untouched"] = all(torch.equal(full_weights(chunks)[k], v) for k, v in before.items())
    weights_only = load_checkpoint(dp_only, chunks, optimizer, scheduler=scheduler, load_optimizer=False)
    result["weights_only_equal"] = all(torch.equal(full_weights(chunks)[k], v) for k, v in saved.items())
    result["weights_only_optimizer_loaded"] = weights_only.optimizer_loaded
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    run_distributed(_worker, world_size=2, args=(str(root),))
    return [json.loads((root / f"result{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.distributed
def test_tp2_checkpoint_loads_into_tp1(results):
    for r in results:
        assert r["same_names"] and r["weights_equal"]  # full weights identical after TP=2 -> TP=1
        assert r["saved_tp"] == 2 and not r["rng_restored"]  # another layout: RNG streams are not carried over
        # optimizer state resharded: the first step after loading matches the TP=2 run's (reduction order aside)
        assert r["next_step_rel_diff"] < 1e-5 < r["moved_rel"], r
        err = r["error"]
        assert err is not None and "tp=2" in err and "tp=1" in err and "dp_reshardable" in err
        assert "checkpoint.load_optimizer=false" in err
        assert r["untouched"]  # failed before loading anything
        assert r["weights_only_equal"] and not r["weights_only_optimizer_loaded"]


@pytest.mark.distributed
def test_pp2_vp2_checkpoint_loads_into_pp1(results):
    for r in results:
        assert r["pp_layers"] == ["0", "1", "2", "3"] and r["pp_names_equal"]
        assert r["pp_seed_differs"] and r["pp_all_equal"]
        assert r["pp_saved_layout"] == [2, 2]
