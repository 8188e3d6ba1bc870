"""Benchmark: one modality's MoE FFN (megatron's MoELayer as megafusion builds it: ModalityRouter, alltoall
dispatcher, SequentialMLP experts) against a dense FFN with the same active FLOPs per token, in the same run.

The dense FFN's hidden size is topk x the expert hidden size (SwiGLU both), so per token both do the same expert
GEMM work; the MoE side adds the router (h x E), permutation and unpermutation. fp32, CPU, forward + backward of
`--tokens` rows fed as ModalityMLP feeds them ([1, n, h]); candidates alternate over repetitions, medians after
warmup.

    python benchmarks/moe.py [--experts 8 128 --tokens 4096 --hidden 512 --expert-hidden 512 --topk 2 --reps 5]

Last line: one JSON object with "name", "ratio" = dense time / MoE time at the first expert count (target >= 0.7)
and the ratio at every count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from distributed import megatron_cpu_single_process  # noqa: E402

from megafusion.config.schema import Config, DataConfig, ModelConfig, MoEConfig, TrainingConfig  # noqa: E402
from megafusion.model.transformer_config import build_transformer_config  # noqa: E402


def build(args, experts: int, dense: bool):
    from megatron.core.transformer.spec_utils import build_module

    from megafusion.model.specs import get_ffn_spec

    moe = MoEConfig(num_experts=experts, modalities=["image"], router_topk=args.topk,
                    ffn_hidden_size=args.expert_hidden, router_load_balancing_type="aux_loss")
    cfg = Config(model=ModelConfig(hidden_size=args.hidden, num_attention_heads=8, num_layers=1,
                                   ffn_hidden_size=args.topk * args.expert_hidden, transformer_impl="local",
                                   moe=moe if not dense else MoEConfig()),
                 data=DataConfig(seq_length=256), training=TrainingConfig(precision="fp32"))
    config = build_transformer_config(cfg)
    torch.manual_seed(0)
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megafusion.model.modality_mlp import _mlp_kwargs

    spec = get_ffn_spec(config, False, "image")
    module = build_module(spec, config=config, **_mlp_kwargs(spec, ProcessGroupCollection.use_mpu_process_groups()))
    if hasattr(module, "set_layer_number"):
        module.set_layer_number(1)
    return module.train()


def step(module, x, padding):
    out, bias = module(x, padding_mask=padding)
    if bias is not None:
        out = out + bias
    out.float().pow(2).mean().backward()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 128])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.tokens, args.hidden, generator=g, requires_grad=True)
    padding = torch.zeros(args.tokens, 1, dtype=torch.bool)  # [b, s] = [n, 1], as ModalityMLP passes it
    ratios = {}
    with megatron_cpu_single_process():
        dense = build(args, 0, dense=True)
        for experts in args.experts:
            moe = build(args, experts, dense=False)
            times = {"dense": [], "moe": []}
            for rep in range(args.warmup + args.reps):
                order = (("dense", dense), ("moe", moe)) if rep % 2 == 0 else (("moe", moe), ("dense", dense))
                for name, module in order:
                    t0 = time.perf_counter()
                    step(module, x, padding)
                    if rep >= args.warmup:
                        times[name].append(time.perf_counter() - t0)
                    module.zero_grad(set_to_none=True)
                    x.grad = None
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            ratios[experts] = med["dense"] / med["moe"]
            print(f"experts {experts:4d} (top-{args.topk}, hidden {args.expert_hidden}): moe {med['moe']:8.2f} ms, "
                  f"dense (hidden {args.topk * args.expert_hidden}) {med['dense']:8.2f} ms, "
                  f"dense / moe = {ratios[experts]:.3f}")
            del moe
    first = args.experts[0]
    print(json.dumps({"name": "moe", "ratio": round(ratios[first], 4), "target": 0.7, "experts": first,
                      "ratios": {str(k): round(v, 4) for k, v in ratios.items()}, "tokens": args.tokens,
                      "hidden": args.hidden, "expert_hidden": args.expert_hidden, "topk": args.topk,
                      "threads": torch.get_num_threads(), "reps": args.reps}))


if __name__ == "__main__":
    main()
