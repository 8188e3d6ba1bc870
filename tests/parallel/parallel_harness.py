"""Shared pieces of the parallel-layout tests: a tiny megatron GPTModel (local spec, megatron DotProductAttention),
weights copied from one reference model into any TP/PP/VPP/EP layout, and a training step through megatron's
get_forward_backward_func + megafusion's optimizer, returning per-step losses, gradients and final weights keyed by
layout-independent ("global") parameter names.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from megafusion.config.schema import (
    Config,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
)
from megafusion.parallel.initialize import initialize_parallel
from megafusion.parallel.wrapping import wrap_model
from megafusion.training.optimizer import build_lr_scheduler, build_optimizer

VOCAB = 64
SEQ = 16
MBS = 2
NUM_MICROBATCHES = 4  # per step, for the full global batch
GLOBAL_BATCH = MBS * NUM_MICROBATCHES
STEPS = 3
SEED = 1234


def make_cfg(tp=1, pp=1, vpp=None, ep=1, distributed_optimizer=False, num_experts=None) -> Config:
    """The parallel / optimizer / training sections (the GPT model is configured by transformer_config);
    num_experts: the model's MoE expert count, which Config validates against expert_model_parallel_size."""
    return Config(
        model=ModelConfig(moe=MoEConfig(num_experts=num_experts)),
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
            expert_model_parallel_size=ep, use_distributed_optimizer=distributed_optimizer,
        ),
        # adam_eps bounds Adam's sensitivity to its gradient (|d update / d g| <= lr / eps): with the usual 1e-8 a
        # gradient element near 1e-8 turns a 1e-7 rounding difference between layouts into a 1e-5 weight difference.
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, weight_decay=0.1, clip_grad=1.0,
                                  adam_eps=1e-4),
        training=TrainingConfig(micro_batch_size=MBS, global_batch_size=GLOBAL_BATCH, precision="fp32"),
    )


def transformer_config(cfg: Config, num_layers=4, moe: Optional[dict] = None) -> TransformerConfig:
    p = cfg.parallel
    kwargs = dict(moe or {})
    return TransformerConfig(
        num_layers=num_layers, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        # no biases: a key bias has an exactly-zero gradient in theory, and Adam would turn its rounding noise into
        # lr-sized updates that differ per layout
        activation_func=F.gelu, gated_linear_unit=False, normalization="RMSNorm", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        pipeline_dtype=torch.float32, params_dtype=torch.float32, use_cpu_initialization=True,
        **kwargs,
    )


def build_gpt(config: TransformerConfig, pre_process=True, post_process=True, vp_stage=None) -> GPTModel:
    moe = config.num_moe_experts is not None
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False) if moe \
        else get_gpt_layer_local_spec()
    return GPTModel(
        config, spec, vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=False, position_embedding_type="rope", vp_stage=vp_stage,
    )


def unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def global_named_params(chunk) -> Dict[str, torch.nn.Parameter]:
    """Parameter names that do not depend on the layout: decoder layer indices become global layer numbers and
    local expert indices become global expert indices."""
    model = unwrap(chunk)
    layers = model.decoder.layers
    out = {}
    for name, param in model.named_parameters():
        match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if match:
            name = f"decoder.layers.{layers[int(match[1])].layer_number - 1}.{match[2]}"
        expert = re.search(r"local_experts\.(\d+)\.", name)
        if expert:
            per_rank = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
            global_index = ps.get_expert_model_parallel_rank() * per_rank + int(expert[1])
            name = name.replace(expert[0], f"local_experts.{global_index}.")
        out[name] = param
    return out


def partition_dim(param: torch.Tensor) -> Optional[int]:
    """The dim along which tensor parallelism splits `param` in this layout (None: replicated)."""
    if ps.get_tensor_model_parallel_world_size() > 1 and getattr(param, "tensor_model_parallel", False):
        return param.partition_dim
    return None


def local_slice(full: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """The part of a full (TP=1) tensor that this tensor-parallel rank holds."""
    if dim is None:
        return full
    return full.chunk(ps.get_tensor_model_parallel_world_size(), dim=dim)[ps.get_tensor_model_parallel_rank()]


def load_reference(chunk, reference: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in global_named_params(chunk).items():
            full = reference[name]
            piece = local_slice(full, partition_dim(param))
            assert piece.shape == param.shape, f"{name}: {tuple(piece.shape)} vs {tuple(param.shape)}"
            param.copy_(piece)


def make_batches(step: int) -> List[Dict[str, torch.Tensor]]:
    """The global batch of one step as NUM_MICROBATCHES micro-batches (identical on every rank)."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    batches = []
    for m in range(NUM_MICROBATCHES):
        rows = tokens[m * MBS:(m + 1) * MBS]
        mask = torch.ones(MBS, SEQ)
        mask[:, -3:] = 0.0  # a few masked positions, so the loss normalisation matters
        batches.append({"tokens": rows[:, :-1], "labels": rows[:, 1:], "loss_mask": mask})
    return batches


def _loss_func(loss_mask, output_tensor):
    # output_tensor: per-token CE [b, s] from GPTModel with labels
    loss = (output_tensor.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)
    output = model(batch["tokens"], positions, None, labels=batch["labels"])
    return output, lambda out: _loss_func(batch["loss_mask"], out)


def train(cfg: Config, tconfig_kwargs: dict, reference: Dict[str, torch.Tensor], microbatch_ids: List[int],
          steps: int = STEPS):
    """Run `steps` optimizer steps in the current layout on the given micro-batches of each global batch.
    Returns (losses per step averaged over data-parallel ranks | None off the last stage, grads per step, weights
    after each step, tensor-parallel split dim per param), keyed by global name, holding this rank's local pieces."""
    def provider(pre_process, post_process, vp_stage):
        model = build_gpt(transformer_config(cfg, **tconfig_kwargs), pre_process, post_process, vp_stage)
        load_reference(model, reference)
        return model

    chunks = wrap_model(provider, cfg)
    optimizer = build_optimizer(cfg, chunks)
    scheduler = build_lr_scheduler(cfg, optimizer, total_steps=10)
    fb = get_forward_backward_func()
    losses, grads, weights = [], [], []
    for step in range(steps):
        batches = [make_batches(step)[i] for i in microbatch_ids]
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        iterators = [iter(batches) for _ in chunks]
        out = fb(forward_step_func=_forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
                 model=chunks, num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=MBS,
                 forward_only=False)
        if ps.is_pipeline_last_stage():
            loss = torch.stack([o["loss"] for o in out]).mean()
            dist.all_reduce(loss, group=ps.get_data_parallel_group())
            losses.append(loss.item() / ps.get_data_parallel_world_size())
        grads.append({name: p.main_grad.detach().clone() for c in chunks for name, p in global_named_params(c).items()})
        ok, _, _ = optimizer.step()
        assert ok, "optimizer step was skipped"
        scheduler.step(1)
        weights.append({name: p.detach().clone() for c in chunks for name, p in global_named_params(c).items()})
    dims = {name: partition_dim(p) for c in chunks for name, p in global_named_params(c).items()}
    return (losses if ps.is_pipeline_last_stage() else None), grads, weights, dims


def reference_run(tconfig_kwargs: dict, distributed_optimizer=False):
    """TP=PP=EP=1 on every rank with the whole global batch on every rank (identical data-parallel replicas, so
    the result is the single-process result). Returns (initial weights, losses, grads, final weights)."""
    cfg = make_cfg(distributed_optimizer=distributed_optimizer)
    initialize_parallel(cfg.parallel, SEED)
    model = build_gpt(transformer_config(cfg, **tconfig_kwargs))
    initial = {name: p.detach().clone() for name, p in global_named_params(model).items()}
    losses, grads, weights, _ = train(cfg, tconfig_kwargs, initial, list(range(NUM_MICROBATCHES)))
    return initial, losses, grads, weights


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def compare(run, ref, label: str, grad_steps: Optional[int] = None, rtol=1e-5) -> Dict[str, float]:
    """Compare a layout's (losses, grads, weights) with the reference's over the steps the layout ran (the
    reference may have run more): losses of every step, grads of the first `grad_steps` steps (None: all; 0: none,
    for the distributed optimizer, whose grad buffers are valid only in each rank's shard) and the weights after the
    last step. Every rank learns whether any rank failed (so no rank is left waiting in a collective) and raises
    with its own findings. Returns the worst relative errors seen: {"loss": .., "grad": .., "weight": ..}."""
    losses, grads, weights, dims = run
    _, ref_losses, ref_grads, ref_weights = ref
    failures, worst = [], {"loss": 0.0, "grad": 0.0, "weight": 0.0}

    def check(kind, err, what):
        worst[kind] = max(worst[kind], err)
        if not err <= rtol:
            failures.append(f"{label}: {what}: relative error {err:.3e} > {rtol}")

    if losses is not None:
        for step, (a, b) in enumerate(zip(losses, ref_losses)):
            check("loss", abs(a - b) / abs(b), f"loss at step {step} ({a} vs reference {b})")
    if grad_steps != 0:
        for step, step_grads in enumerate(grads[:grad_steps]):
            for name, g in step_grads.items():
                expected = local_slice(ref_grads[step][name], dims[name])
                check("grad", relative_error(g, expected), f"grad of {name} at step {step}")
    last = len(weights) - 1
    for name, w in weights[last].items():
        expected = local_slice(ref_weights[last][name], dims[name])
        check("weight", relative_error(w, expected), f"weight {name} after step {last}")
    flag = torch.tensor([float(bool(failures))])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        raise AssertionError("\n".join(failures[:10]) or f"{label}: another rank found a mismatch")
    return worst
