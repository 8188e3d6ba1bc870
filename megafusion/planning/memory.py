"""Per-GPU memory at the peak of a training step, term by term, for each pipeline stage that can be the largest.

    stages = estimate_memory(cfg, counts, layout, profile, latent_fraction=0.5)   # [StageMemory] first (, last)

Static (the whole run), for a rank holding P = P_dense + P_expert parameters (counts.per_rank), with megatron's
DistributedDataParallel (grad_reduce_in_fp32 when bf16: megafusion/parallel/wrapping.py build_ddp_config) and
distributed optimizer (state sharded over DP for dense, over DP / EP for expert parameters):

    weights            2 P (bf16; 4 P in fp32)
    main params        4 P_dense / DP + 4 P_expert / (DP/EP)    fp32 master copy, bf16 only (unsharded: 4 P)
    gradients          4 P (+ DDP padding)                       the fp32 main_grad buffers DDP reduces in
    optimizer          8 P_dense / DP + 8 P_expert / (DP/EP)    Adam m and v in fp32 (unsharded: 8 P)
    ddp padding        64-element alignment per tensor + each bucket padded to lcm(DP, 128) (megatron-core 0.16)

Activations (activations.py): one micro-batch over the stage's layers, times the micro-batches in flight (1F1B:
min(PP - stage, M); stage 0 of an interleaved schedule: Megatron-LM's penalty); with recompute none / selective /
full (one layer's input kept, layer_terms otherwise); plus the embedding on the first and the heads on the last
stage, the layout's indices and the backend's mask per micro-batch in flight, and the Batch tensors of every
micro-batch of the step (the loop builds them all before the schedule runs).

Transients, of which the largest is added: the logits and their fp32 copy for the cross-entropy (last stage), the
embedding's dense weight gradient before DDP's hook folds it into main_grad (first stage), the layer that full
recompute re-runs (its activations and its backward's working set), and the backward's working set (one layer's
activation gradients, taken as one layer's activations). Then the allowance: CUDA context, cuBLAS / NCCL workspaces (CUDA_CONTEXT_BYTES) and the caching
allocator's fragmentation (ALLOCATOR_FRACTION of the rest); none on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List

from megafusion.config.schema import Config
from megafusion.planning.activations import (batch_bytes, embedding_terms, head_terms, layer_terms, logits_bytes,
                                             microbatch_terms)
from megafusion.planning.counts import ParameterCounts
from megafusion.planning.layout import Layout, Profile

GiB = float(1 << 30)
CUDA_CONTEXT_BYTES = 2.5 * GiB
"""CUDA context (~0.5 GiB on H100), cuBLAS / cuDNN workspaces, NCCL communicator buffers for the TP/PP/DP/EP
groups (a few hundred MiB each). A stated allowance; measure yours with torch.cuda.mem_get_info."""
ALLOCATOR_FRACTION = 0.05
"""Share of the tensors' bytes lost to the caching allocator's fragmentation (block rounding, split blocks)."""
DDP_BUCKET_ELEMENTS = 40_000_000
"""megatron DDP's default bucket (max(4e7, 1e6 x DP) elements) when parallel.overlap_grad_reduce is on."""


@dataclass
class StageMemory:
    stage: int
    static: Dict[str, float] = field(default_factory=dict)
    activations: Dict[str, float] = field(default_factory=dict)
    transients: Dict[str, float] = field(default_factory=dict)
    allowance: Dict[str, float] = field(default_factory=dict)

    @property
    def transient(self) -> float:
        return max(self.transients.values(), default=0.0)

    @property
    def largest_transient(self) -> str:
        return max(self.transients, key=self.transients.get) if self.transients else ""

    @property
    def total(self) -> float:
        return (sum(self.static.values()) + sum(self.activations.values()) + self.transient
                + sum(self.allowance.values()))

    def terms(self) -> Dict[str, float]:
        """Every counted term by name (the transient only as its largest member)."""
        out = {**self.static, **self.activations}
        if self.transients:
            out[f"transient: {self.largest_transient}"] = self.transient
        out.update(self.allowance)
        return out

    def largest_term(self) -> str:
        terms = self.terms()
        return max(terms, key=terms.get)


def _static(cfg: Config, counts: ParameterCounts, layout: Layout, profile: Profile, stage: int) -> Dict[str, float]:
    dense, expert, tensors = counts.per_rank(stage, layout.pp)
    params = dense + expert
    sharded = dense / layout.dp + expert / layout.expert_dp if layout.distributed_optimizer else float(params)
    dp = layout.dp
    # one buffer for dense and one for expert parameters, each cut into buckets when gradients overlap
    buckets = (math.ceil(params / max(DDP_BUCKET_ELEMENTS, 1_000_000 * dp)) if cfg.parallel.overlap_grad_reduce
               else 1) + (1 if expert else 0)
    padding = 32 * tensors + buckets * math.lcm(dp, 128) / 2 if layout.distributed_optimizer else 0.0
    out = {"weights": float(params * (2 if profile.bf16 else 4))}
    if profile.bf16:
        out["main params (fp32)"] = 4.0 * sharded
    out["gradients (fp32)"] = 4.0 * params
    out["optimizer (Adam m, v)"] = 8.0 * sharded
    if padding:  # in the fp32 gradient buffer and the parameter buffer alike
        out["ddp padding"] = (4.0 + (2 if profile.bf16 else 4)) * padding
    return out


def _layer(cfg: Config, profile: Profile, layout: Layout, latent_fraction: float) -> Dict[str, float]:
    terms = layer_terms(cfg, profile, layout.tp, layout.sequence_parallel, latent_fraction, layout.micro_batch)
    if cfg.training.recompute == "selective":
        terms.pop("core", None)
        terms.pop("scores", None)
    return terms


def estimate_memory(cfg: Config, counts: ParameterCounts, layout: Layout, profile: Profile,
                    latent_fraction: float = 0.5) -> List[StageMemory]:
    """Memory of stage 0 and, with a pipeline, of the last stage (the two that hold embedding / heads)."""
    stages = [0] if layout.pp == 1 else [0, layout.pp - 1]
    layers = cfg.model.num_layers // layout.pp
    b, B = layout.micro_batch, profile.act_bytes
    full = _layer(cfg, profile, layout, latent_fraction)
    full_no_recompute = layer_terms(cfg, profile, layout.tp, layout.sequence_parallel, latent_fraction, b)
    one_layer = sum(full_no_recompute.values())
    r = 1.0 / layout.tp if layout.sequence_parallel else 1.0
    out = []
    for stage in stages:
        mem = StageMemory(stage, static=_static(cfg, counts, layout, profile, stage))
        flight = layout.in_flight(stage)
        if cfg.training.recompute == "full":
            per_layer = {"layer inputs (full recompute)": cfg.data.seq_length * b * cfg.model.hidden_size * r * B}
            mem.transients["recomputed layer"] = 2 * one_layer  # its activations again + its backward working set
        else:
            per_layer = full
        for name, value in per_layer.items():
            mem.activations[f"activations: {name}"] = value * layers * flight
        for name, value in microbatch_terms(cfg, profile, b).items():
            mem.activations[f"activations: {name}"] = value * flight
        mem.activations["batches of the step"] = batch_bytes(cfg, b, latent_fraction) * layout.num_microbatches
        if stage == 0:
            mem.activations["activations: embedding"] = embedding_terms(cfg, profile, b, latent_fraction)[
                "embedding"] * flight
            mem.transients["embedding gradient"] = (counts.padded_vocab // layout.tp) * cfg.model.hidden_size * (
                2 if profile.bf16 else 4)
        if stage == layout.pp - 1:
            mem.activations["activations: heads"] = head_terms(cfg, profile, layout.tp, layout.sequence_parallel, b,
                                                               latent_fraction)["heads"]
            mem.transients["logits (cross-entropy)"] = logits_bytes(cfg, profile, layout.tp, counts.padded_vocab, b)
        mem.transients["backward working set"] = one_layer
        if profile.device == "gpu":
            tensors = sum(mem.static.values()) + sum(mem.activations.values()) + mem.transient
            mem.allowance["allocator fragmentation"] = ALLOCATOR_FRACTION * tensors
            mem.allowance["cuda context + workspaces"] = CUDA_CONTEXT_BYTES
        out.append(mem)
    return out
