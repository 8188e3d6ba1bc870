"""`megafusion demo --family masked_diffusion`: the tiny tri-modal masked-diffusion demo, by running the real tools:

    1 corpus      python -m megafusion.demo.masked.corpus      text / image_text / audio_text records + eval prompts
    2 tokenizer   tools/train_tokenizer.py                      SentencePiece (256 pieces) on the records' text
    3 preprocess  tools/preprocess_data.py --family masked_diffusion   palette images (32x32, 4x4 patches, 2 levels:
                                                                 64 codes of 8) and mu-law audio (1000 Hz, 32 levels)
    4 train       megafusion train --config configs/masked_diffusion_demo.yaml
    5 probe       python -m megafusion.demo.masked.probe: text->image conditioning without the sampler
    6 generate    megafusion generate (text->image, text->audio, unconditional text)
    7 score       (in this process) the mini-GenEval checker on the decoded PNGs, the FFT tone classifier on the
                  WAVs, per-modality losses first vs last -> DIR/report/report.md + metrics.json

The budget (--minutes, default 8) gives training all but RESERVE_MINUTES, as a step count from the reference
speed and a wall-clock cap (training.exit_duration_minutes). Stages run through megafusion.demo.pipeline.run_stage
(own session, signals forwarded, dies with the demo); DIR/demo.json records every command and its time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Dict, List, Optional

import numpy as np

from megafusion.demo.pipeline import ROOT, StageFailed, run_stage
from megafusion.demo.pipeline import training_plan as pipeline_training_plan

RESERVE_MINUTES = 2.0  # corpus, tokenizer, preprocessing, the processes' start-up, generation, scoring
STEPS_PER_MINUTE = 150.0  # configs/masked_diffusion_demo.yaml (batch 32 x 128) on 2 CPU cores: 1200 steps took 6.5 min
MIN_TRAIN_STEPS = 10
TEXT_VOCAB = 256
# 2 levels per channel: the world's six colours and its backgrounds map to 8 distinct codes, and a 4x4 patch is
# either object or background (4 levels give 64 codes with blended edges: after 1200 steps no object came out)
IMAGE_TOKENIZER = {"name": "palette", "config": {"resolution": 32, "patch": 4, "levels": 2}}
AUDIO_RATE = 1000
AUDIO_TOKENIZER = {"name": "mulaw", "config": {"sample_rate": AUDIO_RATE, "levels": 32, "hop": 1}}
SEQ_LENGTH = 128
CONFIG = os.path.join("configs", "masked_diffusion_demo.yaml")
LOSS_KEYS = ("loss", "loss_text", "loss_image", "loss_audio")


def training_plan(minutes: float) -> tuple:
    return pipeline_training_plan(minutes, RESERVE_MINUTES, STEPS_PER_MINUTE, MIN_TRAIN_STEPS)


class MaskedDemo:
    def __init__(self, out: str, minutes: float = 10.0, seed: int = 0, scale: float = 1.0, eval_images: int = 48,
                 audio_per_class: int = 4, image_cfg: float = 4.0, audio_cfg: float = 2.0, order: str = "confidence",
                 image_steps: int = 64,
                 train_steps: Optional[int] = None, train_overrides: Optional[List[str]] = None,
                 text_samples: int = 4):
        self.out = os.path.abspath(out)
        self.minutes, self.seed, self.scale = minutes, seed, scale
        self.eval_images, self.audio_per_class, self.text_samples = eval_images, audio_per_class, text_samples
        self.image_cfg, self.audio_cfg, self.order, self.image_steps = image_cfg, audio_cfg, order, image_steps
        planned, self.train_minutes = training_plan(minutes)
        self.train_steps = int(train_steps) if train_steps else planned
        self.train_overrides = list(train_overrides or [])
        self.stages: List[dict] = []
        self.python = sys.executable

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    # ------------------------------------------------------------------ the stages
    def plan(self) -> List[tuple]:
        py, d = self.python, self.path
        warmup = min(30, max(1, self.train_steps // 10))
        # temperature 1: greedy candidates (0) reveal the background everywhere (blank images at 660 steps)
        gen = [py, "-m", "megafusion.cli", "generate", "--checkpoint", d("run"), "--no-progress", "--order",
               self.order, "--temperature", "1"]
        return [
            ("corpus", [py, "-m", "megafusion.demo.masked.corpus", "--out", d("corpus"), "--seed", str(self.seed),
                        "--scale", str(self.scale), "--audio-rate", str(AUDIO_RATE), "--eval-images",
                        str(self.eval_images), "--eval-audio-per-class", str(self.audio_per_class)]),
            ("tokenizer", [py, "tools/train_tokenizer.py", "--input", d("corpus", "tokenizer_text.jsonl"),
                           "--model-prefix", d("tokenizer", "tok"), "--vocab-size", str(TEXT_VOCAB)]),
            ("preprocess", [py, "tools/preprocess_data.py", "--family", "masked_diffusion", "--input",
                            d("corpus", "train.parquet"), "--output", d("data"), "--tokenizer",
                            d("tokenizer", "tok.model"), "--image-tokenizer", json.dumps(IMAGE_TOKENIZER),
                            "--audio-tokenizer", json.dumps(AUDIO_TOKENIZER), "--max-mixed-length",
                            str(SEQ_LENGTH), "--no-progress", "--overwrite"]),
            ("train", [py, "-m", "megafusion.cli", "train", "--config", CONFIG, f"data.paths=[{d('data')}]",
                       f"data.seq_length={SEQ_LENGTH}", f"training.run_dir={d('run')}",
                       f"training.train_steps={self.train_steps}", f"optimizer.warmup_steps={warmup}",
                       f"training.exit_duration_minutes={self.train_minutes:.2f}", f"training.seed={self.seed}",
                       *self.train_overrides]),
            ("probe", [py, "-m", "megafusion.demo.masked.probe", "--checkpoint", d("run"), "--prompts",
                       d("corpus", "eval", "text_to_image.jsonl"), "--truth", d("corpus", "eval", "truth.json"),
                       "--out", d("report", "probe.json")]),
            ("generate text->image", [*gen, "--prompts", d("corpus", "eval", "text_to_image.jsonl"), "--out",
                                      d("generated", "text_to_image"), "--cfg-scale", str(self.image_cfg),
                                      "--steps", str(self.image_steps), "--batch-size", "16"]),
            ("generate text->audio", [*gen, "--prompts", d("corpus", "eval", "audio.jsonl"), "--out",
                                      d("generated", "audio"), "--cfg-scale", str(self.audio_cfg), "--batch-size",
                                      "20"]),
            ("generate text", [*gen, "--prompts", self._text_prompts(), "--out", d("generated", "text"),
                               "--batch-size", "8", "--block-length", "8"]),
        ]

    def _text_prompts(self) -> str:
        path = self.path("corpus", "eval", "text.jsonl")
        return path  # written by run() before the generate stages

    def run(self) -> str:
        os.makedirs(self.out, exist_ok=True)
        plan = self.plan()
        start = time.monotonic()
        print(f"[demo masked] {self.out}: {len(plan)} stages in about {self.minutes:g} minutes (training "
              f"{self.train_steps} steps, at most {self.train_minutes:.1f} minutes)", flush=True)
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        for index, (name, command) in enumerate(plan, start=1):
            if name == "generate text->image":
                with open(self._text_prompts(), "w") as f:
                    for i in range(self.text_samples):
                        f.write(json.dumps({"id": f"text-{i}", "generate": "text", "tokens": 24,
                                            "seed": 3000 + i}) + "\n")
            shown = " ".join(shlex.quote(a) for a in command).replace(
                f"{shlex.quote(self.python)} -m megafusion.cli", "megafusion").replace(shlex.quote(self.python), "python")
            print(f"[demo masked {index}/{len(plan)}] {name}: {shown}", flush=True)
            t0 = time.monotonic()
            rc, stopped = run_stage(command, env)
            seconds = time.monotonic() - t0
            self.stages.append({"name": name, "command": shown, "seconds": round(seconds, 1), "returncode": rc})
            self._save(time.monotonic() - start)
            if stopped:
                raise StageFailed(f"stopped by {stopped} during stage {name!r}; its command was:\n  {shown}")
            if rc != 0:
                raise StageFailed(f"stage {name!r} failed (exit status {rc}); its command was:\n  {shown}")
            print(f"[demo masked {index}/{len(plan)}] {name}: done in {seconds:.0f} s", flush=True)
        t0 = time.monotonic()
        metrics = score(self.out)
        self.stages.append({"name": "score + report", "command": "(in process)",
                            "seconds": round(time.monotonic() - t0, 1), "returncode": 0})
        total = time.monotonic() - start
        self._save(total)
        metrics["wall_seconds"] = round(total, 1)
        metrics["stages"] = self.stages
        metrics["settings"] = self.settings()
        write_report(self.out, metrics)
        print(f"[demo masked] finished in {total / 60:.1f} minutes: {self.path('report', 'report.md')}", flush=True)
        return self.path("report", "report.md")

    def settings(self) -> dict:
        return {"minutes": self.minutes, "seed": self.seed, "corpus_scale": self.scale,
                "train_steps": self.train_steps, "train_minutes_cap": round(self.train_minutes, 2),
                "image_cfg": self.image_cfg, "audio_cfg": self.audio_cfg, "order": self.order,
                "eval_images": self.eval_images, "audio_per_class": self.audio_per_class,
                "image_tokenizer": IMAGE_TOKENIZER, "audio_tokenizer": AUDIO_TOKENIZER,
                "train_overrides": self.train_overrides}

    def _save(self, total_seconds: float) -> None:
        with open(self.path("demo.json"), "w") as f:
            json.dump({"family": "masked_diffusion", "stages": self.stages, "total_seconds": round(total_seconds, 1),
                       "settings": self.settings()}, f, indent=2)
            f.write("\n")


# ---------------------------------------------------------------------------------------------------- scoring
def loss_summary(metrics_path: str) -> Dict[str, dict]:
    """Per loss key: mean over the first and the last tenth of the logged steps (at least 1 and at most 50 steps:
    single steps are noisy, every step draws its own masking time t), and valid_loss first vs last."""
    rows = []
    with open(metrics_path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    out: Dict[str, dict] = {}
    for key in LOSS_KEYS:
        series = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not series:
            continue
        k = min(50, max(1, len(series) // 10))
        first, last = series[:k], series[-k:]
        out[key] = {"first": float(np.mean([v for _, v in first])), "last": float(np.mean([v for _, v in last])),
                    "first_steps": [first[0][0], first[-1][0]], "last_steps": [last[0][0], last[-1][0]]}
        out[key]["went_down"] = out[key]["last"] < out[key]["first"]
    valid = [(r["step"], r["valid_loss"]) for r in rows if r.get("valid_loss") is not None]
    if valid:
        out["valid_loss"] = {"first": valid[0][1], "last": valid[-1][1], "first_steps": [valid[0][0]] * 2,
                             "last_steps": [valid[-1][0]] * 2, "went_down": valid[-1][1] < valid[0][1]}
    return out


def score_images(generated: str, truth: dict) -> dict:
    """score_text_to_image of the generated PNGs, and of the palette round trip of the prompt scenes' renders (the
    ceiling the tokenizer + checker allow)."""
    from PIL import Image

    from megafusion.demo.scoring import score_text_to_image
    from megafusion.demo.world import Scene, render
    from megafusion.encoders.discrete import build_discrete_tokenizer

    palette = build_discrete_tokenizer(IMAGE_TOKENIZER)
    with open(os.path.join(generated, "results.json")) as f:
        results = json.load(f)["results"]
    items, ceiling = [], []
    for r in results:
        scene = Scene.from_dict(truth[r["id"]])
        items.append((scene, np.asarray(Image.open(os.path.join(generated, r["image"])).convert("RGB"))))
        ceiling.append((scene, palette.decode(palette.encode(render(scene)))))
    keep = ("color", "shape", "position", "object")
    got, top = score_text_to_image(items), score_text_to_image(ceiling)
    return {k: {**got[k], "palette_ceiling": top[k]["accuracy"]} for k in keep}


def score_audio(generated: str, truth: dict) -> dict:
    from megafusion.demo.masked import audio as tones
    from megafusion.encoders.discrete import build_discrete_tokenizer
    from megafusion.encoders.discrete.audio_io import read_wav

    mulaw = build_discrete_tokenizer(AUDIO_TOKENIZER)
    with open(os.path.join(generated, "results.json")) as f:
        results = json.load(f)["results"]
    per_class = {c: [] for c in tones.CLASSES}
    hits, ceiling, predictions = [], [], {}
    for r in results:
        wave_, rate = read_wav(os.path.join(generated, r["audio"]))
        predicted = tones.classify(wave_, rate)
        predictions[r["id"]] = predicted
        hit = predicted == truth[r["id"]]
        hits.append(hit)
        per_class[truth[r["id"]]].append(hit)
        reference = tones.tone(truth[r["id"]], AUDIO_RATE, len(wave_) / rate)
        ceiling.append(tones.classify(mulaw.decode(mulaw.encode(reference)), AUDIO_RATE) == truth[r["id"]])
    n = len(hits)
    return {"tone_class": {"accuracy": sum(hits) / n if n else None, "chance": 1 / len(tones.CLASSES),
                           "above_chance": (sum(hits) / n - 1 / len(tones.CLASSES)) if n else None, "n": n,
                           "mulaw_ceiling": sum(ceiling) / n if n else None},
            "per_class": {c: (sum(v) / len(v) if v else None) for c, v in per_class.items()},
            "predictions": predictions}


def score(out: str) -> dict:
    with open(os.path.join(out, "corpus", "eval", "truth.json")) as f:
        truth = json.load(f)
    metrics = {"losses": loss_summary(os.path.join(out, "run", "metrics.jsonl")),
               "text_to_image": score_images(os.path.join(out, "generated", "text_to_image"), truth),
               "text_to_audio": score_audio(os.path.join(out, "generated", "audio"), truth)}
    probe = os.path.join(out, "report", "probe.json")
    if os.path.exists(probe):
        with open(probe) as f:
            metrics["text_to_image_probe"] = json.load(f)
    text_results = os.path.join(out, "generated", "text", "results.json")
    if os.path.exists(text_results):
        with open(text_results) as f:
            metrics["text_samples"] = [r.get("text") for r in json.load(f)["results"]]
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    metrics["trained_steps"] = lines[-1]["step"] if lines else 0
    return metrics


def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_report(out: str, metrics: dict) -> None:
    os.makedirs(os.path.join(out, "report"), exist_ok=True)
    with open(os.path.join(out, "report", "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    s = metrics.get("settings", {})
    lines = ["# Masked-diffusion demo (tri-modal: text, palette image codes, mu-law audio codes)", "",
             f"{metrics['trained_steps']} training steps (planned {s.get('train_steps')}), wall time "
             f"{metrics.get('wall_seconds', 0) / 60:.1f} minutes. Image CFG {s.get('image_cfg')}, audio CFG "
             f"{s.get('audio_cfg')}, order {s.get('order')}.", "",
             "## Losses (mean over the first / last logged steps)", "",
             "| loss | first | last | steps (first) | steps (last) | down |", "|---|---|---|---|---|---|"]
    for key, v in metrics["losses"].items():
        lines.append(f"| {key} | {_fmt(v['first'])} | {_fmt(v['last'])} | {v['first_steps'][0]}-"
                     f"{v['first_steps'][1]} | {v['last_steps'][0]}-{v['last_steps'][1]} | "
                     f"{'yes' if v['went_down'] else 'NO'} |")
    lines += ["", "## Text -> image (mini-GenEval checker on the decoded 32x32 PNGs)", "",
              "| metric | accuracy | chance | palette ceiling | n |", "|---|---|---|---|---|"]
    for key, v in metrics["text_to_image"].items():
        lines.append(f"| {key} | {_fmt(v['accuracy'])} | {_fmt(v['chance'])} | {_fmt(v['palette_ceiling'])} | "
                     f"{v['n']} |")
    if metrics.get("text_to_image_probe"):
        c, q = metrics["text_to_image_probe"]["colour"], metrics["text_to_image_probe"]["position"]
        lines += ["", f"Sampler-free probe (caption clean, image fully masked, one forward; "
                      f"megafusion/demo/masked/probe.py): colour {_fmt(c['accuracy'])} vs chance {_fmt(c['chance'])}, "
                      f"object-patch overlap {_fmt(q['overlap'])} vs chance {_fmt(q['chance'])} (n={c['n']})."]
    a = metrics["text_to_audio"]["tone_class"]
    lines += ["", "## Text -> audio (FFT tone class: low / medium / high / rising / falling)", "",
              f"accuracy {_fmt(a['accuracy'])} vs chance {_fmt(a['chance'])} (mu-law ceiling "
              f"{_fmt(a['mulaw_ceiling'])}, n={a['n']}); per class: " +
              ", ".join(f"{c} {_fmt(v, 2)}" for c, v in metrics["text_to_audio"]["per_class"].items()), ""]
    if metrics.get("text_samples"):
        lines += ["## Unconditional text samples", ""] + [f"- {t!r}" for t in metrics["text_samples"]] + [""]
    if metrics.get("stages"):
        lines += ["## Stages", "", "| stage | seconds | command |", "|---|---|---|"]
        lines += [f"| {st['name']} | {st['seconds']} | `{st['command']}` |" for st in metrics["stages"]]
        lines.append("")
    with open(os.path.join(out, "report", "report.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/demo_masked")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--image-cfg", type=float, default=4.0)
    p.add_argument("--audio-cfg", type=float, default=2.0)
    p.add_argument("--order", choices=("confidence", "random"), default="confidence")
    p.add_argument("--image-steps", type=int, default=64)
    p.add_argument("--eval-images", type=int, default=48)
    p.add_argument("--audio-per-class", type=int, default=4)
    p.add_argument("overrides", nargs="*", help="training dotlist overrides")
    a = p.parse_args(argv)
    try:
        MaskedDemo(a.out, a.minutes, a.seed, a.scale, eval_images=a.eval_images, audio_per_class=a.audio_per_class,
                   image_cfg=a.image_cfg, audio_cfg=a.audio_cfg, order=a.order, image_steps=a.image_steps,
                   train_steps=a.train_steps, train_overrides=a.overrides).run()
    except (StageFailed, ValueError) as exc:
        print(f"megafusion demo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
