"""`megafusion demo`: the whole pipeline on this machine, with no downloads, by running the real tools in order:

    1 corpus      python -m megafusion.demo.stages corpus       procedural world -> parquet corpus + held-out eval set
    2 tokenizer   tools/train_tokenizer.py                       SentencePiece on the corpus text
    3 preprocess  tools/preprocess_data.py --workers 2           tokens + pixel-encoder latents -> indexed dataset
    4 train       megafusion train --config demo                 the model (adaptive loss weighting; with
                                                                 --compare-weighting also fixed, same budget)
    5 prompts     python -m megafusion.demo.stages prompts       prompt files from the held-out eval set
    6 generate    megafusion generate (x3 per run)               text->image, image->text, text->video
    7 score       python -m megafusion.demo.stages score         mini-GenEval -> metrics
    8 report      python -m megafusion.demo.stages report        report.md, metrics.json, grids, loss curves

Every stage prints one line when it starts and one when it ends (with its time), streams the tool's own output
(progress bars, training lines), and is recorded with its exact command in DIR/demo.json and the report, so any
stage can be repeated by hand. The time budget (--minutes, default 15) is split: the stages other than training
take about STAGE_RESERVE_MINUTES on two CPU cores, training gets the rest, as a step count from the reference
machine's training speed and a wall-clock cap (training.exit_duration_minutes) in case this machine is slower.

Each stage runs in its own session and dies with the demo (megafusion.utils.processes.die_with_parent, SIGTERM so a
training stage still saves); SIGINT / SIGTERM / SIGUSR1 sent to the demo are forwarded to the running stage once,
the demo waits for it to stop and then exits without starting the next stage.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGE_RESERVE_MINUTES = 2.5  # corpus, tokenizer, preprocessing, generation, scoring, report: ~2.1 min measured
STEPS_PER_MINUTE = 65.0  # configs/demo.yaml on the reference 2-core machine (632 steps took 9.5 minutes)
MIN_TRAIN_STEPS = 20
VOCAB_SIZE = 512
GENERATION = ["--steps", "25", "--cfg-scale", "3", "--batch-size", "16"]


class StageFailed(RuntimeError):
    """A stage's command exited with a non-zero status, or the demo was asked to stop."""


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def run_stage(command: List[str], env: dict) -> tuple:
    """Run one stage's command to its end; returns (exit status, name of the stop signal forwarded or None)."""
    from megafusion.utils.processes import die_with_parent

    parent = os.getpid()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True,
                            preexec_fn=lambda: die_with_parent(parent, signal.SIGTERM))
    stopped = []

    def forward(signum, frame):
        if not stopped:  # once: a second signal would abort a stage that is saving
            stopped.append(signal.Signals(signum).name)
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        return proc.wait(), (stopped[0] if stopped else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def training_plan(minutes: float, reserve: float = STAGE_RESERVE_MINUTES, steps_per_minute: float = STEPS_PER_MINUTE,
                  min_steps: int = MIN_TRAIN_STEPS) -> tuple:
    """(train_steps, training minutes) for a total budget of `minutes`, `reserve` of them for the other stages."""
    if minutes <= reserve:
        raise ValueError(f"--minutes {minutes} leaves no time to train: the other stages need about "
                         f"{reserve} minutes; give more than that")
    train_minutes = minutes - reserve
    return max(min_steps, int(steps_per_minute * train_minutes)), train_minutes


class Pipeline:
    def __init__(self, out: str, minutes: float = 15.0, compare_weighting: bool = False, seed: int = 0,
                 corpus_scale: float = 1.0, train_overrides: Optional[List[str]] = None, prompt_seeds: int = 2):
        self.out = os.path.abspath(out)
        self.prompt_seeds = prompt_seeds
        self.minutes, self.compare, self.seed, self.scale = minutes, compare_weighting, seed, corpus_scale
        self.train_steps, self.train_minutes = training_plan(minutes)
        self.train_overrides = list(train_overrides or [])
        self.labels = ["adaptive", "fixed"] if compare_weighting else ["adaptive"]
        self.stages: List[dict] = []
        self.python = sys.executable

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def _plan(self) -> List[tuple]:
        py, d = self.python, self.path
        steps = [
            ("corpus", [py, "-m", "megafusion.demo.stages", "corpus", "--out", d("corpus"), "--seed",
                        str(self.seed), "--scale", str(self.scale)]),
            ("tokenizer", [py, "tools/train_tokenizer.py", "--input", "@TRAIN_PARQUET",
                           "--model-prefix", d("tokenizer", "tok"), "--vocab-size", str(VOCAB_SIZE)]),
            ("preprocess", [py, "tools/preprocess_data.py", "--input", "@TRAIN_PARQUET",
                            "--output", d("data"), "--tokenizer", d("tokenizer", "tok.model"), "--encoder", "pixel",
                            "--resolution", "32", "--patch-size", "4", "--seq-length", "384", "--workers", "2",
                            "--overwrite"]),
        ]
        for label in self.labels:
            steps.append((f"train ({label})", [
                py, "-m", "megafusion.cli", "train", "--config", "demo", f"data.paths=[{d('data')}]",
                f"training.run_dir={d('runs', label)}", f"training.train_steps={self.train_steps}",
                f"training.exit_duration_minutes={self.train_minutes:.2f}", f"objective.loss_weighting={label}",
                f"training.seed={self.seed}", f"model.vocab_size={VOCAB_SIZE}", *self.train_overrides]))
        steps.append(("prompts", [py, "-m", "megafusion.demo.stages", "prompts", "--corpus", d("corpus"),
                                  "--out", d("prompts"), "--seeds", str(self.prompt_seeds)]))
        for label in self.labels:
            common = ["--checkpoint", d("runs", label), "--no-progress", *GENERATION]
            steps += [
                (f"generate text->image ({label})", [py, "-m", "megafusion.cli", "generate", *common, "--prompts",
                                                     d("prompts", "text_to_image.jsonl"), "--out",
                                                     d("generated", label, "text_to_image"), "--max-new-tokens",
                                                     "1"]),
                (f"generate image->text ({label})", [py, "-m", "megafusion.cli", "generate", *common, "--prompts",
                                                     d("prompts", "image_to_text.jsonl"), "--out",
                                                     d("generated", label, "image_to_text"), "--no-images",
                                                     "--max-new-tokens", "16"]),
                (f"generate text->video ({label})", [py, "-m", "megafusion.cli", "generate", *common, "--prompts",
                                                     d("prompts", "text_to_video.jsonl"), "--out",
                                                     d("generated", label, "text_to_video"), "--max-new-tokens",
                                                     "1"]),
                (f"score ({label})", [py, "-m", "megafusion.demo.stages", "score", "--corpus", d("corpus"),
                                      "--generated", d("generated", label), "--out",
                                      d("report", f"metrics_{label}.json")]),
            ]
        steps.append(("report", [py, "-m", "megafusion.demo.stages", "report", "--demo", self.out, "--runs",
                                 *self.labels]))
        return steps

    def _expand(self, command: List[str]) -> List[str]:
        out = []
        for arg in command:
            if arg == "@TRAIN_PARQUET":
                out += sorted(glob.glob(self.path("corpus", "train", "*.parquet")))
            else:
                out.append(arg)
        return out

    @staticmethod
    def _shown(command: List[str]) -> str:
        text = " ".join(shlex.quote(a) if a != "@TRAIN_PARQUET" else "CORPUS/train/*.parquet" for a in command)
        return text.replace(f"{sys.executable} -m megafusion.cli", "megafusion").replace(sys.executable, "python")

    def run(self) -> str:
        os.makedirs(self.out, exist_ok=True)
        plan = self._plan()
        start = time.monotonic()
        print(f"[demo] {self.out}: {len(plan)} stages in about {self.minutes:g} minutes (training "
              f"{self.train_steps} steps, at most {self.train_minutes:.1f} minutes per run)", flush=True)
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        for index, (name, command) in enumerate(plan, start=1):
            shown = self._shown(command).replace("CORPUS", self.path("corpus"))
            print(f"[demo {index}/{len(plan)}] {name}: {shown}", flush=True)
            t0 = time.monotonic()
            rc, stopped = run_stage(self._expand(command), env)
            seconds = time.monotonic() - t0
            self.stages.append({"name": name, "command": shown, "seconds": round(seconds, 1), "returncode": rc})
            self._save(time.monotonic() - start)
            if stopped:
                raise StageFailed(f"stopped by {stopped} during stage {name!r} (exit status {rc}); the stages "
                                  f"before it are in {self.out}, and its command was:\n  {shown}")
            if rc != 0:
                raise StageFailed(f"stage {name!r} failed (exit status {rc}); its command was:\n  {shown}")
            print(f"[demo {index}/{len(plan)}] {name}: done in {seconds:.0f} s", flush=True)
        total = time.monotonic() - start
        self._save(total)
        self._finish_report()
        print(f"[demo] finished in {total / 60:.1f} minutes: {self.path('report', 'report.md')}", flush=True)
        return self.path("report", "report.md")

    def _save(self, total_seconds: float) -> None:
        info = {"stages": self.stages, "total_seconds": round(total_seconds, 1),
                "settings": {"minutes": self.minutes, "seed": self.seed, "compare_weighting": self.compare,
                             "corpus_scale": self.scale, "prompt_seeds": self.prompt_seeds,
                             "train_steps": self.train_steps,
                             "train_minutes_cap": round(self.train_minutes, 2), "runs": self.labels}}
        with open(self.path("demo.json"), "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")

    def _finish_report(self) -> None:
        """Rebuild the report with the final timings (the report stage ran before the last one was known)."""
        from megafusion.demo.report_builder import build_report

        build_report(self.out, self.labels)
