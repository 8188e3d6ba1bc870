#!/usr/bin/env python
"""Preprocess parquet / JSONL corpora into a megafusion dataset folder (docs/DATA_FORMAT.md).

    python tools/preprocess_data.py --input data/*.parquet --output out/ds --tokenizer out/tok.model \\
        --encoder vae --encoder-path models/vae --resolution 256 --workers 8

Re-running the same command resumes (finished shards are kept). Exit status 1 with a message when the rejected
fraction exceeds --max-reject-fraction. See docs/preprocessing.md.

The masked-diffusion family (unified discrete vocabulary; docs/masked_diffusion_data.md) writes token ids only:

    python tools/preprocess_data.py --family masked_diffusion --input data/*.parquet --output out/ds_md \
        --tokenizer out/tok.model --image-tokenizer '{"name": "palette", "config": {"resolution": 32}}' \
        --audio-tokenizer '{"name": "mulaw", "config": {"sample_rate": 4000}}' --max-mixed-length 1024
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
    md = p.add_argument_group("masked_diffusion family (--family masked_diffusion; the encoder flags do not apply)")
    md.add_argument("--family", choices=("flow_matching", "masked_diffusion"), default="flow_matching",
                    help="flow_matching: tokens + encoder latents; masked_diffusion: unified discrete ids")
    md.add_argument("--image-tokenizer", metavar="JSON_SPEC",
                    help='image tokenizer spec (inline JSON or a .json file), e.g. {"name": "palette", "config": {}}')
    md.add_argument("--audio-tokenizer", metavar="JSON_SPEC",
                    help='audio tokenizer spec (inline JSON or a .json file), e.g. {"name": "mulaw", "config": {}}')
    md.add_argument("--max-mixed-length", type=int, default=1024,
                    help="reject image-text / audio-text documents longer than this (must fit data.seq_length)")
    md.add_argument("--audio-column", default="audio", help="column holding WAV bytes or a WAV path")
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


def discrete_options_from_args(args, argv):
    from megafusion.discrete.preprocess import DiscretePreprocessOptions

    foreign = [flag for flag, value in (("--encoder-path", args.encoder_path), ("--resolution", args.resolution),
                                        ("--encoder-arg", args.encoder_arg)) if value]
    if foreign:
        raise ValueError(f"{', '.join(foreign)}: flow_matching flags; --family masked_diffusion codes images and "
                         f"audio with --image-tokenizer / --audio-tokenizer")
    if args.workers != 1:
        print("preprocess_data: note: --family masked_diffusion runs in one process (--workers ignored)",
              file=sys.stderr)
    return DiscretePreprocessOptions(
        inputs=args.input, output=args.output, tokenizer=args.tokenizer, image_tokenizer=args.image_tokenizer,
        audio_tokenizer=args.audio_tokenizer, max_mixed_length=args.max_mixed_length,
        min_image_size=args.min_image_size, max_reject_fraction=args.max_reject_fraction,
        columns=columns_from_args(args), audio_column=args.audio_column, kind=args.kind, overwrite=args.overwrite,
        progress=not args.no_progress,
        command=" ".join(shlex.quote(a) for a in ["tools/preprocess_data.py", *argv]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from megafusion.preprocess import PreprocessError, run_preprocess

    try:
        if args.family == "masked_diffusion":
            from megafusion.discrete.preprocess import run_discrete_preprocess

            run_discrete_preprocess(discrete_options_from_args(args, argv))
            return
        if args.image_tokenizer or args.audio_tokenizer:
            raise ValueError("--image-tokenizer / --audio-tokenizer belong to --family masked_diffusion")
        run_preprocess(options_from_args(args, argv))
    except (PreprocessError, ValueError, FileNotFoundError) as exc:
        print(f"preprocess_data: error: {exc}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
