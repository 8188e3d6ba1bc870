"""The demo's report folder, built from what the stages left in the demo folder:

    DIR/demo.json                      stages run (commands, seconds), settings (written by megafusion.demo.pipeline)
    DIR/runs/<label>/metrics.jsonl     training curves of each run (label: adaptive, and fixed with
                                       --compare-weighting)
    DIR/generated/<label>/<task>/      what `megafusion generate` wrote for each task
    DIR/report/metrics_<label>.json    mini-GenEval scores of each run (megafusion.demo.stages score)

into DIR/report/: report.md (what was run with the commands, timings, the scores next to their targets and
chance levels, the pictures), metrics.json (all scores, targets, final losses, timings), loss_curves.png (CE and
FM with the adaptive weights; runs side by side), grids of generated images per held-out prompt group, the
held-out captioning images with their generated captions, and the generated video frames.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

from megafusion.demo.corpus import load_eval, read_png
from megafusion.demo.report import image_grid, plot_loss_curves, read_metrics, write_report
from megafusion.demo.stages import TARGETS

TASK_TITLES = {"text_to_image": "text -> image", "image_to_text": "image -> text", "text_to_video": "text -> video"}


def _load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; run the earlier demo stages first")
    with open(path) as f:
        return json.load(f)


def _results(demo: str, label: str, task: str) -> List[dict]:
    return _load_json(os.path.join(demo, "generated", label, task, "results.json"))["prompts"]


def _grids(demo: str, label: str, evals: Dict[str, List[dict]], out: str) -> Dict[str, str]:
    """PNG grids of one run's outputs -> {path: caption}."""
    images: Dict[str, str] = {}
    by_id = {task: {e["id"]: e for e in entries} for task, entries in evals.items()}
    folder = os.path.join(demo, "generated", label)
    t2i = _results(demo, label, "text_to_image")
    for split in ("held_out", "seen"):
        for kind in ("single", "pair"):
            rows = [r for r in t2i if by_id["text_to_image"][r["id"].rsplit("-s", 1)[0]]["split"] == split
                    and by_id["text_to_image"][r["id"].rsplit("-s", 1)[0]]["kind"] == kind and r["images"]]
            if not rows:
                continue
            path = os.path.join(out, f"{label}_text_to_image_{split}_{kind}.png")
            image_grid([read_png(os.path.join(folder, "text_to_image", r["images"][0])) for r in rows],
                       [r["prompt"][0]["text"] for r in rows], path, columns=8)
            images[path] = f"{label}: text -> image, {split.replace('_', '-')} {kind}-object prompts"
    captions = [r for r in _results(demo, label, "image_to_text")
                if by_id["image_to_text"][r["id"]]["split"] == "held_out"]
    if captions:
        path = os.path.join(out, f"{label}_image_to_text_held_out.png")
        image_grid([read_png(by_id["image_to_text"][r["id"]]["image"]) for r in captions],
                   [f"{r['text'].strip() or '(nothing)'}" for r in captions], path, columns=6)
        images[path] = f"{label}: held-out images with their generated captions"
    videos = [r for r in _results(demo, label, "text_to_video") if r["videos"]][:8]
    if videos:
        frames, labels = [], []
        for r in videos:
            clip = [read_png(os.path.join(folder, "text_to_video", f)) for f in r["videos"][0]["frames"]]
            frames += clip
            labels += [r["prompt"][0]["text"]] + [""] * (len(clip) - 1)
        path = os.path.join(out, f"{label}_text_to_video.png")
        image_grid(frames, labels, path, columns=len(frames) // len(videos))
        images[path] = f"{label}: generated videos, one per row (frames left to right)"
    return images


def _score_rows(scores: Dict[str, dict], labels: Sequence[str]) -> Dict[str, dict]:
    """Table rows: held-out accuracy per task and metric, with targets and chance (one column set per run)."""
    rows = {}
    for task, metrics in scores[labels[0]].items():
        if task not in TASK_TITLES:
            continue
        for name, entry in metrics.get("held_out", {}).items():
            for label in labels:
                value = scores[label][task].get("held_out", {}).get(name, {})
                key = f"{TASK_TITLES[task]}: {name}" + (f" ({label})" if len(labels) > 1 else "")
                rows[key] = {"accuracy": value.get("accuracy"), "chance": value.get("chance"),
                             "target": TARGETS.get(task, {}).get(name)}
    return rows


def _final(records: List[dict]) -> dict:
    last = records[-1] if records else {}
    return {k: last.get(k) for k in ("step", "loss_ce", "loss_fm", "weight_ce", "weight_fm") if k in last}


def build_report(demo: str, labels: Sequence[str] = ("adaptive",)) -> str:
    info = _load_json(os.path.join(demo, "demo.json"))
    out = os.path.join(demo, "report")
    os.makedirs(out, exist_ok=True)
    evals = load_eval(os.path.join(demo, "corpus"))
    scores = {label: _load_json(os.path.join(out, f"metrics_{label}.json")) for label in labels}
    curves = {label: read_metrics(os.path.join(demo, "runs", label, "metrics.jsonl")) for label in labels}
    loss_png = plot_loss_curves(curves, os.path.join(out, "loss_curves.png"),
                                title="training losses and loss weights" + (" (side by side)" if len(labels) > 1
                                                                            else ""))
    images: Dict[str, str] = {loss_png: "CE and FM losses (top), loss weights (bottom)"}
    for label in labels:
        images.update(_grids(demo, label, evals, out))
    first = curves[labels[0]]
    summary = {"runs": {label: {"scores": scores[label], "final": _final(curves[label]),
                                "first": {k: first[0].get(k) for k in ("loss_ce", "loss_fm")} if first else {}}
                        for label in labels},
               "targets": TARGETS, "stages": info["stages"], "settings": info["settings"]}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    met = scores[labels[0]]["targets_met"]
    missed = [k for k, v in met.items() if v is False]
    verdict = ("Every target of the default run is met." if not missed else
               f"Targets missed by the default run: {', '.join(missed)} (see the notes below).")
    sections = {
        "What was run": {"text": f"`megafusion demo` ran these stages in {info['total_seconds'] / 60:.1f} minutes "
                                 f"on this machine; each command repeats its stage by hand.",
                         "commands": [c for s in info["stages"] for c in (f"# {s['name']} ({s['seconds']:.0f} s)",
                                                                           s["command"])]},
        "Scores (held-out prompts)": {"text": verdict, "metrics": _score_rows(scores, list(labels))},
        "Training": {"notes": [f"{label}: step {_final(curves[label]).get('step')}, first CE / FM "
                               f"{summary['runs'][label]['first'].get('loss_ce', 0):.3g} / "
                               f"{summary['runs'][label]['first'].get('loss_fm', 0):.3g}, final "
                               f"{_final(curves[label]).get('loss_ce', 0):.3g} / "
                               f"{_final(curves[label]).get('loss_fm', 0):.3g}" for label in labels]},
        "Pictures": {"images": images},
        "Notes": {"notes": info.get("notes", []) + [
            "Held-out prompts combine a shape and a color never seen together in training "
            f"({', '.join(' '.join(p[::-1]) for p in _load_json(os.path.join(demo, 'corpus', 'split.json'))['held_out_pairs'])}).",
            "Scores come from a deterministic checker (megafusion/demo/checker.py), not a learned model; "
            "chance is a uniformly random scene of the world.",
            "All scores, including the seen-pair comparison items, are in metrics.json."]},
    }
    return write_report(os.path.join(out, "report.md"), "megafusion demo report", sections)
