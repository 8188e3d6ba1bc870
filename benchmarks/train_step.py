"""Benchmark: one full training step (forward + backward + AdamW) of MultimodalModel vs a plain-PyTorch model of
the same architecture on the same batch, alternated in one run; MFU against a GEMM peak measured in the same run.

The reference (ReferenceModel below) is written with nn.Linear / nn.RMSNorm / SDPA: token + patch + flow-time
embeddings, RoPE, grouped-query attention with the same mask rule (causal, bidirectional in a visual block, documents
isolated), a per-modality SwiGLU FFN, final norm, LM head and velocity head. Before timing, the megafusion weights
are copied into it and the two losses must agree, so both sides compute the same function. The reference also runs
on CUDA under bf16 autocast (benchmarks/gpu_train.py reuses it).

    python benchmarks/train_step.py [--steps 8] [--backend dense|segmented] [--threads 1] [--profile]

The last line is JSON: {"name": "train_step", "ratio": megafusion_tok_s / reference_tok_s, "target": 1.0, "mfu": ...},
tokens/s from each side's fastest step (other processes on a shared machine only add time); medians and the median
of adjacent-pair ratios are in the same line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

D, LAYERS, HEADS, GROUPS, SEQ, BATCH, VOCAB = 512, 8, 8, 8, 512, 2, 2048


# ----------------------------------------------------------------------------------------------- reference model
def rope_angles(s: int, head_dim: int, base: float) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    return torch.cat([freqs, freqs], -1)  # [s, head_dim]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_mask(batch) -> torch.Tensor:
    """[b, 1, s, s] bool: causal, or same visual block; keys of the query's document context only; padding sees
    itself."""
    b, s = batch.tokens.shape
    pos = torch.arange(s, device=batch.tokens.device)
    block = batch.block_ids
    same_block = (block[:, :, None] >= 0) & (block[:, :, None] == block[:, None, :])
    allowed = (pos[None, None, :] <= pos[None, :, None]) | same_block
    allowed &= pos[None, None, :] >= batch.context_start[:, :, None]
    valid = batch.document_ids >= 0
    allowed &= valid[:, None, :]
    allowed = torch.where(valid[:, :, None], allowed, torch.eye(s, dtype=torch.bool, device=pos.device)[None])
    return allowed[:, None]


class SwiGLU(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        gate, up = self.fc1(x).chunk(2, -1)
        return self.fc2(F.silu(gate) * up)


class ReferenceLayer(nn.Module):
    def __init__(self, d, heads, groups, ffn, eps):
        super().__init__()
        self.heads, self.groups, self.hd = heads, groups, d // heads
        self.ln1 = nn.RMSNorm(d, eps=eps)
        self.qkv = nn.Linear(d, (heads + 2 * groups) * self.hd, bias=False)  # grouped: [q.., k, v] per group
        self.proj = nn.Linear(heads * self.hd, d, bias=False)
        self.ln2 = nn.RMSNorm(d, eps=eps)
        self.ffn = nn.ModuleList([SwiGLU(d, ffn), SwiGLU(d, ffn)])  # text, image

    def forward(self, x, cos, sin, mask, rows):
        b, s, d = x.shape
        per_group = self.heads // self.groups
        qkv = self.qkv(self.ln1(x)).view(b, s, self.groups, (per_group + 2) * self.hd)
        q, k, v = qkv.split([per_group * self.hd, self.hd, self.hd], dim=-1)
        q = q.reshape(b, s, self.heads, self.hd).transpose(1, 2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # bf16 under autocast (GPU), a no-op in fp32
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = per_group > 1
        if gqa and q.is_cuda:  # CUDA's memory-efficient kernel takes the mask but not GQA: expand K, V instead
            k, v, gqa = k.repeat_interleave(per_group, 1), v.repeat_interleave(per_group, 1), False
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        h = self.ln2(x).reshape(b * s, d)
        out = torch.empty_like(h)
        for ffn, idx in zip(self.ffn, rows):
            out[idx] = ffn(h[idx]).to(out.dtype)
        return x + out.view(b, s, d)


class ReferenceModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, d)
        self.patch = nn.Linear(config.patch_dim, d)
        self.t1 = nn.Linear(config.timestep_embed_dim, d)
        self.t2 = nn.Linear(d, d)
        self.layers = nn.ModuleList(
            ReferenceLayer(d, config.num_attention_heads, config.num_query_groups, config.ffn_hidden_size,
                           config.layernorm_epsilon) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(d, eps=config.layernorm_epsilon)
        self.lm_head = nn.Linear(d, config.padded_vocab_size, bias=False)
        self.velocity = nn.Linear(d, config.patch_dim)

    def timestep(self, t):
        half = self.config.timestep_embed_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        ang = 1000.0 * t[:, None] * freqs[None]
        return self.t2(F.silu(self.t1(torch.cat([ang.cos(), ang.sin()], -1))))

    def forward(self, batch):
        b, s = batch.tokens.shape
        image = batch.modality.reshape(-1) == 1
        latent_idx = torch.nonzero(image).flatten()
        rows = [torch.nonzero(~image).flatten(), latent_idx]
        noised = batch.noised.reshape(-1)[latent_idx].float()[:, None]
        lat = self.patch(batch.noisy_latents) + self.timestep(batch.latent_t) * noised
        x = self.embed(batch.tokens).reshape(b * s, -1)
        x = x.index_copy(0, latent_idx, lat.to(x.dtype)).view(b, s, -1)
        angles = rope_angles(s, self.layers[0].hd, self.config.rotary_base).to(x.device)
        cos, sin = angles.cos(), angles.sin()
        mask = reference_mask(batch)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, rows)
        x = self.norm(x)
        logits = self.lm_head(x)  # [b, s, V]
        velocity = self.velocity(x.reshape(b * s, -1)[latent_idx])
        return logits, velocity


def copy_weights(model, ref: ReferenceModel) -> None:
    """megafusion parameter names -> reference modules (same layouts: grouped qkv, [gate; up] fc1)."""
    src = dict(model.named_parameters())
    with torch.no_grad():
        ref.embed.weight.copy_(src["embedding.word_embeddings.weight"])
        for mine, theirs in ((ref.patch, "embedding.patch_embed"), (ref.t1, "embedding.timestep_embed.linear_1"),
                             (ref.t2, "embedding.timestep_embed.linear_2"), (ref.velocity, "velocity_head.linear")):
            mine.weight.copy_(src[f"{theirs}.weight"])
            mine.bias.copy_(src[f"{theirs}.bias"])
        for i, layer in enumerate(ref.layers):
            p = f"decoder.layers.{i}."
            layer.ln1.weight.copy_(src[p + "input_layernorm.weight"])
            layer.qkv.weight.copy_(src[p + "self_attention.linear_qkv.weight"])
            layer.proj.weight.copy_(src[p + "self_attention.linear_proj.weight"])
            layer.ln2.weight.copy_(src[p + "pre_mlp_layernorm.weight"])
            for ffn, name in zip(layer.ffn, ("text", "image")):
                ffn.fc1.weight.copy_(src[p + f"mlp.{name}.linear_fc1.weight"])
                ffn.fc2.weight.copy_(src[p + f"mlp.{name}.linear_fc2.weight"])
        ref.norm.weight.copy_(src["decoder.final_layernorm.weight"])
        ref.lm_head.weight.copy_(src["output_layer.weight"])


# ----------------------------------------------------------------------------------------------- shared pieces
def loss_fn(logits_bsv, velocity, batch):
    ce = F.cross_entropy(logits_bsv.reshape(-1, logits_bsv.shape[-1]), batch.labels.reshape(-1), reduction="none")
    ce = (ce * batch.loss_mask.reshape(-1)).sum() / batch.loss_mask.sum().clamp_min(1)
    fm = ((velocity - batch.velocity_target) ** 2).mean(-1)
    fm = (fm * batch.fm_loss_mask).sum() / batch.fm_loss_mask.sum().clamp_min(1)
    return ce + fm


def megafusion_loss(model, batch):
    out = model(batch)
    return loss_fn(out.logits.transpose(0, 1), out.velocity, batch)


def reference_loss(ref, batch):
    logits, velocity = ref(batch)
    return loss_fn(logits, velocity, batch)


def make_batch(config, seed=0):
    from megafusion.data.synthetic import SyntheticDocuments, SyntheticSpec

    spec = SyntheticSpec(VOCAB, SEQ, config.patch_dim, (config.latent_size // config.patch_size) ** 2,
                         kind="interleaved")
    batch = SyntheticDocuments(spec, seed=seed).batch(BATCH)
    g = torch.Generator().manual_seed(seed)
    n = batch.num_latent_positions
    t = torch.rand(n, generator=g)
    noise = torch.randn(n, config.patch_dim, generator=g)
    return batch.replace(noisy_latents=t[:, None] * batch.latents + (1 - t[:, None]) * noise, latent_t=t,
                         velocity_target=batch.latents - noise, fm_loss_mask=torch.ones(n)).validate()


def gemm_peak(n=2048, reps=5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def step_flops(config, tokens: int) -> float:
    """6 * (active matmul params) per token + attention scores/values (12 * L * d * S per token, PaLM's MFU)."""
    d, f, L = config.hidden_size, config.ffn_hidden_size, config.num_layers
    hd = d // config.num_attention_heads
    qkv = d * (config.num_attention_heads + 2 * config.num_query_groups) * hd
    per_layer = qkv + d * d + 3 * d * f  # one modality's SwiGLU per token
    params = L * per_layer + d * config.padded_vocab_size
    return tokens * (6 * params + 12 * L * d * SEQ)


CPU_TIMES = {}


def timed_step(loss_call, optimizer, name: str = "") -> float:
    """Wall-clock seconds of zero_grad + forward + backward + AdamW step; this process's CPU seconds go to
    CPU_TIMES[name] (with one thread, the work done, independent of how long other jobs held the core)."""
    c0, t0 = time.process_time(), time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_call()
    loss.backward()
    optimizer.step()
    CPU_TIMES.setdefault(name, []).append(time.process_time() - c0)
    return time.perf_counter() - t0


def alternate(run_m, run_r, steps: int):
    """Two warm-up steps each, then `steps` timed steps each, alternating which goes first; the GEMM peak is
    measured before and after. Returns (megafusion times, reference times, peak FLOP/s)."""
    for _ in range(2):
        run_m(), run_r()
    CPU_TIMES.clear()
    peak_before = gemm_peak()
    times_m, times_r = [], []
    for i in range(steps):
        if i % 2 == 0:
            times_m.append(run_m()), times_r.append(run_r())
        else:
            times_r.append(run_r()), times_m.append(run_m())
    return times_m, times_r, max(peak_before, gemm_peak())


def summary(name: str, times_m, times_r, tokens: int, flops: float, peak: float) -> dict:
    """Headline numbers from each side's fastest step: on a shared machine other processes only ever add time, so
    the minimum is the least disturbed measurement; medians and adjacent-pair ratios are reported as a check."""
    t_m, t_r = min(times_m), min(times_r)
    return {
        "name": name,
        "ratio": round(t_r / t_m, 4),
        "target": 1.0,
        "mfu": round(flops / t_m / peak, 4),
        "reference_mfu": round(flops / t_r / peak, 4),
        "megafusion_tok_s": round(tokens / t_m, 1),
        "reference_tok_s": round(tokens / t_r, 1),
        "ratio_of_medians": round(statistics.median(times_r) / statistics.median(times_m), 4),
        "median_pair_ratio": round(statistics.median(r / m for m, r in zip(times_m, times_r)), 4),
        "megafusion_step_s": [round(t, 3) for t in times_m],
        "reference_step_s": [round(t, 3) for t in times_r],
        "gemm_peak_gflops": round(peak / 1e9, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    default_backend = "segmented" if importlib.util.find_spec("megafusion.model.attention.segmented") else "dense"
    parser.add_argument("--backend", default=default_backend, help="megafusion attention backend")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0 = torch default). 1 by default: on cores shared with other jobs, "
                             "OpenMP workers spin while their partner thread is descheduled, which inflates every "
                             "parallel region and swamps the comparison with noise")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step of each")
    parser.add_argument("--mode", choices=("model", "loop"), default="model",
                        help="model: fwd+bwd+AdamW of the model on one batch; loop: the full `megafusion train` step "
                             "(loader, noising, megatron schedule, DDP, distributed optimizer, NaN guard, clipping) "
                             "vs a plain-PyTorch loop doing the same work")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "loop":
        return run_loop_mode(args)

    from megatron.core import parallel_state

    from megafusion.config.schema import Config, DataConfig, ModelConfig, TrainingConfig
    from megafusion.model import MultimodalModel
    from megafusion.model.transformer_config import build_transformer_config

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    cfg = Config(
        model=ModelConfig(num_layers=LAYERS, hidden_size=D, num_attention_heads=HEADS, num_query_groups=GROUPS,
                          vocab_size=VOCAB, latent_channels=4, latent_size=16, patch_size=2,
                          attention_backend=args.backend, transformer_impl="local"),
        data=DataConfig(seq_length=SEQ), training=TrainingConfig(precision="fp32"))
    config = build_transformer_config(cfg)
    torch.manual_seed(0)
    model = MultimodalModel(config)
    ref = ReferenceModel(config)
    copy_weights(model, ref)
    batch = make_batch(config)
    with torch.no_grad():
        a, b = megafusion_loss(model, batch).item(), reference_loss(ref, batch).item()
    if abs(a - b) > 1e-4 * abs(b):
        raise SystemExit(f"train_step: megafusion loss {a} != reference loss {b}; the reference is not the same model")
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != sum(p.numel() for p in ref.parameters()):
        raise SystemExit("train_step: parameter counts differ between megafusion and the reference")

    opt_m = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt_r = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    run_m = lambda: timed_step(lambda: megafusion_loss(model, batch), opt_m, "megafusion")  # noqa: E731
    run_r = lambda: timed_step(lambda: reference_loss(ref, batch), opt_r, "reference")  # noqa: E731
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, run in (("megafusion", run_m), ("reference", run_r)):
            run()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            print(f"--- {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    times_m, times_r, peak = alternate(run_m, run_r, args.steps)
    tokens = BATCH * SEQ
    flops = step_flops(config, tokens)
    result = summary("train_step", times_m, times_r, tokens, flops, peak)
    result.update({
        "cpu_time_ratio": round(min(CPU_TIMES["reference"]) / min(CPU_TIMES["megafusion"]), 4),
        "step_gflop": round(flops / 1e9, 1),
        "params": n_params,
        "attention_backend": args.backend,
        "threads": torch.get_num_threads(),
        "shape": {"d": D, "layers": LAYERS, "heads": HEADS, "seq": SEQ, "batch": BATCH, "vocab": VOCAB,
                  "latent_positions": batch.num_latent_positions},
    })
    print(f"megafusion {result['megafusion_tok_s']} tok/s, reference {result['reference_tok_s']} tok/s, "
          f"MFU {result['mfu']:.1%} of a {result['gemm_peak_gflops']} GFLOP/s fp32 GEMM")
    print(json.dumps(result))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- loop mode
def run_loop_mode(args):
    """Trainer.train_step (everything `megafusion train` does per step, logging and checkpointing aside) vs a
    plain-PyTorch step over the same loader output: noise_batch, forward, CE + FM loss, backward, clip, AdamW."""
    import tempfile

    from megafusion.config import load_config
    from megafusion.data.loader import build_data_iterators
    from megafusion.parallel.initialize import destroy_parallel, initialize_parallel
    from megafusion.training.forward_step import noisy_microbatches
    from megafusion.training.loop import Trainer

    run_dir = tempfile.mkdtemp(prefix="mf_bench_")
    cfg = load_config("tiny", [
        f"model.num_layers={LAYERS}", f"model.hidden_size={D}", f"model.num_attention_heads={HEADS}",
        f"model.num_query_groups={GROUPS}", "model.ffn_hidden_size=null", f"model.vocab_size={VOCAB}",
        "model.latent_size=16", f"model.attention_backend={args.backend}", "model.transformer_impl=local",
        f"data.seq_length={SEQ}", "data.num_workers=1", f"training.micro_batch_size={BATCH}",
        f"training.global_batch_size={BATCH}", f"training.train_steps={args.steps + 10}", "training.precision=fp32",
        f"training.run_dir={run_dir}", "logging.tensorboard=false", "objective.loss_weighting=fixed",
        "optimizer.warmup_steps=1", "optimizer.lr=1e-4"])
    trainer = Trainer(cfg, initialize_parallel(cfg.parallel, cfg.training.seed))
    model = trainer.model[0].module
    config = model.config
    ref = ReferenceModel(config)
    copy_weights(model, ref)
    opt_r = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ref_iter, _ = build_data_iterators(cfg)

    def ref_step() -> float:
        t0 = time.perf_counter()
        first = ref_iter.consumed_samples
        (batch,) = noisy_microbatches([(next(ref_iter), first)], cfg.objective, cfg.training.seed,
                                      torch.device("cpu"))
        opt_r.zero_grad(set_to_none=True)
        loss = reference_loss(ref, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optimizer.clip_grad)
        opt_r.step()
        return time.perf_counter() - t0

    def mf_step() -> float:
        t0 = time.perf_counter()
        trainer.train_step()
        return time.perf_counter() - t0

    times_m, times_r, peak = alternate(mf_step, ref_step, args.steps)
    tokens = BATCH * SEQ
    result = summary("train_step_loop", times_m, times_r, tokens, step_flops(config, tokens), peak)
    result.update({
        "attention_backend": args.backend,
        "threads": torch.get_num_threads(),
    })
    trainer.train_iter.close()
    ref_iter.close()
    destroy_parallel()
    print(f"megafusion train step {result['megafusion_tok_s']} tok/s, plain-PyTorch loop "
          f"{result['reference_tok_s']} tok/s, MFU {result['mfu']:.1%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
