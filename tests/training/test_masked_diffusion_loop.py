"""The masked-diffusion family on the same trainer: every parallel layout reproduces the single-process run on the
same generated tri-modal rows and weights, and a resumed run repeats the uninterrupted one bit for bit."""

import pytest

from loop_harness import assert_same, run_train, seed_checkpoint
from megafusion.discrete.vocab import UnifiedVocab

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TEXT, IMAGE, AUDIO = 200, 32, 12
MASKED = [
    "objective.kind=masked_diffusion", "objective.loss_weighting=fixed",
    # one FFN per discrete modality; image and audio codes through their own experts (EP below)
    "model.modality_ffn=true", "model.moe.num_experts=4", "model.moe.ffn_hidden_size=32",
    "model.moe.modalities=[image,audio]", "model.moe.aux_loss_coeff=0.1",
    f"objective.masked_diffusion.text_vocab_size={TEXT}", f"objective.masked_diffusion.image_codebook_size={IMAGE}",
    f"objective.masked_diffusion.audio_codebook_size={AUDIO}", f"model.vocab_size={UnifiedVocab(TEXT, IMAGE, AUDIO).size}",
    "objective.masked_diffusion.image_schedule.kind=cosine",
    "objective.masked_diffusion.audio_schedule.kind=polynomial", "objective.masked_diffusion.audio_schedule.exponent=2",
    "objective.masked_diffusion.anti_masking=true",  # micro-batches of 2 x micro_batch_size rows through the pipeline
]
KEYS = ("loss", "grad_norm", "loss_text", "masked_tokens", "moe_aux_loss")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("masked_parity")
    seed = seed_checkpoint(tmp, MASKED)
    common = [*MASKED, f"checkpoint.load={seed}", "checkpoint.load_optimizer=false"]
    return tmp, common, run_train(tmp, "single", common)


@pytest.fixture(scope="module")
def tp2_run(reference):
    tmp, common, _ = reference
    return run_train(tmp, "tp2", common + ["parallel.tensor_model_parallel_size=2"], world_size=2)


def _assert_same(reference, candidate, keys=KEYS, rel=1e-5):
    assert_same(reference, candidate, keys, rel)


def test_single_process_logs_every_modality_and_learns(reference):
    _, _, single = reference
    assert single[0]["loss"] != single[-1]["loss"]
    for r in single:
        assert r["masked_tokens"] > 0
        # 4 rows x 2 copies per micro-batch: over a step the generated rows hold text and at least one media kind
        assert "loss_text" in r and ("loss_image" in r or "loss_audio" in r)
        assert "loss_fm" not in r
        assert r["moe_aux_loss_image"] >= 0 and r["moe_aux_loss_audio"] >= 0 and "moe_aux_loss_text" not in r
    # the image and audio experts balance whenever a step holds their codes (a step may hold only one kind)
    assert any(r["moe_aux_loss_image"] > 0 for r in single) and any(r["moe_aux_loss_audio"] > 0 for r in single)


def test_tensor_parallel_matches_single_process(reference, tp2_run):
    _assert_same(reference[2], tp2_run)


@pytest.mark.parametrize("name, layout", [("pp2", ["parallel.pipeline_model_parallel_size=2"]), ("dp2", []),
                                          ("ep2", ["parallel.expert_model_parallel_size=2"])])
def test_layout_matches_single_process(reference, name, layout):
    tmp, common, single = reference
    _assert_same(single, run_train(tmp, name, common + layout, world_size=2))


def test_resume_is_bit_exact(reference, tp2_run, tmp_path):
    """TP=2 saves after step 1 (model and distributed optimizer state) and resumes: steps 2 and 3 equal the
    uninterrupted TP=2 run exactly (the masks of a micro-batch depend only on the seed and its sample index)."""
    _, common, _ = reference
    layout = ["parallel.tensor_model_parallel_size=2", f"checkpoint.save_dir={tmp_path}/ckpt"]
    first = run_train(tmp_path, "first", common + layout + ["training.exit_interval=1"], world_size=2)
    assert [r["step"] for r in first] == [1]
    resume = ["checkpoint.load=auto", "checkpoint.load_optimizer=true"]
    second = run_train(tmp_path, "second", common + layout + resume, world_size=2)
    assert [r["step"] for r in second] == [2, 3]
    for ref, got in zip(tp2_run, first + second):
        for key in KEYS:
            assert got[key] == ref[key], (key, ref["step"], ref[key], got[key])
