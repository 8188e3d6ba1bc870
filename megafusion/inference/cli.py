"""`megafusion generate`: arguments -> load the checkpoint -> read and encode prompts -> generate in batches ->
write outputs (megafusion/inference/outputs.py). Runs in one process (CPU or GPU) or under torchrun, where the
processes form one tensor-parallel group and rank 0 writes the outputs.

    megafusion generate --checkpoint runs/demo --prompts prompts.jsonl --out out/ [--image] [--frames 4]
    megafusion generate --hf hf/demo ...          # an exported Hugging Face folder (megafusion/hf/generation.py)
        [--steps 25] [--cfg-scale 3] [--solver euler|heun|midpoint] [--temperature 0.8 --top-k 50 --top-p 0.9]
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from megafusion.inference.settings import SOLVERS, GenerationConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = GenerationConfig()
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run folder, a checkpoint root or an iter_* folder")
    source.add_argument("--hf", help="a Hugging Face folder written by tools/convert_checkpoint.py to-hf (runs the "
                                     "transformers model; its generation_config.json gives the default settings)")
    p.add_argument("--prompts", required=True, help="JSONL prompt file (megafusion/inference/prompts.py)")
    p.add_argument("--out", required=True, help="output folder (results.json, PNGs, GIFs, grids)")
    g = p.add_argument_group("text")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens sampled per prompt")
    g.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="keep the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass (1 = all)")
    g.add_argument("--no-images", action="store_true", help="never start an image (BOI is masked out)")
    g = p.add_argument_group("images")
    g.add_argument("--image", action="store_true", help="start an image right after every prompt")
    g.add_argument("--frames", type=int, default=d.frames, help="frames per generated image (> 1: a video)")
    g.add_argument("--steps", type=int, default=None, help=f"solver steps per image / frame (default {d.steps})")
    g.add_argument("--solver", choices=SOLVERS, default=None, help=f"default {d.solver}")
    g.add_argument("--timestep-shift", type=float, default=None,
                   help=f"t' = t / (t + s (1 - t)) (default {d.timestep_shift})")
    g.add_argument("--cfg-scale", type=float, default=None,
                   help=f"classifier-free guidance, 1 = off (default {d.cfg_scale})")
    g.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help=f"apply guidance only for flow times t in [LO, HI] (default {list(d.cfg_interval)})")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the first prompt (the next get seed + 1, ...)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--tokenizer", default=None, help="SentencePiece model (default: from the training data)")
    g.add_argument("--encoder", default=None, help="frozen encoder name (default: from the training data)")
    g.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="encoder setting, e.g. path=models/vae or resolution=256 (repeatable)")
    g.add_argument("--no-cache", action="store_true", help="recompute every sequence at every step (reference)")
    g = p.add_argument_group("masked-diffusion checkpoints (objective.kind=masked_diffusion; "
                             "megafusion/inference/masked/cli.py)")
    g.add_argument("--order", choices=("confidence", "random"), default="confidence",
                   help="which masked positions a step reveals: the most confident (low-confidence remasking) or "
                        "random ones")
    g.add_argument("--block-length", type=int, default=0,
                   help="semi-autoregressive blocks of a text span, unmasked left to right (0 = one block)")
    g.add_argument("--audio-seconds", type=float, default=0.5, help="length of generated audio without \"seconds\"")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _encoder_config(pairs: List[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--encoder-arg {pair!r} is not KEY=VALUE")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        out[key] = value
    return out


def settings_from_args(args, defaults: Optional[dict] = None) -> GenerationConfig:
    """The flags given, else `defaults` (an exported folder's generation_config.json), else GenerationConfig's."""
    d = GenerationConfig()
    image = {"steps": args.steps, "solver": args.solver, "timestep_shift": args.timestep_shift,
             "cfg_scale": args.cfg_scale, "cfg_interval": args.cfg_interval}
    for name, value in image.items():
        if value is None:
            image[name] = (defaults or {}).get(name, getattr(d, name))
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, allow_images=not args.no_images, force_image=args.image,
                            frames=args.frames, steps=int(image["steps"]), solver=image["solver"],
                            timestep_shift=float(image["timestep_shift"]), cfg_scale=float(image["cfg_scale"]),
                            cfg_interval=tuple(image["cfg_interval"]))


def run(args) -> int:
    """The whole command; returns the exit status (errors in the inputs print one line and return 2)."""
    import torch.distributed as dist
    from tqdm import tqdm

    from megafusion.inference.loading import CheckpointNotFoundError, load_for_generation
    from megafusion.inference.outputs import OutputWriter
    from megafusion.inference.prompts import PromptError, encode_prompts, read_prompt_file
    from megafusion.parallel.initialize import destroy_parallel

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    if args.batch_size < 1:
        print(f"megafusion generate: --batch-size {args.batch_size} must be >= 1", file=sys.stderr)
        return 2
    if args.checkpoint:
        masked = _masked_family(args)
        if masked is not None:
            return masked
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
        defaults = None
        if args.hf:
            from megafusion.hf.generation import recommended_settings

            defaults = recommended_settings(args.hf)
        settings = settings_from_args(args, defaults)
        specs = read_prompt_file(args.prompts, args.seed)
        encoder_config = _encoder_config(args.encoder_arg)
    except (ValueError, PromptError) as exc:
        print(f"megafusion generate: {exc}", file=sys.stderr)
        return 2
    try:
        if args.hf:
            from megafusion.hf.generation import load_hf_for_generation

            load = load_hf_for_generation
        else:
            load = load_for_generation
        gen = load(args.hf or args.checkpoint, precision=args.precision, device=args.device,
                   tokenizer=args.tokenizer, encoder=args.encoder, encoder_config=encoder_config,
                   use_cache=not args.no_cache)
    except (CheckpointNotFoundError, FileNotFoundError, ImportError, ValueError) as exc:
        print(f"megafusion generate: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            prompts = encode_prompts(specs, gen.tokenizer, gen.encoder, gen.cfg.model.patch_size, args.prompts)
            gen.engine.validate(prompts, settings)
        except ValueError as exc:
            print(f"megafusion generate: {exc}", file=sys.stderr)
            return 2
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        m = gen.cfg.model
        writer = OutputWriter(args.out, gen.encoder, gen.tokenizer,
                              (m.latent_channels, m.latent_size, m.latent_size)) if rank0 else None
        quiet = args.no_progress or not rank0
        bar = tqdm(total=len(prompts), desc="prompts", unit="prompt", disable=quiet)
        steps = tqdm(desc="model calls", unit="call", disable=quiet, leave=False)
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start:start + args.batch_size]
            results = gen.engine.generate(batch, settings, on_model_call=lambda kind: steps.update(1))
            if writer is not None:
                for record in writer.add_batch(specs[start:start + len(batch)], results):
                    tqdm.write(f"[{record['id']}] {record['text']}")
            bar.update(len(batch))
        steps.close()
        bar.close()
        if writer is not None:
            path = writer.finish({"hf" if args.hf else "checkpoint": str(gen.checkpoint), "step": gen.step,
                                  "settings": settings.to_dict(), "precision": gen.precision,
                                  "device": str(gen.device)})
            print(f"wrote {path}")
        return 0
    finally:
        destroy_parallel()


def _masked_family(args) -> Optional[int]:
    """Run a masked-diffusion checkpoint through its own sampler; None for the flow-matching family."""
    import os

    from megafusion.inference.loading import CheckpointNotFoundError, find_checkpoint, generation_config
    from megafusion.parallel.initialize import destroy_parallel

    try:
        folder = find_checkpoint(args.checkpoint)
        cfg = generation_config(folder / "config.yaml", int(os.environ.get("WORLD_SIZE", "1")), args.precision)
    except (CheckpointNotFoundError, FileNotFoundError, ValueError):
        return None  # the flow-matching path reports it with its full context
    if cfg.objective.kind != "masked_diffusion":
        return None
    from megafusion.inference.masked.cli import run_masked

    try:
        return run_masked(args, folder, cfg)
    finally:
        destroy_parallel()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megafusion generate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
