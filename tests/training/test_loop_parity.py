"""Each parallel layout reproduces the single-process run's per-step losses on the same data and weights."""

import pytest

from loop_harness import run_train, seed_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

KEYS = ("loss", "loss_ce", "loss_fm", "grad_norm")
MOE_KEYS = KEYS + ("moe_aux_loss_text", "moe_aux_loss_image", "moe_aux_loss")
# separate experts for text and image; a large coefficient so the balancing loss visibly shapes the gradients
MOE = ["model.moe.num_experts=4", "model.moe.router_topk=2", "model.moe.ffn_hidden_size=32",
       "model.moe.aux_loss_coeff=0.1"]


def _reference(tmp_path_factory, name, model=()):
    """A seed checkpoint written by one process and the single-process run from it."""
    tmp = tmp_path_factory.mktemp(name)
    seed = seed_checkpoint(tmp, model)
    common = [*model, f"checkpoint.load={seed}", "checkpoint.load_optimizer=false"]
    return tmp, common, run_train(tmp, "single", common)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference(tmp_path_factory, "parity")


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory):
    return _reference(tmp_path_factory, "parity_moe", MOE)


def _assert_same(reference, candidate, keys=KEYS, rel=1e-5):
    assert len(reference) == len(candidate) == 3
    for ref, got in zip(reference, candidate):
        for key in keys:
            assert got[key] == pytest.approx(ref[key], rel=rel, abs=1e-7), (key, ref["step"], ref[key], got[key])


def test_single_process_loss_moves(reference):
    _, _, single = reference
    assert single[0]["loss"] != single[-1]["loss"]
    assert all(r["text_tokens"] > 0 and r["latent_tokens"] > 0 for r in single)


@pytest.mark.parametrize(
    "name, layout",
    [
        ("tp2", ["parallel.tensor_model_parallel_size=2"]),
        ("tp2_sp", ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
        ("pp2", ["parallel.pipeline_model_parallel_size=2"]),
        ("dp2", []),
    ],
)
def test_layout_matches_single_process(reference, name, layout):
    tmp, common, single = reference
    _assert_same(single, run_train(tmp, name, common + layout, world_size=2))


def test_single_process_moe_logs_its_balancing_loss(moe_reference):
    _, _, single = moe_reference
    for r in single:  # the Switch loss is 1 for perfectly balanced routing and larger otherwise
        assert 1.0 <= r["moe_aux_loss_text"] < 2.0 and 1.0 <= r["moe_aux_loss_image"] < 2.0
    assert single[0]["loss"] != single[-1]["loss"]


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_expert_parallel_matches_single_process(moe_reference, dispatcher):
    """EP=2 (DP=2, two experts per rank and modality) against one process holding all four, dispatcher = how
    tokens reach their experts' ranks (the reference does not dispatch across ranks)."""
    tmp, common, single = moe_reference
    layout = ["parallel.expert_model_parallel_size=2", f"model.moe.token_dispatcher_type={dispatcher}"]
    _assert_same(single, run_train(tmp, f"ep2_{dispatcher}", common + layout, world_size=2), MOE_KEYS)


def test_expert_parallel_resume_matches_single_process(moe_reference, tmp_path):
    """EP=2 saves (model with its experts sharded over ranks, distributed optimizer state) after step 1 and resumes;
    steps 2 and 3 still match the uninterrupted single-process run (step 3's loss depends on the restored Adam
    state through step 2's update)."""
    tmp, common, single = moe_reference
    layout = ["parallel.expert_model_parallel_size=2", f"checkpoint.save_dir={tmp_path}/ckpt"]
    first = run_train(tmp_path, "ep2_first", common + layout + ["training.exit_interval=1"], world_size=2)
    assert [r["step"] for r in first] == [1]
    resume = ["checkpoint.load=auto", "checkpoint.load_optimizer=true"]
    second = run_train(tmp_path, "ep2_second", common + layout + resume, world_size=2)
    assert [r["step"] for r in second] == [2, 3]
    _assert_same(single, first + second, MOE_KEYS)
