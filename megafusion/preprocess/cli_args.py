"""Command-line flags shared by tools/train_tokenizer.py and tools/preprocess_data.py (inputs, kind, columns),
so both read the same records the same way."""

from __future__ import annotations

import argparse

from megafusion.preprocess.records import KIND_MODES, Columns


def add_input_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help="parquet / JSONL files, in record order")
    parser.add_argument("--kind", choices=KIND_MODES, default="auto",
                        help="record kind of every row; auto = the kind column, else inferred per row")
    defaults = Columns()
    for name in Columns.__dataclass_fields__:
        parser.add_argument(f"--{name}-column", default=getattr(defaults, name), help=f"column holding {name}")


def columns_from_args(args: argparse.Namespace) -> Columns:
    return Columns(**{name: getattr(args, f"{name}_column") for name in Columns.__dataclass_fields__})
