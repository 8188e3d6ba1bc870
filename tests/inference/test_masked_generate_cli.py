"""`megafusion generate` on a masked-diffusion checkpoint: records -> preprocessing -> a short training run ->
text, text->image (PNG) and text->audio (WAV) outputs with results.json; bad prompts are named before compute."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "preprocess"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "discrete"))

from preprocess_corpus import load_tool, train_tiny_tokenizer  # noqa: E402
from test_discrete_data import AUDIO_SPEC, IMAGE_SPEC, _png, _wav  # noqa: E402

from megafusion.discrete.dataset import DiscreteDataset  # noqa: E402
from megafusion.encoders.discrete.audio_io import read_wav  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("masked_generate"))
    tokenizer = train_tiny_tokenizer(root)
    rows = [{"text": f"the shapes are {w} today"} for w in ("red", "blue", "green", "small", "large", "round")]
    rows += [{"text": f"a picture number {i}", "image": _png(os.path.join(root, f"i{i}.png"), i)} for i in range(4)]
    rows += [{"text": f"a tone of {f} hertz", "audio": _wav(os.path.join(root, f"a{f}.wav"), 0.2, f)}
             for f in (220, 440, 660)]
    records = os.path.join(root, "records.jsonl")
    with open(records, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    data = os.path.join(root, "ds")
    load_tool("preprocess_data").main(["--family", "masked_diffusion", "--input", records, "--output", data,
                                       "--tokenizer", tokenizer, "--image-tokenizer", json.dumps(IMAGE_SPEC),
                                       "--audio-tokenizer", json.dumps(AUDIO_SPEC), "--max-mixed-length", "96",
                                       "--min-image-size", "16", "--no-progress"])
    vocab = DiscreteDataset(data).vocab
    run_dir = os.path.join(root, "run")
    overrides = [
        "objective.kind=masked_diffusion", "objective.loss_weighting=fixed", "model.modality_ffn=false",
        f"objective.masked_diffusion.text_vocab_size={vocab.text_size}",
        f"objective.masked_diffusion.image_codebook_size={vocab.image_codes}",
        f"objective.masked_diffusion.audio_codebook_size={vocab.audio_codes}", f"model.vocab_size={vocab.size}",
        f"data.paths=[{data}]", "data.seq_length=96", "data.valid_fraction=0", "training.train_steps=2",
        "optimizer.warmup_steps=1", f"training.run_dir={run_dir}", f"checkpoint.save_dir={run_dir}/checkpoints",
        "logging.tensorboard=false", "training.precision=fp32",
    ]
    from megafusion.cli import main

    assert main(["train", "--config", "tiny", *overrides]) == 0
    return root, run_dir


def _generate(root, run_dir, lines, out, *flags):
    from megafusion.cli import main

    prompts = os.path.join(root, f"{out}.jsonl")
    with open(prompts, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return main(["generate", "--checkpoint", run_dir, "--prompts", prompts, "--out", os.path.join(root, out),
                 "--no-progress", *flags])


def test_generates_text_images_and_audio(run):
    root, run_dir = run
    lines = [{"id": "img", "text": "a picture number 2", "generate": "image"},
             {"id": "img-b", "text": "a picture number 3", "generate": "image", "seed": 9},
             {"id": "tone", "text": "a tone of 440 hertz", "generate": "audio", "seconds": 0.1},
             {"id": "doc", "generate": "text", "tokens": 6}]
    assert _generate(root, run_dir, lines, "out", "--steps", "4", "--cfg-scale", "2", "--batch-size", "3") == 0
    out = os.path.join(root, "out")
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["family"] == "masked_diffusion" and results["step"] == 2
    by_id = {r["id"]: r for r in results["results"]}
    from PIL import Image

    image = np.asarray(Image.open(os.path.join(out, by_id["img"]["image"])))
    assert image.shape == (16, 16, 3) and len(by_id["img"]["codes"]) == 16  # palette 16 px / patch 4
    assert all(0 <= c < 64 for c in by_id["img"]["codes"])
    wave, rate = read_wav(os.path.join(out, by_id["tone"]["audio"]))
    assert rate == 4000 and len(by_id["tone"]["codes"]) == 10 and len(wave) == 400  # hop 40: 100 codes/s
    assert isinstance(by_id["doc"]["text"], str) and len(by_id["doc"]["codes"]) <= 6
    assert os.path.isfile(os.path.join(out, "grid_000.png"))
    # the same prompt and seed alone gives the same image (batching does not change a sample)
    assert _generate(root, run_dir, [lines[1]], "alone", "--steps", "4", "--cfg-scale", "2") == 0
    alone = json.load(open(os.path.join(root, "alone", "results.json")))["results"][0]
    assert alone["codes"] == by_id["img-b"]["codes"]


@pytest.mark.parametrize("line, message", [
    ({"generate": "video", "text": "x"}, "generate='video' is not one of"),
    ({"generate": "image"}, "needs a non-empty \"text\""),
    ({"generate": "text", "text": "go on"}, "continuing a given text is not supported"),
    ({"text": "x", "colour": "red"}, "unknown keys ['colour']"),
])
def test_bad_prompts_are_named(run, capsys, line, message):
    root, run_dir = run
    assert _generate(root, run_dir, [line], "bad") == 2
    err = capsys.readouterr().err
    assert message in err and "bad.jsonl:1" in err


def test_hugging_face_export_refuses_the_masked_family(run, capsys):
    root, run_dir = run
    code = load_tool("convert_checkpoint").main(["to-hf", "--checkpoint", run_dir, "--out", os.path.join(root, "hf")])
    assert code != 0 and "flow-matching family only" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(root, "hf", "config.json"))
