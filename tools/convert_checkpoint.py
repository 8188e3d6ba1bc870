#!/usr/bin/env python
"""Convert between megafusion checkpoints and Hugging Face folders (megafusion/hf/export.py, importer.py).

    python tools/convert_checkpoint.py to-hf   --checkpoint CKPT --out HF_DIR [--dtype bf16|fp32] [--max-shard-size 5GB]
    python tools/convert_checkpoint.py from-hf --hf HF_DIR --out CKPT [--tp N] [--pp N] [--ep N]

to-hf takes a run folder, a checkpoint root or an iter_* folder saved with any TP / PP / EP layout and writes
config.json, safetensors shards (+ index above the shard size), generation_config.json, the tokenizer and the
remote code (AutoModel.from_pretrained(HF_DIR, trust_remote_code=True) works without megafusion installed).
from-hf writes a checkpoint that `megafusion train ... checkpoint.load=CKPT` and `megafusion generate
--checkpoint CKPT` load. Both publish their output only when complete and print their peak memory.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    to = sub.add_parser("to-hf", help="megafusion checkpoint -> Hugging Face folder")
    to.add_argument("--checkpoint", required=True, help="a run folder, a checkpoint root or an iter_* folder")
    to.add_argument("--out", required=True, help="the Hugging Face folder to write (must not exist)")
    to.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="dtype of the written weights")
    to.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    to.add_argument("--tokenizer", default=None, help="SentencePiece model (default: from the training data)")
    back = sub.add_parser("from-hf", help="Hugging Face folder -> megafusion checkpoint")
    back.add_argument("--hf", required=True, help="a folder written by to-hf")
    back.add_argument("--out", required=True, help="the checkpoint root to write (must not exist)")
    back.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is laid out for")
    back.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    back.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    for p in (to, back):
        p.add_argument("--overwrite", action="store_true", help="replace --out once the new folder is complete")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from megafusion.errors import run_reporting

    def body() -> int:
        if args.direction == "to-hf":
            from megafusion.hf.export import to_hf

            report = to_hf(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                           tokenizer=args.tokenizer, overwrite=args.overwrite)
        else:
            from megafusion.hf.importer import from_hf

            for flag in ("tp", "pp", "ep"):
                if getattr(args, flag) < 1:
                    raise ValueError(f"--{flag} {getattr(args, flag)} must be >= 1")
            report = from_hf(args.hf, args.out, tp=args.tp, pp=args.pp, ep=args.ep, overwrite=args.overwrite)
        print(report.summary())
        return 0

    return run_reporting(f"convert_checkpoint {args.direction}", body)


if __name__ == "__main__":
    sys.exit(main())
