"""Benchmark (one CUDA GPU): the full `megafusion train` step of a ~1B-parameter slice of the reference setup in
bf16 vs a plain-PyTorch model of the same architecture on the same data, tokens/s and MFU for both, in one run.

The slice is configs/reference.yaml (16 x 2048, GQA 32/8, per-modality SwiGLU FFNs of 8192, 4096-token sequences)
cut to --layers layers (8: ~1.0B parameters) on one GPU: TP = PP = EP = 1, bf16, model.attention_backend=flex,
synthetic data, one micro-batch of --micro-batch sequences per step. `--print-slice-overrides` prints those
`megafusion train` overrides (scripts/gpu_check.sh trains the same slice with them).

    megafusion   Trainer.train_step: loader, noising, megatron's schedule, DDP, distributed optimizer (bf16 params,
                 fp32 main weights), NaN guard, clipping; Transformer Engine layers where installed
    reference    benchmarks/train_step.py's ReferenceModel (nn.Linear / nn.RMSNorm / SDPA with the dense hybrid
                 mask, memory-efficient kernel) under torch.autocast(bf16), fp32 weights, fused AdamW, clipping;
                 the batches come from the same loader and noising
Each side runs --warmup steps (flex attention compiles in the first), then --steps timed steps (CUDA-synchronised);
the megafusion phase runs first and alone, so torch.cuda.max_memory_allocated() after it is megafusion's peak, set
against megafusion.planning's estimate when that package is there. MFU = the step's model FLOPs
(megafusion/training/flops.py, the same numerator for both) / time / the GPU's dense bf16 peak (H100 SXM and H200:
989 TFLOP/s; other GPUs: --peak-tflops).

The last line is JSON: {"name": "gpu_train", "ratio": megafusion_tok_s / reference_tok_s, "target": 1.0, ...}.
On a machine without CUDA it exits with status 2 and a message saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # megafusion from the checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # train_step.py, beside this file

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM datasheets
NO_CUDA = ("gpu_train: needs a CUDA GPU, and torch.cuda.is_available() is False on this machine (torch {}); run it "
           "on a GPU node, e.g. `bash scripts/gpu_check.sh`, or use benchmarks/train_step.py on CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="reference", help="the config preset to slice (default: reference)")
    parser.add_argument("--layers", type=int, default=8, help="layers of the slice (default 8: ~1B parameters)")
    parser.add_argument("--seq-length", type=int, default=None, help="data.seq_length (default: the preset's)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per step (default 4, the reference's)")
    parser.add_argument("--backend", default="flex", choices=("flex", "te", "segmented", "dense"),
                        help="megafusion's model.attention_backend (default flex)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side (default 10)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the GPU in TFLOP/s (default: 989 for H100 / H200)")
    parser.add_argument("--no-reference", action="store_true", help="time megafusion only")
    parser.add_argument("--print-slice-overrides", action="store_true",
                        help="print the `megafusion train` overrides of the slice, one per line, and exit (no GPU "
                             "needed); training.train_steps = --warmup + --steps")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("layers", "micro_batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:
        parser.error(f"--warmup must be >= 1 (the first step compiles flex attention), got {args.warmup}")
    if args.seq_length is not None and args.seq_length < 1:
        parser.error(f"--seq-length must be >= 1, got {args.seq_length}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    return args


def slice_overrides(args: argparse.Namespace) -> List[str]:
    """`megafusion train --config <preset>` overrides of the one-GPU bf16 slice (training.run_dir left out)."""
    overrides = [
        f"model.num_layers={args.layers}", f"model.attention_backend={args.backend}",
        "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
        "parallel.virtual_pipeline_model_parallel_size=null", "parallel.expert_model_parallel_size=1",
        "parallel.sequence_parallel=false",
        "training.precision=bf16", f"training.micro_batch_size={args.micro_batch}",
        f"training.global_batch_size={args.micro_batch}", f"training.train_steps={args.warmup + args.steps}",
        "optimizer.warmup_steps=1", "data.paths=[]", "checkpoint.save_interval=0", "checkpoint.save_at_end=false",
        "logging.log_interval=1", "logging.tensorboard=false",
    ]
    if args.seq_length is not None:
        overrides.append(f"data.seq_length={args.seq_length}")
    return overrides


def peak_flops(args: argparse.Namespace, device_name: str) -> tuple:
    """(FLOP/s, where it came from)."""
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12, "--peak-tflops"
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12, f"{key} dense bf16"
    print(f"gpu_train: no datasheet peak known for {device_name!r}: MFU is against 989 TFLOP/s (H100); pass "
          f"--peak-tflops for this GPU", file=sys.stderr)
    return 989e12, "assumed H100 dense bf16"


def _time_steps(step, warmup: int, steps: int) -> List[float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def _planner_estimate(cfg) -> dict:
    """megafusion.planning's per-GPU peak for this config, if the package is there (import guarded)."""
    try:
        from megafusion.planning import make_plan
    except ImportError:
        return {"planner": "megafusion.planning is not installed"}
    try:
        plan = make_plan(cfg, 1, name="gpu_train slice", device="gpu")
        return {"planner_peak_bytes": float(plan.peak.total), "planner_largest_term": plan.peak.largest_term()}
    except Exception as e:  # the planner's API may move; the benchmark still reports its own numbers
        return {"planner": f"failed: {type(e).__name__}: {e}"}


def run(args: argparse.Namespace) -> dict:
    from megafusion.config import load_config
    from megafusion.data.loader import build_data_iterators
    from megafusion.parallel.initialize import destroy_parallel, initialize_parallel
    from megafusion.training.forward_step import noisy_microbatches
    from megafusion.training.loop import Trainer

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    run_dir = tempfile.mkdtemp(prefix="mf_gpu_train_")
    cfg = load_config(args.preset, slice_overrides(args) + [f"training.run_dir={run_dir}"])
    tokens = cfg.training.global_batch_size * cfg.data.seq_length
    peak, peak_source = peak_flops(args, torch.cuda.get_device_name())

    # ---- megafusion, alone on the GPU: its peak memory is its own
    trainer = Trainer(cfg, initialize_parallel(cfg.parallel, cfg.training.seed))
    params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    print(f"gpu_train: {args.preset} slice, {cfg.model.num_layers} layers, {params / 1e9:.2f}B parameters, "
          f"{tokens} tokens per step, attention {cfg.model.attention_backend}, on {torch.cuda.get_device_name()}",
          flush=True)
    torch.cuda.reset_peak_memory_stats()
    times_m = _time_steps(trainer.train_step, args.warmup, args.steps)
    max_allocated = torch.cuda.max_memory_allocated()
    flops = trainer.flops_per_step
    result = {"name": "gpu_train", "ratio": None, "target": 1.0, "device": torch.cuda.get_device_name(),
              "params": params, "layers": cfg.model.num_layers, "seq_length": cfg.data.seq_length,
              "micro_batch": cfg.training.micro_batch_size, "attention_backend": cfg.model.attention_backend,
              "transformer_impl": getattr(trainer.model_config, "transformer_impl", cfg.model.transformer_impl),
              "step_tflop": round(flops / 1e12, 2), "peak_tflops": peak / 1e12, "peak_source": peak_source,
              "megafusion_tok_s": round(tokens / min(times_m), 1), "mfu": round(flops / min(times_m) / peak, 4),
              "megafusion_step_s": [round(t, 4) for t in times_m],
              "max_memory_allocated_gib": round(max_allocated / 2**30, 2)}
    estimate = _planner_estimate(cfg)
    if "planner_peak_bytes" in estimate:
        result["planner_peak_gib"] = round(estimate["planner_peak_bytes"] / 2**30, 2)
        result["planner_largest_term"] = estimate["planner_largest_term"]
        result["measured_over_planned"] = round(max_allocated / estimate["planner_peak_bytes"], 3)
    else:
        result["planner"] = estimate["planner"]

    # ---- the plain-PyTorch reference on the same architecture and the same batches
    if not args.no_reference:
        from train_step import ReferenceModel, copy_weights, reference_loss

        model = trainer.model[0]
        while hasattr(model, "module"):  # DDP -> Float16Module (bf16) -> MultimodalModel
            model = model.module
        config = model.config
        with torch.device(device):
            ref = ReferenceModel(config)
        try:  # same weights where the parameter names match (local layers); TE's fused layers name them otherwise
            copy_weights(model, ref)
            result["reference_weights"] = "copied from megafusion"
        except KeyError:
            result["reference_weights"] = "own init (Transformer Engine parameter names differ)"
        ref_params = sum(p.numel() for p in ref.parameters())
        if ref_params != params:
            print(f"gpu_train: warning: the reference has {ref_params} parameters, megafusion {params}",
                  file=sys.stderr)
        result["reference_params"] = ref_params
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        ref_iter, _ = build_data_iterators(cfg)

        def ref_step():
            first = ref_iter.consumed_samples
            (batch,) = noisy_microbatches([(next(ref_iter), first)], cfg.objective, cfg.training.seed, device)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = reference_loss(ref, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optimizer.clip_grad)
            opt.step()

        times_r = _time_steps(ref_step, args.warmup, args.steps)
        ref_iter.close()
        result.update({
            "ratio": round(min(times_r) / min(times_m), 4),
            "reference_tok_s": round(tokens / min(times_r), 1),
            "reference_mfu": round(flops / min(times_r) / peak, 4),
            "ratio_of_medians": round(statistics.median(times_r) / statistics.median(times_m), 4),
            "reference_step_s": [round(t, 4) for t in times_r],
        })
    trainer.train_iter.close()
    destroy_parallel()
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.print_slice_overrides:
        print("\n".join(slice_overrides(args)))  # one per line: `mapfile -t` reads them without quoting
        return 0
    if not torch.cuda.is_available():
        print(NO_CUDA.format(torch.__version__), file=sys.stderr)
        return 2
    result = run(args)
    ref = (f", plain PyTorch {result['reference_tok_s']} tok/s (MFU {result['reference_mfu']:.1%}), "
           f"ratio {result['ratio']}" if result.get("ratio") is not None else "")
    print(f"megafusion {result['megafusion_tok_s']} tok/s (MFU {result['mfu']:.1%} of {result['peak_tflops']:.0f} "
          f"TFLOP/s){ref}; peak memory {result['max_memory_allocated_gib']} GiB"
          + (f" (planner: {result['planner_peak_gib']} GiB)" if "planner_peak_gib" in result else ""))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
