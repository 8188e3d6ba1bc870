"""A shortened `megafusion demo` end to end (every real tool, a smaller corpus and budget): both losses fall, the
report folder is complete, and the model beats chance on the held-out prompts by a clear margin."""

from __future__ import annotations

import json

import pytest

from megafusion.demo.pipeline import Pipeline

pytestmark = [pytest.mark.slow]


def test_shortened_demo_learns_and_scores_itself(tmp_path):
    demo = tmp_path / "demo"
    report = Pipeline(str(demo), minutes=7.0, corpus_scale=0.5, prompt_seeds=1).run()
    text = open(report).read()
    for stage in ("tools/train_tokenizer.py", "tools/preprocess_data.py", "megafusion train --config demo",
                  "megafusion generate", "python -m megafusion.demo.stages score"):
        assert stage in text, stage
    summary = json.loads((demo / "report" / "metrics.json").read_text())
    run = summary["runs"]["adaptive"]
    assert run["final"]["loss_ce"] < 0.5 * run["first"]["loss_ce"]
    assert run["final"]["loss_fm"] < 0.5 * run["first"]["loss_fm"]
    held = {task: run["scores"][task]["held_out"] for task in ("text_to_image", "text_to_video")}
    # colors are what a short run learns first: far above chance (1/6) in generated images and videos
    for task in held:
        assert held[task]["color"]["accuracy"] > held[task]["color"]["chance"] + 0.3, (task, held[task]["color"])
    # captions are sentences of the world: a color and a shape named in (nearly) every one
    from megafusion.demo.captions import parse_caption

    captions = json.loads((demo / "generated" / "adaptive" / "image_to_text" / "results.json").read_text())
    parsed = [parse_caption(p["text"]) for p in captions["prompts"]]
    assert sum(bool(p.colors) and bool(p.shapes) for p in parsed) >= 0.9 * len(parsed)
    for name in ("loss_curves.png", "adaptive_text_to_image_held_out_single.png",
                 "adaptive_image_to_text_held_out.png", "adaptive_text_to_video.png"):
        assert (demo / "report" / name).stat().st_size > 1000, name
    settings = json.loads((demo / "demo.json").read_text())["settings"]
    assert settings["train_steps"] >= 100 and all(s["returncode"] == 0 for s in summary["stages"])
