"""Each parallel layout reproduces the single-process run's per-step losses on the same data and weights."""

import pytest

from loop_harness import assert_same, run_train, seed_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

KEYS = ("loss", "loss_ce", "loss_fm", "grad_norm")
MOE_KEYS = KEYS + ("moe_aux_loss_text", "moe_aux_loss_image", "moe_aux_loss", "moe/text/layer01/load_balancing_loss",
                   "moe/image/layer00/tokens_per_expert_max", "moe/image/layer01/tokens_per_expert_min",
                   "moe/text/layer00/tokens_per_expert_mean")
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


# what Megatron-LM users add: a shared expert, router z-loss, a capacity that drops tokens, an fp32 router
MOE_OPTIONS = MOE + ["model.moe.shared_expert_intermediate_size=48", "model.moe.z_loss_coeff=0.01",
                     "model.moe.expert_capacity_factor=0.75", "model.moe.router_dtype=fp32"]
MOE_OPTION_KEYS = MOE_KEYS + ("moe/image/layer01/z_loss", "moe/text/layer00/dropped_tokens",
                              "moe/image/layer01/dropped_tokens")


@pytest.fixture(scope="module")
def moe_options_reference(tmp_path_factory):
    return _reference(tmp_path_factory, "parity_moe_options", MOE_OPTIONS)


def _assert_same(reference, candidate, keys=KEYS, rel=1e-5):
    assert_same(reference, candidate, keys, rel)


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
        for m in ("text", "image"):
            layers = [r[f"moe/{m}/layer{n:02d}/load_balancing_loss"] for n in range(2)]
            assert sum(layers) / 2 == pytest.approx(r[f"moe_aux_loss_{m}"])
            assert r[f"moe/{m}/layer00/dropped_tokens"] == 0 and "moe/text/layer00/z_loss" not in r
            low, mean, high = (r[f"moe/{m}/layer01/tokens_per_expert_{k}"] for k in ("min", "mean", "max"))
            assert low <= mean <= high and mean > 0
            # every layer routes the same rows, each to topk = 2 of the 4 experts (an even count)
            totals = [4 * r[f"moe/{m}/layer{n:02d}/tokens_per_expert_mean"] for n in range(2)]
            assert totals[0] == pytest.approx(totals[1]) and round(totals[0]) % 2 == 0
    assert single[0]["loss"] != single[-1]["loss"]


def test_moe_options_are_applied_and_logged(moe_options_reference):
    _, _, single = moe_options_reference
    for r in single:
        for m in ("text", "image"):
            routed = []
            for n in range(2):
                key = f"moe/{m}/layer{n:02d}"
                assert r[f"{key}/z_loss"] > 0 and r[f"{key}/dropped_tokens"] > 0  # capacity 0.75 < 1 drops
                routed.append(4 * r[f"{key}/tokens_per_expert_mean"] + r[f"{key}/dropped_tokens"])
            assert routed[0] == pytest.approx(routed[1])  # taken + dropped = the same rows x topk in every layer


@pytest.mark.parametrize("name, layout, world", [
    ("tp2_moe", ["parallel.tensor_model_parallel_size=2"], 2),
    ("tp2_sp_moe", ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"], 2),
    ("tp2_ep2_moe", ["parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=2"], 4),
])
def test_moe_with_tensor_parallelism_matches_single_process(moe_reference, name, layout, world):
    """Each TP rank routes its share of a modality's rows through megatron's sequence-parallel MoE (TP-sharded
    experts, the router's gradient summed over TP)."""
    tmp, common, single = moe_reference
    _assert_same(single, run_train(tmp, name, common + layout, world_size=world), MOE_KEYS)


SEQ_BALANCED = MOE + ["model.moe.router_load_balancing_type=seq_aux_loss"]


@pytest.fixture(scope="module")
def seq_balanced_reference(tmp_path_factory):
    return _reference(tmp_path_factory, "parity_moe_seq", SEQ_BALANCED)


@pytest.mark.parametrize("name, layout, world", [
    ("ep2_seq", ["parallel.expert_model_parallel_size=2"], 2),
    ("tp2_seq", ["parallel.tensor_model_parallel_size=2"], 2),
])
def test_sequence_level_balancing_matches_single_process(seq_balanced_reference, name, layout, world):
    """seq_aux_loss: the router sees the batch's sequences (each row's tokens of the modality); per-sequence
    balancing losses differ from the micro-batch loss and reproduce across layouts."""
    tmp, common, single = seq_balanced_reference
    assert all(1.0 <= r["moe_aux_loss_text"] < 4.0 for r in single)
    _assert_same(single, run_train(tmp, name, common + layout, world_size=world), MOE_KEYS)


def test_expert_parallel_with_moe_options_matches_single_process(moe_options_reference):
    tmp, common, single = moe_options_reference
    _assert_same(single, run_train(tmp, "ep2_options", common + ["parallel.expert_model_parallel_size=2"],
                                   world_size=2), MOE_OPTION_KEYS)


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
