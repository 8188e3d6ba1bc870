"""<run_dir>/last_exit.json: how the last `megafusion train` in a run folder ended, and what a launcher does next.

Rank 0 writes the record (atomically) only when training ends by itself: it finished, or it stopped at an agreed
step after a signal, training.exit_duration_minutes or training.exit_interval, with that step's checkpoint saved.
A crash writes none. The launcher cannot learn this from exit statuses: torchrun exits non-zero after it forwarded
a signal to its workers, however cleanly they saved. So launch/common.sh exports MEGAFUSION_LAUNCH_ID (unique per
start), which the record carries, and after the job step asks

    python -m megafusion.training.exit_record --run-dir RUN_DIR --launch-id ID

which prints one line, `<verdict> <why>`, with the verdict one of

    requeue   stopped by SIGUSR1 (SLURM's warning before the time limit, or `scancel --signal=USR1 --batch`) or by
              training.exit_duration_minutes, checkpoint saved, at least one step done since the start: resume later
    done      training.train_steps (or the FLOPs budget) reached
    stop      stopped on purpose and saved: SIGTERM / Ctrl-C (a cancellation) or training.exit_interval
    failed    no record from this launch (the step crashed or was killed), or a stop without progress since the
              start (requeueing would loop)

and exits 0 for requeue / done / stop, 1 for failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Optional, Tuple

from megafusion.utils.files import write_atomic

FILENAME = "last_exit.json"
LAUNCH_ID_ENV = "MEGAFUSION_LAUNCH_ID"
REASONS = ("finished", "signal", "exit_duration", "exit_interval")


def write_exit_record(run_dir: str, *, reason: str, step: int, start_step: int, total_steps: int,
                      checkpoint_step: Optional[int], signal_number: Optional[int] = None) -> dict:
    """Write <run_dir>/last_exit.json (rank 0 only); returns the record."""
    if reason not in REASONS:
        raise ValueError(f"exit reason {reason!r} is not one of {REASONS}")
    name = None
    if signal_number is not None:
        try:
            name = signal.Signals(signal_number).name
        except ValueError:
            name = None  # signals.REQUESTED: a stop asked for by code
    record = {
        "reason": reason,
        "signal": name,
        "step": step,
        "start_step": start_step,
        "total_steps": total_steps,
        "checkpoint_step": checkpoint_step,
        "saved": checkpoint_step == step,
        "launch_id": os.environ.get(LAUNCH_ID_ENV),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.makedirs(run_dir, exist_ok=True)
    write_atomic(os.path.join(run_dir, FILENAME), json.dumps(record, indent=1) + "\n")
    return record


def read_exit_record(run_dir: str) -> Optional[dict]:
    """The record, or None when there is none (or it does not parse)."""
    try:
        with open(os.path.join(run_dir, FILENAME)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def verdict(record: Optional[dict], launch_id: Optional[str]) -> Tuple[str, str]:
    """(requeue | done | stop | failed, the reason in words) for a launcher; see the module docstring."""
    if record is None or (launch_id is not None and record.get("launch_id") != launch_id):
        return "failed", ("training did not end cleanly: no exit record from this launch (it crashed or was killed; "
                          "the log above says why)")
    reason, step, start = record.get("reason"), record.get("step"), record.get("start_step")
    if reason == "finished":
        return "done", f"training finished at step {step} of {record.get('total_steps')}"
    if not record.get("saved"):
        return "failed", f"stopped ({reason}) at step {step} without a checkpoint of that step"
    if reason == "exit_interval":
        return "stop", f"training.exit_interval: stopped at step {step} with a checkpoint, as planned"
    if reason == "signal" and record.get("signal") != "SIGUSR1":
        return "stop", (f"{record.get('signal') or 'a stop request'}: saved step {step} and stopped (a cancellation; "
                        f"send SIGUSR1 to save and requeue)")
    cause = "SIGUSR1" if reason == "signal" else "training.exit_duration_minutes"
    if step is None or start is None or step <= start:
        return "failed", (f"{cause} at step {step}, no step done since the start at step {start}: not requeued (it "
                          f"would loop); give the job more time than start-up plus a checkpoint save")
    return "requeue", f"{cause}: saved step {step} (started at step {start}); resume from it"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megafusion.training.exit_record",
                                     description="Print `<verdict> <why>` for the last training run in a run folder.")
    parser.add_argument("--run-dir", required=True, help="training.run_dir of the run")
    parser.add_argument("--launch-id", default=None,
                        help=f"the {LAUNCH_ID_ENV} the launcher exported (a record from another launch is ignored)")
    args = parser.parse_args(argv)
    what, why = verdict(read_exit_record(args.run_dir), args.launch_id)
    print(f"{what} {why}")
    return 1 if what == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
