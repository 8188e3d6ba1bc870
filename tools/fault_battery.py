#!/usr/bin/env python
"""The fault battery: inject every fault a long job meets on a shared cluster into real `megafusion` runs and check
that each is handled: the exit status, the error line, what is on disk, no data lost, no process left behind.

    python tools/fault_battery.py [--only NAME ...] [--keep DIR] [--list]

Every fault runs real commands (`python -m megafusion.cli train ...`, tools/preprocess_data.py, 2-rank gloo jobs
launched srun-style) in a scratch folder; processes are tagged through their environment, so anything a run leaves
alive (loader workers, checkpoint writers, orphaned ranks) is found and counted, then killed. The faults live in
tools/fault_cases.py, the bookkeeping in tools/fault_harness.py. The summary line reads
`faults: N injected, N handled, 0 lost, 0 hung, 0 processes left`; the exit status is 0 only when every fault was
handled.

NaN faults need a NaN on a chosen step: `python tools/fault_battery.py inject --nan-steps 3 -- train ...` runs
`megafusion train` with the loss of those steps poisoned (the battery's only in-process hook; every other fault is
injected from outside: signals, kill -9, files truncated or made unwritable, a full tmpfs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def inject(argv) -> int:
    """`inject --nan-steps 3,5 -- <megafusion arguments>`: run the CLI with the loss of those steps made NaN."""
    parser = argparse.ArgumentParser(prog="fault_battery.py inject")
    parser.add_argument("--nan-steps", default="", help="comma-separated 1-based steps whose loss becomes NaN")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    steps = {int(s) for s in args.nan_steps.split(",") if s}
    from megafusion.training import forward_step, loop

    current = {"step": 0}
    original_loss, original_step = forward_step._loss_func, loop.Trainer.train_step

    def poisoned(batch, weighting, output):
        loss, report = original_loss(batch, weighting, output)
        if current["step"] in steps:
            loss = loss * float("nan")
            report["loss_fm"] = report["loss_fm"] * float("nan")
        return loss, report

    def train_step(self):
        current["step"] = self.state.step + 1
        return original_step(self)

    forward_step._loss_func, loop.Trainer.train_step = poisoned, train_step
    from megafusion.cli import main as cli_main

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    return cli_main(rest)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inject"]:
        return inject(argv[1:])
    from fault_cases import SCENARIOS
    from fault_harness import Battery

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="run only these faults (names from --list)")
    parser.add_argument("--keep", default=None, help="scratch folder to keep (default: a temp folder, removed)")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (expected, _) in SCENARIOS.items():
            print(f"{name:28s} {expected}")
        return 0
    unknown = sorted(set(args.only or ()) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; --list shows them")
    scratch = args.keep or tempfile.mkdtemp(prefix="megafusion-faults-")
    os.makedirs(scratch, exist_ok=True)
    battery = Battery(scratch)
    start = time.monotonic()
    try:
        for name, (expected, scenario) in SCENARIOS.items():
            if args.only is None or name in args.only:
                battery.run(name, expected, scenario)
    finally:
        battery.cleanup()
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(battery.table())
    print(battery.summary() + f" ({time.monotonic() - start:.0f} s)")
    return 0 if battery.all_handled() else 1


if __name__ == "__main__":
    sys.exit(main())
