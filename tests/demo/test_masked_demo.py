"""The masked-diffusion demo (megafusion/demo/masked): a deterministic tri-modal corpus, the tone classifier, and a
tiny end-to-end run of the real pipeline (corpus -> tokenizer -> preprocess -> train -> generate -> report)."""

import json

import numpy as np
import pytest

from megafusion.demo.masked import audio as tones
from megafusion.demo.masked.corpus import records, write_corpus
from megafusion.demo.masked.run import MaskedDemo, training_plan


def test_corpus_is_deterministic_and_has_three_kinds():
    a, b = records(seed=3, scale=0.02), records(seed=3, scale=0.02)
    assert a == b
    assert {r["kind"] for r in a} == {"text", "image_text", "audio_text"}
    assert records(seed=4, scale=0.02) != a
    for r in a:
        assert r["text"].strip()
        assert (r["image"] is not None) == (r["kind"] == "image_text")
        assert (r["audio"] is not None) == (r["kind"] == "audio_text")


def test_written_corpus_and_prompts(tmp_path):
    info = write_corpus(str(tmp_path), seed=0, scale=0.02, n_images=5, audio_per_class=2)
    assert set(info["counts"]) == {"text", "image_text", "audio_text"}
    prompts = [json.loads(x) for x in (tmp_path / "eval" / "text_to_image.jsonl").read_text().splitlines()]
    audio = [json.loads(x) for x in (tmp_path / "eval" / "audio.jsonl").read_text().splitlines()]
    truth = json.loads((tmp_path / "eval" / "truth.json").read_text())
    assert len(prompts) == 5 and all(p["generate"] == "image" and p["id"] in truth for p in prompts)
    assert len(audio) == 2 * len(tones.CLASSES) and all(p["generate"] == "audio" for p in audio)
    assert (tmp_path / "train.parquet").stat().st_size > 0


@pytest.mark.parametrize("kind", tones.CLASSES)
def test_tone_classifier_recognises_every_class(kind):
    for amplitude in (0.3, 0.9):
        assert tones.classify(tones.tone(kind, 1000, 0.1, amplitude=amplitude), 1000) == kind
    assert tones.classify(np.zeros(100), 1000) is None


def test_training_plan_leaves_time_for_the_other_stages():
    steps, minutes = training_plan(8.0)
    assert minutes == pytest.approx(6.0) and steps > 100
    with pytest.raises(ValueError):
        training_plan(1.0)


@pytest.mark.slow
def test_tiny_end_to_end_run_writes_the_report(tmp_path):
    demo = MaskedDemo(str(tmp_path / "demo"), minutes=3.0, scale=0.05, eval_images=3, audio_per_class=1,
                      train_steps=4, text_samples=1,
                      train_overrides=["training.eval_interval=2", "model.num_layers=2", "model.hidden_size=64",
                                       "model.ffn_hidden_size=128", "training.micro_batch_size=8",
                                       "training.global_batch_size=8"])
    report = demo.run()
    assert "Text -> image" in open(report).read()
    metrics = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    assert {"losses", "text_to_image", "text_to_audio", "trained_steps", "wall_seconds", "stages"} <= set(metrics)
    assert {"loss", "loss_text", "loss_image", "loss_audio"} <= set(metrics["losses"])
    for key in ("color", "shape", "position", "object"):
        assert {"accuracy", "chance", "palette_ceiling", "n"} <= set(metrics["text_to_image"][key])
        assert metrics["text_to_image"][key]["n"] == 3
    assert metrics["text_to_image_probe"]["colour"]["n"] == 3 and "Sampler-free probe" in open(report).read()
    assert metrics["text_to_audio"]["tone_class"]["n"] == len(tones.CLASSES)
    assert metrics["trained_steps"] == 4
    assert [s["returncode"] for s in metrics["stages"]] == [0] * len(metrics["stages"])
