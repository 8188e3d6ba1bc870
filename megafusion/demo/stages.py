"""The demo's own stages around the real tools: the corpus, prompt files from the eval set, scoring what
`megafusion generate` wrote (mini-GenEval) into metrics.json, and the report folder. Each is a function and a
subcommand, so every stage of `megafusion demo` can be repeated by hand:

    python -m megafusion.demo.stages corpus  --out DIR/corpus [--seed 0] [--scale 1.0]
    python -m megafusion.demo.stages prompts --corpus DIR/corpus --out DIR/prompts [--seeds 2] [--frames 4]
    python -m megafusion.demo.stages score   --corpus DIR/corpus --generated DIR/generated/adaptive
                                             --out DIR/report/metrics_adaptive.json
    python -m megafusion.demo.stages report  --demo DIR [--runs adaptive fixed]

Scores are taken over the held-out items (attribute combinations never seen in training) and, for comparison,
over the "seen" items; the targets of the default run are written next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

from megafusion.demo.corpus import CorpusConfig, load_eval, read_png, write_corpus

TARGETS = {"text_to_image": {"color": 0.95, "shape": 0.8, "position": 0.8},
           "image_to_text": {"color": 0.95, "shape": 0.8},
           "text_to_video": {"direction": 0.8}}
PROMPT_FILES = {"text_to_image": "text_to_image.jsonl", "image_to_text": "image_to_text.jsonl",
                "text_to_video": "text_to_video.jsonl"}
SIZES = ("n_text", "n_caption_image", "n_image_caption", "n_interleaved", "n_video")


# ---------------------------------------------------------------------------------------------- corpus
def make_corpus(out: str, seed: int = 0, scale: float = 1.0) -> dict:
    """The corpus with every train document count scaled by `scale` (eval set unchanged)."""
    if scale <= 0:
        raise ValueError(f"--scale {scale} must be positive")
    base = CorpusConfig(seed=seed)
    return write_corpus(out, CorpusConfig(seed=seed, **{k: max(1, round(getattr(base, k) * scale)) for k in SIZES}))


# ---------------------------------------------------------------------------------------------- prompts
def write_prompts(corpus: str, out: str, seeds: int = 2, frames: int = 4) -> Dict[str, str]:
    """Prompt files for `megafusion generate`, one per task: text->image (each prompt with `seeds` seeds),
    image->text (the held-out images, nothing after them: the model writes the caption) and text->video."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds} must be >= 1")
    tasks = load_eval(corpus)
    os.makedirs(out, exist_ok=True)
    lines = {
        "text_to_image": [{"id": f"{e['id']}-s{s}", "text": e["prompt"], "image": True, "seed": 1000 * s + i}
                          for i, e in enumerate(tasks["text_to_image"]) for s in range(seeds)],
        "image_to_text": [{"id": e["id"], "parts": [{"image": e["image"]}], "seed": i}
                          for i, e in enumerate(tasks["image_to_text"])],
        "text_to_video": [{"id": e["id"], "text": e["prompt"], "image": True, "frames": frames, "seed": i}
                          for i, e in enumerate(tasks["text_to_video"])],
    }
    paths = {}
    for task, entries in lines.items():
        paths[task] = os.path.join(out, PROMPT_FILES[task])
        with open(paths[task], "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in entries)
    return paths


# ---------------------------------------------------------------------------------------------- scoring
def _results(generated: str, task: str) -> Dict[str, dict]:
    path = os.path.join(generated, task, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; run `megafusion generate` for {task} first")
    with open(path) as f:
        return {r["id"]: r for r in json.load(f)["prompts"]}


def _eval_id(prompt_id: str) -> str:
    return prompt_id.rsplit("-s", 1)[0] if "-s" in prompt_id else prompt_id


def score(corpus: str, generated: str) -> dict:
    """Mini-GenEval over the outputs of the three generate runs under `generated/<task>/`."""
    from megafusion.demo.scoring import score_image_to_text, score_text_to_image, score_text_to_video

    tasks = load_eval(corpus)
    out: Dict[str, dict] = {}
    for task, scorer in (("text_to_image", score_text_to_image), ("image_to_text", score_image_to_text),
                         ("text_to_video", score_text_to_video)):
        results = _results(generated, task)
        entries = {e["id"]: e for e in tasks[task]}
        groups: Dict[str, list] = {"held_out": [], "seen": []}
        for pid, record in sorted(results.items()):
            entry = entries.get(_eval_id(pid))
            if entry is None:
                raise ValueError(f"{generated}/{task}/results.json: prompt id {pid!r} is not in the eval set")
            folder = os.path.join(generated, task)
            if task == "text_to_image":
                if not record["images"]:
                    raise ValueError(f"{folder}/results.json: prompt {pid!r} produced no image")
                item = (entry["scene"], read_png(os.path.join(folder, record["images"][0])))
            elif task == "image_to_text":
                item = (entry["scene"], record["text"])
            else:
                if not record["videos"]:
                    raise ValueError(f"{folder}/results.json: prompt {pid!r} produced no video")
                item = (entry["video"], [read_png(os.path.join(folder, f)) for f in record["videos"][0]["frames"]])
            groups[entry["split"]].append(item)
        out[task] = {split: scorer(items) for split, items in groups.items() if items}
    out["targets"] = TARGETS
    out["targets_met"] = {f"{task}.{name}": _met(out[task].get("held_out", {}).get(name), target)
                          for task, names in TARGETS.items() for name, target in names.items()}
    return out


def _met(metric: Optional[dict], target: float) -> Optional[bool]:
    if not metric or metric.get("accuracy") is None:
        return None
    return metric["accuracy"] >= target


# ---------------------------------------------------------------------------------------------- report
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megafusion.demo.stages", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="stage", required=True)
    c = sub.add_parser("corpus", help="write the procedural corpus and eval set")
    c.add_argument("--out", required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--scale", type=float, default=1.0, help="multiply every train document count")
    q = sub.add_parser("prompts", help="prompt files for megafusion generate")
    q.add_argument("--corpus", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--seeds", type=int, default=2)
    q.add_argument("--frames", type=int, default=4)
    s = sub.add_parser("score", help="mini-GenEval of generated outputs -> metrics JSON")
    s.add_argument("--corpus", required=True)
    s.add_argument("--generated", required=True)
    s.add_argument("--out", required=True)
    r = sub.add_parser("report", help="report.md, grids and loss curves of a demo folder")
    r.add_argument("--demo", required=True)
    r.add_argument("--runs", nargs="+", default=["adaptive"])
    args = p.parse_args(argv)
    try:
        if args.stage == "corpus":
            info = make_corpus(args.out, args.seed, args.scale)
            print(f"[corpus] {info['train']['rows']} train documents, held out {info['held_out_pairs']}")
        elif args.stage == "prompts":
            for task, path in write_prompts(args.corpus, args.out, args.seeds, args.frames).items():
                print(f"[prompts] {task}: {path}")
        elif args.stage == "score":
            metrics = score(args.corpus, args.generated)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(metrics, f, indent=2)
                f.write("\n")
            print(f"[score] wrote {args.out}: targets met {metrics['targets_met']}")
        else:
            from megafusion.demo.report_builder import build_report

            print(f"[report] wrote {build_report(args.demo, args.runs)}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"megafusion demo {args.stage}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
