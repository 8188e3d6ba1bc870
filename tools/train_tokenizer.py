#!/usr/bin/env python
"""Train the SentencePiece tokenizer (special tokens at megafusion's reserved ids) from parquet / JSONL inputs.

    python tools/train_tokenizer.py --input data/*.parquet --model-prefix out/tok --vocab-size 32000

Writes <prefix>.model, <prefix>.vocab and <prefix>.special_tokens.json. See docs/preprocessing.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megafusion.preprocess.cli_args import add_input_args, columns_from_args  # noqa: E402
from megafusion.preprocess.tokenizer_training import MODEL_TYPES, train_tokenizer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(parser)
    parser.add_argument("--model-prefix", required=True, help="output path prefix (<prefix>.model is written)")
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size, special tokens included")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--byte-fallback", action="store_true", help="unknown characters become byte pieces")
    parser.add_argument("--input-sentence-size", type=int, default=0,
                        help="sample at most this many lines (0 = all)")
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    path = train_tokenizer(args.input, args.model_prefix, args.vocab_size, args.model_type,
                           columns_from_args(args), args.kind, args.character_coverage, args.byte_fallback,
                           args.input_sentence_size, args.num_threads)
    print(path)


if __name__ == "__main__":
    main()
