#!/usr/bin/env python
"""Preprocess parquet / JSONL corpora into a megafusion dataset folder (docs/DATA_FORMAT.md).

    python tools/preprocess_data.py --input data/*.parquet --output out/ds --tokenizer out/tok.model \\
        --encoder vae --encoder-path models/vae --resolution 256 --workers 8

Re-running the same command resumes (finished shards are kept). Exit status 1 with a message when the rejected
fraction exceeds --max-reject-fraction. See docs/preprocessing.md.
"""

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megafusion.preprocess.cli_args import add_input_args, columns_from_args  # noqa: E402


def _value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p)
    p.add_argument("--output", required=True, help="dataset folder")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model from tools/train_tokenizer.py")
    enc = p.add_argument_group("encoder")
    enc.add_argument("--encoder", default="pixel", help="pixel | vae | hf-vision | package.module:Class")
    enc.add_argument("--encoder-path", help="local model folder (vae, hf-vision)")
    enc.add_argument("--resolution", type=int, help="square image resolution (default: 256; hf-vision: native)")
    enc.add_argument("--crop", choices=("center", "resize"), default="center")
    enc.add_argument("--encoder-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                     help="compute dtype of the encoder")
    enc.add_argument("--device", default="cpu", help="encoder device (cpu, cuda, cuda:1, ...)")
    enc.add_argument("--encode-batch-size", type=int, default=16)
    enc.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="extra encoder keyword (value parsed as JSON when it parses), repeatable")
    p.add_argument("--latent-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="stored latent dtype (16-bit ones as uint16 bit patterns)")
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--min-image-size", type=int, default=32, help="reject images with a shorter side below this")
    p.add_argument("--max-reject-fraction", type=float, default=0.05)
    run = p.add_argument_group("execution")
    run.add_argument("--workers", type=int, default=1)
    run.add_argument("--records-per-shard", type=int, default=2000)
    run.add_argument("--chunk-records", type=int, default=64)
    run.add_argument("--threads-per-worker", type=int)
    run.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default="fork")
    run.add_argument("--keep-shards", action="store_true")
    run.add_argument("--overwrite", action="store_true")
    run.add_argument("--no-progress", action="store_true")
    return p


def options_from_args(args, argv):
    from megafusion.preprocess import PreprocessOptions

    encoder_config = {"crop": args.crop, "dtype": args.encoder_dtype, "device": args.device,
                      "batch_size": args.encode_batch_size}
    if args.resolution is not None:
        encoder_config["resolution"] = args.resolution
    elif args.encoder == "pixel":
        encoder_config["resolution"] = 256
    if args.encoder_path:
        encoder_config["path"] = args.encoder_path
    for item in args.encoder_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--encoder-arg {item!r}: expected KEY=VALUE")
        encoder_config[key] = _value(value)
    return PreprocessOptions(
        inputs=args.input, output=args.output, tokenizer=args.tokenizer, encoder=args.encoder,
        encoder_config=encoder_config, latent_dtype=args.latent_dtype, patch_size=args.patch_size,
        seq_length=args.seq_length, min_image_size=args.min_image_size,
        max_reject_fraction=args.max_reject_fraction, columns=columns_from_args(args), kind=args.kind,
        workers=args.workers, records_per_shard=args.records_per_shard, chunk_records=args.chunk_records,
        threads_per_worker=args.threads_per_worker, start_method=args.start_method, keep_shards=args.keep_shards,
        overwrite=args.overwrite, progress=not args.no_progress,
        command=" ".join(shlex.quote(a) for a in ["tools/preprocess_data.py", *argv]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from megafusion.preprocess import PreprocessError, run_preprocess

    try:
        run_preprocess(options_from_args(args, argv))
    except (PreprocessError, ValueError, FileNotFoundError) as exc:
        print(f"preprocess_data: error: {exc}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
