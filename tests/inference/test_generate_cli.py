"""`megafusion generate` on a tiny trained checkpoint: outputs (results.json, PNGs, GIF frames, grid), captioning
returns text, the Python API gives what the command wrote, and every bad input fails before compute with an
error naming the folder, prompt, file or shapes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from megafusion.cli import main


def write_prompts(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def generate(run, tmp_path, lines, *extra, out="out"):
    prompts = write_prompts(tmp_path / "prompts.jsonl", lines)
    return main(["generate", "--checkpoint", str(run.run), "--prompts", prompts, "--out", str(tmp_path / out),
                 "--steps", "3", "--max-new-tokens", "6", "--no-progress", *extra])


def test_generate_writes_images_videos_captions_and_results(trained_run, tmp_path):
    shutil.copy(trained_run.image, tmp_path / "cat.png")
    lines = [{"id": "t2i", "text": "a red cat", "image": True, "seed": 3},
             {"id": "caption", "parts": [{"image": "cat.png"}, {"text": "The"}]},
             {"id": "video", "text": "a quick dog", "image": True, "frames": 3}]
    assert generate(trained_run, tmp_path, lines, "--temperature", "0.7", "--top-k", "20") == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 4 and results["settings"]["steps"] == 3 and results["precision"] == "fp32"
    by_id = {r["id"]: r for r in results["prompts"]}
    assert by_id["t2i"]["images"] == ["t2i_image0.png"] and by_id["t2i"]["seed"] == 3
    image = np.asarray(Image.open(out / "t2i_image0.png"))
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    caption = by_id["caption"]
    assert caption["text"].strip() and caption["stop_reason"] in ("eos", "length") and not caption["images"]
    assert caption["prompt"][0]["image"][0].endswith("cat.png")
    (video,) = by_id["video"]["videos"]
    assert len(video["frames"]) == 3 and all((out / f).is_file() for f in video["frames"])
    gif = Image.open(out / video["gif"])
    assert gif.n_frames == 3
    assert np.asarray(Image.open(out / "grid_0.png")).shape[1] > 2 * 8  # two thumbnails side by side


def test_the_command_and_the_python_api_agree(trained_run, tmp_path):
    import torch

    from megafusion.inference.loading import load_for_generation
    from megafusion.inference.outputs import decode_media
    from megafusion.inference.settings import GenerationConfig
    from megafusion.parallel.initialize import destroy_parallel

    assert generate(trained_run, tmp_path, [{"id": "a", "text": "green tree", "image": True, "seed": 5}]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "a_image0.png"))
    gen = load_for_generation(trained_run.run)
    try:
        prompt = [gen.tokenizer.encode("green tree")]
        from megafusion.inference.engine import Prompt

        (result,) = gen.engine.generate([Prompt(parts=prompt, seed=5, id="a", force_image=True)],
                                        GenerationConfig(steps=3, max_new_tokens=6))
    finally:
        destroy_parallel()
    (pixels,) = decode_media(result.media[0], gen.encoder, (3, 8, 8))
    assert np.abs(pixels.astype(int) - written.astype(int)).max() <= 1
    assert json.loads((tmp_path / "out" / "results.json").read_text())["prompts"][0]["tokens"] == result.tokens
    assert torch.is_tensor(result.media[0])


def test_missing_and_partial_checkpoints_are_named(trained_run, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"text": "a"}])
    assert main(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompts", prompts, "--out",
                 str(tmp_path / "o")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    partial = tmp_path / "partial" / "checkpoints"
    shutil.copytree(trained_run.run / "checkpoints" / "iter_0000004", partial / "iter_0000004")
    (partial / "iter_0000004" / "megafusion_complete.json").unlink()
    shutil.copytree(partial / "iter_0000004", partial / "tmp.iter_0000005")
    assert main(["generate", "--checkpoint", str(tmp_path / "partial"), "--prompts", prompts, "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "only partial saves: iter_0000004, tmp.iter_0000005" in err
    assert main(["generate", "--checkpoint", str(partial / "iter_0000004"), "--prompts", prompts, "--out",
                 str(tmp_path / "o")]) == 2
    assert "is a partial checkpoint: it has no megafusion_complete.json" in capsys.readouterr().err


def test_bad_prompts_fail_before_any_generation(trained_run, tmp_path, capsys):
    long_text = " ".join(["red green blue"] * 60)
    assert generate(trained_run, tmp_path, [{"id": "ok", "text": "a"}, {"id": "huge", "text": long_text}]) == 2
    err = capsys.readouterr().err
    assert "prompt 'huge' needs" in err and "the model's context is 128" in err
    assert not (tmp_path / "out" / "results.json").exists()
    assert generate(trained_run, tmp_path, [{"id": "img", "parts": [{"image": "missing.png"}]}]) == 2
    err = capsys.readouterr().err
    assert "line 1 (prompt 'img'): image" in err and "missing.png cannot be read (missing_image_file" in err
    (tmp_path / "junk.png").write_bytes(b"not a png")
    assert generate(trained_run, tmp_path, [{"parts": [{"image": "junk.png"}]}]) == 2
    assert "undecodable_image" in capsys.readouterr().err
    assert generate(trained_run, tmp_path, [{"text": "a", "colour": "red"}]) == 2
    assert "line 1: unknown keys ['colour']" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text('{"text": "a"\n')
    assert main(["generate", "--checkpoint", str(trained_run.run), "--prompts", str(tmp_path / "broken.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "broken.jsonl line 1: not valid JSON" in capsys.readouterr().err


def test_an_encoder_that_does_not_match_the_checkpoint_is_refused(trained_run, tmp_path, capsys):
    assert generate(trained_run, tmp_path, [{"text": "a"}], "--encoder", "pixel", "--encoder-arg",
                    "resolution=16") == 2
    err = capsys.readouterr().err
    assert "encoder makes latents [3, 16, 16] but the checkpoint's model expects [3, 8, 8]" in err


def test_bf16_generation_loads_the_fp32_checkpoint(trained_run, tmp_path):
    assert generate(trained_run, tmp_path, [{"id": "b", "text": "a dog", "image": True}], "--precision", "bf16") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["precision"] == "bf16" and results["prompts"][0]["images"] == ["b_image0.png"]
