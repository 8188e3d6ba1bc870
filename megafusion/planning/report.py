"""A training plan: parameters, per-GPU memory, FLOPs, steps and wall-clock of a config on N GPUs, as a table or
JSON.

    plan = make_plan(cfg, gpus=128)                       # ValueError naming the flag when the layout is wrong
    print(plan.table());  json.dumps(plan.to_dict())

FLOPs per step are megafusion/training/flops.py's (what the trainer logs MFU with), on the analytic token mix
TokenMix.estimate(cfg, latent_fraction) the training loop uses. Steps: training.train_steps, or what
training.flops_budget buys (steps_from_flops_budget). Wall-clock = steps x FLOPs per step / (GPUs x peak x MFU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

from megafusion.config.schema import Config
from megafusion.planning.counts import ParameterCounts, count_parameters
from megafusion.planning.layout import Layout, Profile
from megafusion.planning.memory import GiB, StageMemory, estimate_memory

DEFAULT_GPU_MEMORY = 80 * GiB
DEFAULT_MFU = 0.4
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM, bf16 dense


def model_flops_per_step(cfg: Config, latent_fraction: float) -> float:
    """flops.py's FLOPs per step; the config is built with the local / dense implementation (the FLOPs do not
    depend on it), so planning needs neither a GPU nor Transformer Engine."""
    from megafusion.model.transformer_config import build_transformer_config
    from megafusion.training.flops import TokenMix, flops_per_step

    moe = dataclasses.replace(cfg.model.moe, grouped_gemm=False)
    model = dataclasses.replace(cfg.model, attention_backend="dense", transformer_impl="local", moe=moe)
    return flops_per_step(build_transformer_config(dataclasses.replace(cfg, model=model)),
                          TokenMix.masked_diffusion(cfg) if cfg.objective.kind == "masked_diffusion"
                          else TokenMix.estimate(cfg, latent_fraction=latent_fraction))


@dataclass
class Plan:
    name: str
    layout: Layout
    profile: Profile
    counts: ParameterCounts
    stages: List[StageMemory]
    gpu_memory: float
    flops_per_step: float
    steps: int
    tokens_per_step: int
    mfu: float
    peak_flops: float
    latent_fraction: float
    recompute: str
    budget: Optional[float]

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.gpu_memory

    @property
    def seconds(self) -> float:
        return self.steps * self.flops_per_step / (self.layout.gpus * self.peak_flops * self.mfu)

    def to_dict(self) -> dict:
        lay, peak = self.layout, self.peak
        per_gpu = self.counts.per_rank(peak.stage, lay.pp)
        return {
            "config": self.name,
            "layout": {"gpus": lay.gpus, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep, "vpp": lay.vpp,
                       "expert_dp": lay.expert_dp, "micro_batch": lay.micro_batch,
                       "microbatches_per_step": lay.num_microbatches, "sequence_parallel": lay.sequence_parallel,
                       "distributed_optimizer": lay.distributed_optimizer},
            "precision": "bf16" if self.profile.bf16 else "fp32", "device": self.profile.device,
            "attention_backend": self.profile.backend, "recompute": self.recompute,
            "parameters": {"total": self.counts.total, "by_group": self.counts.by_group(),
                           "active_per_token": {m: self.counts.active(m) for m in self.counts.modalities},
                           "per_gpu": {"dense": per_gpu[0], "expert": per_gpu[1], "stage": peak.stage},
                           "padded_vocab": self.counts.padded_vocab},
            "memory": {"gpu_bytes": self.gpu_memory, "peak_bytes": peak.total, "peak_stage": peak.stage,
                       "fits": self.fits, "largest_term": peak.largest_term(),
                       "stages": [{"stage": s.stage, "total_bytes": s.total, "terms": s.terms(),
                                   "transients": s.transients} for s in self.stages]},
            "compute": {"flops_per_step": self.flops_per_step, "tokens_per_step": self.tokens_per_step,
                        "latent_fraction": self.latent_fraction, "steps": self.steps, "flops_budget": self.budget,
                        "mfu": self.mfu, "peak_flops_per_gpu": self.peak_flops, "wall_clock_seconds": self.seconds},
        }

    def table(self) -> str:
        lay, p, peak = self.layout, self.profile, self.peak
        lines = [
            f"megafusion plan: {self.name} on {lay.gpus} GPUs ({self.gpu_memory / GiB:.0f} GiB, "
            f"{self.peak_flops / 1e12:.0f} TFLOP/s peak, MFU {self.mfu:.2f})",
            f"layout      TP {lay.tp} x PP {lay.pp}{f' (virtual {lay.vpp})' if lay.vpp else ''} x DP {lay.dp}, "
            f"EP {lay.ep}; micro-batch {lay.micro_batch} x {lay.num_microbatches} per step; sequence parallel "
            f"{'on' if lay.sequence_parallel else 'off'}; {'distributed' if lay.distributed_optimizer else 'plain'} "
            f"optimizer",
            f"run         {'bf16' if p.bf16 else 'fp32'} on {p.device}, attention {p.backend}, recompute "
            f"{self.recompute}, latent fraction {self.latent_fraction:.2f}",
            "",
            f"{'parameters':<44}{'count':>14}",
        ]
        for group, n in self.counts.by_group().items():
            lines.append(f"  {group:<42}{_count(n):>14}")
        dense, expert, _ = self.counts.per_rank(peak.stage, lay.pp)
        lines.append(f"  {'total':<42}{_count(self.counts.total):>14}")
        lines += [f"  {f'active per {m} token':<42}{_count(self.counts.active(m)):>14}" for m in self.counts.modalities]
        lines += [f"  {f'on one GPU of stage {peak.stage}':<42}{_count(dense + expert):>14}", ""]
        for stage in self.stages:
            lines.append(f"{f'memory per GPU, stage {stage.stage}':<44}{'GiB':>14}")
            for name, value in stage.terms().items():
                if value >= 0.005 * GiB:
                    lines.append(f"  {name:<42}{value / GiB:>14.2f}")
            lines.append(f"  {'total':<42}{stage.total / GiB:>14.2f}")
        verdict = (f"fits: {peak.total / GiB:.1f} of {self.gpu_memory / GiB:.0f} GiB (stage {peak.stage})"
                   if self.fits else
                   f"does NOT fit: {peak.total / GiB:.1f} GiB > {self.gpu_memory / GiB:.0f} GiB on stage {peak.stage}; "
                   f"largest term: {peak.largest_term()} ({peak.terms()[peak.largest_term()] / GiB:.1f} GiB)")
        lines += [verdict, "", "compute",
                  f"  {'FLOPs per step':<42}{self.flops_per_step:>14.3e}",
                  f"  {'tokens per step':<42}{_count(self.tokens_per_step):>14}"]
        source = f"training.flops_budget={self.budget:.2e}" if self.budget else "training.train_steps"
        lines += [f"  {'steps (' + source + ')':<42}{self.steps:>14,}",
                  f"  {'tokens':<42}{_count(self.steps * self.tokens_per_step):>14}",
                  f"  {'FLOPs':<42}{self.steps * self.flops_per_step:>14.3e}",
                  f"  {'wall-clock':<42}{_duration(self.seconds):>14}"]
        return "\n".join(lines)


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2g} s"


def make_plan(cfg: Config, gpus: int, *, name: str = "", gpu_memory: float = DEFAULT_GPU_MEMORY,
              mfu: float = DEFAULT_MFU, peak_tflops: float = DEFAULT_PEAK_TFLOPS, device: str = "gpu",
              latent_fraction: float = 0.5) -> Plan:
    """The plan of `cfg` on `gpus` GPUs (its parallel section's TP / PP / EP). Errors name the flag to fix."""
    from megafusion.training.flops import steps_from_flops_budget

    if not 0.0 < mfu <= 1.0:
        raise ValueError(f"--mfu={mfu} must be in (0, 1]")
    if peak_tflops <= 0:
        raise ValueError(f"--peak-tflops={peak_tflops} must be positive")
    if gpu_memory <= 0:
        raise ValueError("--gpu-memory must be positive")
    if not 0.0 <= latent_fraction <= 1.0:
        raise ValueError(f"--latent-fraction={latent_fraction} must be in [0, 1]")
    if cfg.objective.kind == "masked_diffusion":
        latent_fraction = 0.0  # every position is a discrete token
    layout = Layout.resolve(cfg, gpus)
    profile = Profile.resolve(cfg, device)
    counts = count_parameters(cfg)
    stages = estimate_memory(cfg, counts, layout, profile, latent_fraction)
    flops = model_flops_per_step(cfg, latent_fraction)
    t = cfg.training
    steps = t.train_steps if t.train_steps is not None else steps_from_flops_budget(t.flops_budget, flops)
    return Plan(name=name, layout=layout, profile=profile, counts=counts, stages=stages, gpu_memory=gpu_memory,
                flops_per_step=flops, steps=steps, tokens_per_step=t.global_batch_size * cfg.data.seq_length,
                mfu=mfu, peak_flops=peak_tflops * 1e12, latent_fraction=latent_fraction, recompute=t.recompute,
                budget=t.flops_budget if t.train_steps is None else None)
