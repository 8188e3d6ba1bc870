"""`megafusion plan`: parameters, per-GPU memory, FLOPs and wall-clock of a config on N GPUs, before renting them.

    megafusion plan --config reference --gpus 128                        # a table
    megafusion plan --config 7b --gpus 256 --json                         # the same as one JSON object
    megafusion plan --config 7b --gpus 64 training.recompute=full --gpu-memory 141GB --mfu 0.35 --peak-tflops 989

The layout (TP / PP / EP, sequence parallelism, recompute, batch sizes) is the config's; overrides change it like
they do for `megafusion train`. Exit status 0 when the plan fits the GPU memory, 3 when it does not (the table
names the largest term), 2 for a config or flag that is wrong (one line naming it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from megafusion.planning.report import DEFAULT_MFU, DEFAULT_PEAK_TFLOPS

_UNITS = {"": 2**30, "g": 2**30, "gb": 2**30, "gib": 2**30, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory(text: str) -> float:
    """'80GB', '80GiB', '80' (GiB), '141 GB', '81920MB' -> bytes (GB read as GiB, as nvidia-smi's totals are)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--gpu-memory={text!r} is not a positive size like 80GB, 141GB or 81920MB")
    return float(match.group(1)) * _UNITS[unit]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="a YAML file or a preset name in configs/ (default: tiny)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the job (a multiple of TP x PP)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB, read as GiB)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"model FLOPs utilisation assumed for the wall-clock (default {DEFAULT_MFU})")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help=f"peak dense TFLOP/s of one GPU (default {DEFAULT_PEAK_TFLOPS:g}, H100 SXM bf16)")
    parser.add_argument("--latent-fraction", type=float, default=0.5,
                        help="share of sequence positions that are latent patches (default 0.5)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="plan for GPUs (default) or a CPU run (fp32 for precision=auto, no CUDA context)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. training.recompute=full")


def run(args: argparse.Namespace) -> int:
    from megafusion.config import load_config
    from megafusion.planning.report import make_plan

    try:
        cfg = load_config(args.config, args.overrides)
        plan = make_plan(cfg, args.gpus, name=args.config, gpu_memory=parse_memory(args.gpu_memory), mfu=args.mfu,
                         peak_tflops=args.peak_tflops, device=args.device, latent_fraction=args.latent_fraction)
    except (ValueError, FileNotFoundError) as exc:
        print(f"megafusion plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0 if plan.fits else 3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megafusion plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
