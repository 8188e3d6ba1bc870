"""Benchmark: text decoding tokens/s with the KV cache vs recomputing the whole sequence for every token.

The model (d=512, 8 layers, 8 heads, fp32, random weights, vocabulary 32000) holds a context of 512 positions;
every candidate then produces the next `--tokens` tokens greedily:
  cached          one position per token against the cached keys and values (CachedRunner, what
                  `megafusion generate` runs);
  recompute       the whole sequence (context + tokens so far) through the model's plain forward for every token
                  (RecomputeRunner, the engine's reference path: logits at every position, as a cache-less decoder
                  built on the training forward computes them);
  recompute_last  the same without the wasted logits: only the last position's (a stricter baseline).
Candidates alternate over repetitions; medians after warmup.

    python benchmarks/decode.py [--context 512 --tokens 16 --reps 3 --threads 2]

Last line: one JSON object with "name", "ratio" = cached tokens/s over recompute tokens/s (target >= 20),
"ratio_vs_recompute_last", and whether all produced the same tokens.
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

from distributed import megatron_single_process  # noqa: E402

from megafusion.config.schema import Config, DataConfig, ModelConfig, TrainingConfig  # noqa: E402
from megafusion.inference.runners import CachedRunner, RecomputeRunner, Segment  # noqa: E402
from megafusion.model import MultimodalModel  # noqa: E402
from megafusion.model.transformer_config import build_transformer_config  # noqa: E402


def build_model(args):
    cfg = Config(model=ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                                   vocab_size=args.vocab, transformer_impl="local", attention_backend="segmented"),
                 data=DataConfig(seq_length=4096), training=TrainingConfig(precision="fp32"))
    torch.manual_seed(0)
    return MultimodalModel(build_transformer_config(cfg)).eval()


class RecomputeLastRunner(RecomputeRunner):
    """Recomputes every sequence from scratch (an empty cache each call), computing logits at the last position only."""

    def _forward(self, histories, new):
        from megafusion.inference.kv_cache import CacheGroup, InferenceStep, KVCache
        from megafusion.inference.runners import build_batch, full_vocab_logits

        rows = [h + n for h, n in zip(histories, new)]
        batch, lengths = build_batch(rows, self.patch_dim, self.device)
        s = batch.seq_length
        step = InferenceStep([CacheGroup(KVCache(len(rows), s), 0, len(rows))],
                             torch.arange(s).expand(len(rows), s), torch.zeros(len(rows), dtype=torch.long),
                             logit_positions=torch.tensor([n - 1 for n in lengths]))
        out = self.model(batch, inference_context=step)
        return full_vocab_logits(out.logits[0]), out.velocity, batch


def decode(runner_cls, model, context, n_tokens: int, vocab: int):
    """Prefill `context` (untimed), then time n_tokens greedy steps; -> (seconds, tokens)."""
    runner = runner_cls(model, 1, len(context) + n_tokens + 1, torch.device("cpu"))
    logits = runner.prefill([[Segment(tokens=context)]])
    tokens = []
    start = time.perf_counter()
    for _ in range(n_tokens):
        token = int(torch.argmax(logits[0, 16:vocab]).item()) + 16
        tokens.append(token)
        logits = runner.decode([token], [True])
    return time.perf_counter() - start, tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    context = torch.randint(16, args.vocab, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    candidates = (("cached", CachedRunner), ("recompute", RecomputeRunner), ("recompute_last", RecomputeLastRunner))
    times = {name: [] for name, _ in candidates}
    outputs = {}
    with megatron_single_process(), torch.inference_mode():
        model = build_model(args)
        for rep in range(args.warmup + args.reps):
            for name, cls in candidates:
                seconds, tokens = decode(cls, model, context, args.tokens, args.vocab)
                outputs[name] = tokens
                if rep >= args.warmup:
                    times[name].append(seconds)
    tps = {k: args.tokens / statistics.median(v) for k, v in times.items()}
    ratio = tps["cached"] / tps["recompute"]
    strict = tps["cached"] / tps["recompute_last"]
    same = outputs["cached"] == outputs["recompute"] == outputs["recompute_last"]
    print(f"context {args.context}, {args.tokens} tokens: cached {tps['cached']:.1f} tok/s, recompute "
          f"{tps['recompute']:.2f} tok/s (ratio {ratio:.1f}, target >= 20), recompute with last-position logits "
          f"{tps['recompute_last']:.2f} tok/s (ratio {strict:.1f}); same tokens: {same}")
    print(json.dumps({"name": "decode", "ratio": round(ratio, 2), "target": 20,
                      "ratio_vs_recompute_last": round(strict, 2),
                      "cached_tokens_per_s": round(tps["cached"], 2),
                      "recompute_tokens_per_s": round(tps["recompute"], 3),
                      "recompute_last_tokens_per_s": round(tps["recompute_last"], 3), "same_tokens": same,
                      "context": args.context, "tokens": args.tokens, "layers": args.layers, "hidden": args.hidden,
                      "vocab": args.vocab, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
