"""What a plan is made for: the launch layout (GPUs, TP / PP / EP / DP, micro-batches) and the device profile
(precision, attention backend).

    layout = Layout.resolve(cfg, gpus=128)      # ValueError naming --gpus or the parallel.* / training.* field
    profile = Profile.resolve(cfg, "gpu")       # bf16 for precision=auto, flex for attention_backend=auto

Sizes follow megatron's parallel_state: DP = gpus / (TP * PP); experts are split over EP ranks carved out of DP
(expert tensor parallelism = TP, which the config keeps at 1 with MoE), so the expert-data-parallel group that
shards the experts' optimizer state has DP / EP ranks. Micro-batches per step M = global / (micro * DP).
1F1B (megatron's non-interleaved schedule) keeps min(PP - k, M) micro-batches in flight on stage k; the
interleaved schedule (virtual_pipeline_model_parallel_size = v) multiplies stage 0's activations by Megatron-LM's
penalty 1 + (PP - 1) / (PP * v).

The profile resolves `auto` for the planned device, not for this machine (planning needs no GPU): precision auto is
bf16 on GPU and fp32 on CPU (megafusion/parallel/wrapping.py), attention_backend auto is flex on GPU and segmented
on CPU (megafusion/model/attention/backends.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megafusion.config.schema import Config


@dataclass(frozen=True)
class Layout:
    gpus: int
    tp: int
    pp: int
    ep: int
    dp: int
    vpp: Optional[int]
    micro_batch: int
    num_microbatches: int
    sequence_parallel: bool
    distributed_optimizer: bool

    @property
    def expert_dp(self) -> int:
        """Ranks that hold the same experts (their optimizer state is sharded over these)."""
        return self.dp // self.ep

    def in_flight(self, stage: int) -> float:
        """Micro-batches whose activations stage `stage` holds at its peak (a multiplier of one micro-batch's
        activations over the stage's layers)."""
        m = self.num_microbatches
        if self.pp == 1:
            return 1.0
        if self.vpp is not None and stage == 0:
            return min(self.pp, m) * (1.0 + (self.pp - 1) / (self.pp * self.vpp))
        return float(min(self.pp - stage, m))

    @classmethod
    def resolve(cls, cfg: Config, gpus: int) -> "Layout":
        p, t = cfg.parallel, cfg.training
        tp, pp, ep, vpp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                           p.expert_model_parallel_size, p.virtual_pipeline_model_parallel_size)
        if gpus < 1:
            raise ValueError(f"--gpus={gpus} must be a positive number of GPUs")
        if gpus % (tp * pp):
            raise ValueError(f"--gpus={gpus} is not divisible by parallel.tensor_model_parallel_size ({tp}) x "
                             f"parallel.pipeline_model_parallel_size ({pp}) = {tp * pp}; use a multiple of {tp * pp} "
                             f"GPUs or change the layout")
        dp = gpus // (tp * pp)
        if dp % ep:
            raise ValueError(f"parallel.expert_model_parallel_size={ep} must divide the data-parallel size {dp} "
                             f"(--gpus={gpus} / (tp {tp} x pp {pp})); change --gpus or the expert-parallel size")
        if vpp is not None:
            if pp < 2:
                raise ValueError(f"parallel.virtual_pipeline_model_parallel_size={vpp} needs "
                                 "pipeline_model_parallel_size >= 2; set it to null")
            if cfg.model.num_layers % (pp * vpp):
                raise ValueError(f"model.num_layers={cfg.model.num_layers} is not divisible by "
                                 f"pipeline_model_parallel_size x virtual_pipeline_model_parallel_size = {pp * vpp}")
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise ValueError(f"training.global_batch_size={t.global_batch_size} is not a multiple of "
                             f"training.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp} "
                             f"(--gpus={gpus}); change the batch sizes or --gpus")
        # masked diffusion with anti-masking runs two copies of every row through the model
        copies = 2 if cfg.objective.kind == "masked_diffusion" and cfg.objective.masked_diffusion.anti_masking else 1
        return cls(gpus=gpus, tp=tp, pp=pp, ep=ep, dp=dp, vpp=vpp, micro_batch=t.micro_batch_size * copies,
                   num_microbatches=t.global_batch_size // per_step, sequence_parallel=p.sequence_parallel,
                   distributed_optimizer=p.use_distributed_optimizer)


@dataclass(frozen=True)
class Profile:
    """What the plan is for: the device, activation / parameter bytes and the resolved attention backend."""

    device: str  # "gpu" | "cpu"
    bf16: bool
    backend: str  # dense | segmented | flex | te

    @property
    def act_bytes(self) -> int:
        return 2 if self.bf16 else 4

    @classmethod
    def resolve(cls, cfg: Config, device: str = "gpu") -> "Profile":
        if device not in ("gpu", "cpu"):
            raise ValueError(f"--device={device!r} is not one of gpu, cpu")
        precision = cfg.training.precision
        bf16 = precision == "bf16" or (precision == "auto" and device == "gpu")
        backend = cfg.model.attention_backend
        if backend == "auto":  # megafusion.model.attention.backends.resolve_backend, for the planned device
            backend = "flex" if device == "gpu" else "segmented"
        if device == "cpu" and backend in ("flex", "te"):
            raise ValueError(f"model.attention_backend={backend} cannot train on CPU; use segmented or dense")
        return cls(device=device, bf16=bf16, backend=backend)
