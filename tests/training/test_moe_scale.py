"""The reference setup's expert counts (32, 128 and 1008 experts per modality, tiny experts) train; the 1008-expert
model resumes bit-exactly; MoE checkpoints reshard across tensor- and expert-parallel sizes (a save at TP=2 resumes
in one process and the other way, TP=2 x EP=2 at EP=2, continuing the uninterrupted single-process run; across
EP = 1 <-> 2 the weights)."""

import pytest

from loop_harness import run_train, seed_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

KEYS = ("loss", "loss_ce", "loss_fm", "grad_norm", "moe_aux_loss_text", "moe_aux_loss_image")


def experts(n):
    return [f"model.moe.num_experts={n}", "model.moe.router_topk=2", "model.moe.ffn_hidden_size=8"]


@pytest.mark.parametrize("count", [32, 128])
def test_reference_expert_counts_train(tmp_path, count):
    records = run_train(tmp_path, f"e{count}", experts(count) + ["training.train_steps=2"])
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        loads = [r[f"moe/image/layer01/tokens_per_expert_{k}"] for k in ("min", "mean", "max")]
        assert loads[0] <= loads[1] <= loads[2]
        routed = [r[f"moe/image/layer{n:02d}/tokens_per_expert_mean"] * count for n in range(2)]
        assert routed[0] == pytest.approx(routed[1]) and round(routed[0]) % 2 == 0 and routed[0] > 0  # top-2
        assert 1.0 <= r["moe_aux_loss_text"] < count  # Switch loss: 1 balanced, `count` all on one expert


def test_1008_experts_resume_bit_exactly(tmp_path):
    # one layer and one modality's experts keep the 1008 SequentialMLP experts quick (the other counts above run
    # experts for both modalities)
    model = experts(1008) + ["model.num_layers=1", "model.moe.modalities=[image]"]
    common = model + [f"checkpoint.save_dir={tmp_path}/ckpt"]
    whole = run_train(tmp_path, "whole", model)
    first = run_train(tmp_path, "first", common + ["training.exit_interval=2"])
    second = run_train(tmp_path, "second", common + ["checkpoint.load=auto"])
    assert [r["step"] for r in first + second] == [1, 2, 3]
    for a, b in zip(whole, first + second):
        for key in (k for k in KEYS if k != "moe_aux_loss_text"):
            assert a[key] == b[key], (key, a["step"], a[key], b[key])  # bit-exact


@pytest.fixture(scope="module")
def moe_single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_reshard")
    model = experts(4)
    seed = seed_checkpoint(tmp, model)
    common = model + [f"checkpoint.load={seed}", "checkpoint.load_optimizer=false"]
    return tmp, common, run_train(tmp, "single", common)


def _close(reference, candidate):
    assert [r["step"] for r in candidate] == [r["step"] for r in reference]
    for ref, got in zip(reference, candidate):
        for key in KEYS:
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (key, ref["step"], ref[key], got[key])


TP2 = ["parallel.tensor_model_parallel_size=2"]
EP2 = ["parallel.expert_model_parallel_size=2"]


def _save_step_one(tmp_path, name, common, layout, world):
    save = [f"checkpoint.save_dir={tmp_path}/ckpt"]
    return run_train(tmp_path, f"{name}_a", common + layout + save + ["training.exit_interval=1"], world_size=world)


@pytest.mark.parametrize("name, first, first_world, second, second_world", [
    ("tp2_to_tp1", TP2, 2, [], 1), ("tp1_to_tp2", [], 1, TP2, 2), ("ep2_tp2_to_ep2", EP2 + TP2, 4, EP2, 2),
])
def test_moe_checkpoint_reshards_with_its_optimizer(moe_single, tmp_path, name, first, first_world, second,
                                                    second_world):
    """Step 1 in one layout, saved (model with its experts, distributed-optimizer state); steps 2-3 in the other,
    loading it: the three steps continue the single-process run."""
    _, common, single = moe_single
    head = _save_step_one(tmp_path, name, common, first, first_world)
    resume = [f"checkpoint.save_dir={tmp_path}/ckpt", "checkpoint.load=auto", "checkpoint.load_optimizer=true"]
    _close(single, head + run_train(tmp_path, f"{name}_b", common + second + resume, world_size=second_world))


@pytest.mark.parametrize("name, first, first_world, second, second_world", [
    ("ep2_to_ep1", EP2, 2, [], 1), ("ep1_to_ep2", [], 1, EP2, 2),
])
def test_moe_weights_reshard_across_expert_parallel_sizes(moe_single, tmp_path, name, first, first_world, second,
                                                          second_world):
    """Across EP = 1 <-> EP > 1 megatron-core's optimizer state does not move (its expert optimizer exists only at
    EP > 1): loading it is refused up front naming checkpoint.load_optimizer=false, which loads the weights
    resharded: step 2's loss (computed before step 2's update) is the single-process run's."""
    _, common, single = moe_single
    _save_step_one(tmp_path, name, common, first, first_world)
    resume = [f"checkpoint.save_dir={tmp_path}/ckpt", "checkpoint.load=auto"]
    with pytest.raises(AssertionError, match="checkpoint.load_optimizer=false"):
        run_train(tmp_path, f"{name}_refused", common + second + resume + ["checkpoint.load_optimizer=true"],
                  world_size=second_world)
    tail = run_train(tmp_path, f"{name}_b", common + second + resume + ["checkpoint.load_optimizer=false"],
                     world_size=second_world)
    assert tail[0]["step"] == 2
    for key in ("loss", "loss_ce", "loss_fm", "moe_aux_loss_text"):
        assert tail[0][key] == pytest.approx(single[1][key], rel=1e-5), key
