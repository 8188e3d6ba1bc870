"""Each parallel layout reproduces the single-process run's per-step losses on the same data and weights."""

import pytest

from loop_harness import run_train, seed_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

KEYS = ("loss", "loss_ce", "loss_fm", "grad_norm")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    seed = seed_checkpoint(tmp)
    common = [f"checkpoint.load={seed}", "checkpoint.load_optimizer=false"]
    return tmp, common, run_train(tmp, "single", common)


def _assert_same(reference, candidate, rel=1e-5):
    assert len(reference) == len(candidate) == 3
    for ref, got in zip(reference, candidate):
        for key in KEYS:
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
