"""The demo's own stages: prompt files from the eval set, scoring what `megafusion generate` writes (perfect outputs
score 1, blank ones score 0), the report folder, and the pipeline's plan and time budget."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megafusion.demo import pipeline, stages
from megafusion.demo.corpus import CorpusConfig, load_eval, png_bytes, write_corpus
from megafusion.demo.world import render, render_video

SMALL = dict(n_text=4, n_caption_image=4, n_image_caption=4, n_interleaved=2, n_video=2, eval_single=4,
             eval_pair=4, eval_video=3, eval_captions=4, eval_seen=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    write_corpus(root, CorpusConfig(seed=3, **SMALL))
    return root


def fake_generate(corpus, generated, perfect: bool):
    """Write results.json + images the way `megafusion generate` does: the true scenes (perfect) or blank ones."""
    evals = load_eval(corpus)
    prompts = {task: [json.loads(line) for line in open(path)]
               for task, path in stages.write_prompts(corpus, os.path.join(generated, "prompts")).items()}
    blank = np.full((32, 32, 3), 255, dtype=np.uint8)
    for task, lines in prompts.items():
        folder = os.path.join(generated, task)
        os.makedirs(folder, exist_ok=True)
        entries = {e["id"]: e for e in evals[task]}
        records = []
        for line in lines:
            entry = entries[line["id"].rsplit("-s", 1)[0]]
            record = {"id": line["id"], "prompt": line.get("parts") or [{"text": line["text"]}], "images": [],
                      "videos": [], "text": ""}
            if task == "text_to_image":
                with open(os.path.join(folder, f"{line['id']}_image0.png"), "wb") as f:
                    f.write(png_bytes(render(entry["scene"]) if perfect else blank))
                record["images"] = [f"{line['id']}_image0.png"]
            elif task == "image_to_text":
                record["text"] = entry["reference"] if perfect else "nothing here"
            else:
                frames = render_video(entry["video"]) if perfect else [blank] * 4
                names = []
                os.makedirs(os.path.join(folder, f"{line['id']}_video0"), exist_ok=True)
                for j, frame in enumerate(frames):
                    names.append(f"{line['id']}_video0/frame{j}.png")
                    with open(os.path.join(folder, names[-1]), "wb") as f:
                        f.write(png_bytes(frame))
                record["videos"] = [{"gif": "unused.gif", "frames": names}]
            records.append(record)
        with open(os.path.join(folder, "results.json"), "w") as f:
            json.dump({"prompts": records}, f)


def test_prompt_files(corpus, tmp_path):
    paths = stages.write_prompts(corpus, str(tmp_path), seeds=3, frames=5)
    t2i = [json.loads(line) for line in open(paths["text_to_image"])]
    assert len(t2i) == 3 * len(load_eval(corpus)["text_to_image"])
    assert all(p["image"] is True and p["id"].rsplit("-s", 1)[1] in "012" for p in t2i)
    assert len({p["seed"] for p in t2i}) == len(t2i)
    i2t = [json.loads(line) for line in open(paths["image_to_text"])]
    assert all(list(p["parts"][0]) == ["image"] and os.path.isfile(p["parts"][0]["image"]) for p in i2t)
    assert all(json.loads(line)["frames"] == 5 for line in open(paths["text_to_video"]))


@pytest.mark.parametrize("perfect", [True, False])
def test_scores_of_perfect_and_blank_outputs(corpus, tmp_path, perfect):
    fake_generate(corpus, str(tmp_path), perfect)
    scores = stages.score(corpus, str(tmp_path))
    held = {task: scores[task]["held_out"] for task in ("text_to_image", "image_to_text", "text_to_video")}
    expected = 1.0 if perfect else 0.0
    for task, names in stages.TARGETS.items():
        for name in names:
            assert held[task][name]["accuracy"] == expected, (task, name)
            assert 0 < held[task][name]["chance"] < 1
    assert all(v is perfect for v in scores["targets_met"].values())
    assert "seen" in scores["text_to_image"]


def test_score_refuses_outputs_of_another_eval_set(corpus, tmp_path):
    fake_generate(corpus, str(tmp_path), True)
    path = tmp_path / "image_to_text" / "results.json"
    data = json.loads(path.read_text())
    data["prompts"][0]["id"] = "stranger"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="prompt id 'stranger' is not in the eval set"):
        stages.score(corpus, str(tmp_path))


def test_report_folder(corpus, tmp_path):
    from megafusion.demo.report_builder import build_report

    demo = tmp_path / "demo"
    demo.mkdir()
    os.symlink(corpus, demo / "corpus")
    fake_generate(corpus, str(demo / "generated" / "adaptive"), True)
    os.makedirs(demo / "runs" / "adaptive")
    with open(demo / "runs" / "adaptive" / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "loss_ce": 5.0 / step, "loss_fm": 1.0 / step, "weight_ce": 1.0,
                                "weight_fm": 2.0}) + "\n")
    os.makedirs(demo / "report")
    with open(demo / "report" / "metrics_adaptive.json", "w") as f:
        json.dump(stages.score(corpus, str(demo / "generated" / "adaptive")), f)
    with open(demo / "demo.json", "w") as f:
        json.dump({"stages": [{"name": "corpus", "command": "python -m megafusion.demo.stages corpus --out X",
                               "seconds": 1.0}], "total_seconds": 60, "settings": {"minutes": 15}}, f)
    report = build_report(str(demo), ["adaptive"])
    text = open(report).read()
    assert "python -m megafusion.demo.stages corpus --out X" in text and "Every target of the default run is met" in text
    assert "text -> image: color" in text and "| 0.95 |" in text
    for name in ("loss_curves.png", "adaptive_text_to_image_held_out_single.png", "adaptive_image_to_text_held_out.png",
                 "adaptive_text_to_video.png", "metrics.json"):
        assert (demo / "report" / name).stat().st_size > 0, name
    summary = json.loads((demo / "report" / "metrics.json").read_text())
    assert summary["runs"]["adaptive"]["final"]["step"] == 5


def test_pipeline_plan_and_budget(tmp_path):
    steps, minutes = pipeline.training_plan(15)
    assert minutes == 15 - pipeline.STAGE_RESERVE_MINUTES and steps == int(pipeline.STEPS_PER_MINUTE * minutes)
    with pytest.raises(ValueError, match="leaves no time to train"):
        pipeline.training_plan(2)
    plan = pipeline.Pipeline(str(tmp_path), minutes=10, compare_weighting=True)._plan()
    names = [name for name, _ in plan]
    assert names[:4] == ["corpus", "tokenizer", "preprocess", "train (adaptive)"] and "train (fixed)" in names
    assert names[-1] == "report" and sum(n.startswith("generate") for n in names) == 6
    train = dict(plan)["train (fixed)"]
    assert "objective.loss_weighting=fixed" in train and "training.exit_duration_minutes=7.50" in train
    assert "--workers" in dict(plan)["preprocess"] and "tools/preprocess_data.py" in dict(plan)["preprocess"]
