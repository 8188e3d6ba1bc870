"""AdamW through megatron's optimizer stack, weight-decay groups, and the warmup + cosine LR schedule.

`build_optimizer(cfg, model_chunks)` -> megatron's get_megatron_optimizer with Adam in decoupled-weight-decay mode
(AdamW), global-norm clipping, and the distributed optimizer (optimizer state and fp32 main params sharded over the
data-parallel group) when cfg.parallel.use_distributed_optimizer. Params without weight decay (megatron-core
0.16.1 expresses this as `config_overrides={ParamKey: {"wd_mult": 0.0}}`; there is no no_weight_decay_cond):
  * norms and biases (1-D params or names ending in .bias) unless cfg.optimizer.decay_norms_and_biases;
  * embeddings (params of torch.nn.Embedding / megatron VocabParallelEmbedding modules, and any param a model marks
    with `param.is_embedding_parameter = True`) unless cfg.optimizer.decay_embeddings. A tied LM head is the
    embedding weight and follows it; an untied output layer is a linear layer and is decayed.

Per-module settings (cfg.optimizer.groups: embedding, unembedding, attention, mlp, norm, by parameter name; and
a learning-rate factor over depth) become megatron param-group overrides too: max_lr / min_lr scale the whole
schedule (megatron-core 0.16.1's scheduler reads them per group), wd_mult the decay, eps Adam's epsilon. One
ParamKey per distinct override, matching parameters by identity.

`build_lr_scheduler(cfg, optimizer, total_steps)` -> megatron's OptimizerParamScheduler: linear warmup from 0 to
lr over warmup_steps, then cosine from lr to min_lr at total_steps (min_lr afterwards); weight decay constant.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Set

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import VocabParallelEmbedding

from megafusion.config.schema import PARAM_GROUPS, Config

GROUP_KEY_PREFIX = "megafusion_group_"


def use_bf16_params(cfg: Config) -> bool:
    precision = cfg.training.precision
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def build_optimizer_config(cfg: Config) -> OptimizerConfig:
    o = cfg.optimizer
    bf16 = use_bf16_params(cfg)
    return OptimizerConfig(
        optimizer="adam",
        decoupled_weight_decay=True,  # AdamW
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        bf16=bf16,
        fp16=False,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def embedding_param_ids(model_chunks: Iterable[torch.nn.Module]) -> Set[int]:
    ids: Set[int] = set()
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, (torch.nn.Embedding, VocabParallelEmbedding)):
                ids.update(id(p) for p in module.parameters(recurse=False))
        for p in chunk.parameters():
            if getattr(p, "is_embedding_parameter", False):
                ids.add(id(p))
    return ids


def is_norm_or_bias(param: torch.Tensor, name: str) -> bool:
    return param.dim() == 1 or name.endswith(".bias")


def no_weight_decay_predicate(cfg: Config, model_chunks: List[torch.nn.Module]):
    """(param, name) -> True when the param gets no weight decay under cfg.optimizer; None when every param decays."""
    o = cfg.optimizer
    if o.decay_norms_and_biases and o.decay_embeddings:
        return None
    embeddings = embedding_param_ids(model_chunks)

    def no_decay(param: torch.Tensor, name: str) -> bool:
        if not o.decay_norms_and_biases and is_norm_or_bias(param, name):
            return True
        return not o.decay_embeddings and id(param) in embeddings

    return no_decay


def param_kind(name: str) -> Optional[str]:
    """The optimizer.groups kind of a parameter by its (megatron) name: embedding | unembedding | attention | mlp |
    norm; None for a name it does not know."""
    if "layernorm" in name or "layer_norm" in name:  # also TE's norms fused into linear_qkv / linear_fc1
        return "norm"
    if ".self_attention." in f".{name}":
        return "attention"
    if ".mlp." in f".{name}":
        return "mlp"
    if ".embedding." in f".{name}":
        return "embedding"
    if ".output_layer." in f".{name}" or ".velocity_head." in f".{name}":
        return "unembedding"
    return None


def layer_index(model_chunks: List[torch.nn.Module]) -> Dict[int, int]:
    """id(param) -> 0-based global transformer layer (megatron's layer_number - 1, pipeline offsets included)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    index: Dict[int, int] = {}
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, TransformerLayer):
                for p in module.parameters():
                    index[id(p)] = module.layer_number - 1
    return index


def param_overrides(cfg: Config, model_chunks: List[torch.nn.Module]) -> Dict[int, Dict[str, float]]:
    """id(param) -> megatron ParamGroupOverride fields (max_lr / min_lr, wd_mult, eps) from the weight-decay
    switches and optimizer.groups; params with no override are left out."""
    o, groups = cfg.optimizer, cfg.optimizer.groups
    no_decay = no_weight_decay_predicate(cfg, model_chunks)
    layers = layer_index(model_chunks) if groups.depth_lr_decay != 1.0 else {}
    depth = max(cfg.model.num_layers - 1, 1)
    out: Dict[int, Dict[str, float]] = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if not param.requires_grad or id(param) in out:
                continue
            override: Dict[str, float] = {}
            kind = param_kind(name) if not groups.default else None
            if kind is not None and getattr(param, "shared_embedding", False):
                kind = "embedding"  # a tied LM head is the embedding (both pipeline copies)
            if not groups.default and kind is None:
                raise ValueError(f"optimizer.groups: parameter {name} is none of {list(PARAM_GROUPS)}; leave "
                                 "optimizer.groups at its defaults for this model")
            group = getattr(groups, kind) if kind else None
            mult = group.lr_mult if group else 1.0
            if id(param) in layers:
                mult *= groups.depth_lr_decay ** (layers[id(param)] / depth)
            if mult != 1.0:
                override.update(max_lr=o.lr * mult, min_lr=o.min_lr * mult)
            if no_decay is not None and no_decay(param, name):
                override["wd_mult"] = 0.0
            elif group is not None and group.weight_decay is not None:
                override["wd_mult"] = group.weight_decay / o.weight_decay
            if group is not None and group.eps is not None:
                override["eps"] = group.eps
            if override:
                out[id(param)] = override
    return out


def build_config_overrides(cfg: Config, model_chunks: List[torch.nn.Module]) -> Dict:
    """megatron's config_overrides: one ParamKey per distinct override, matching its parameters by identity (names
    carry wrapper prefixes and, under pipeline parallelism, stage-local layer numbers)."""
    by_override: Dict[tuple, Set[int]] = {}
    for pid, override in param_overrides(cfg, model_chunks).items():
        by_override.setdefault(tuple(sorted(override.items())), set()).add(pid)
    overrides = {}  # empty (not None) keeps megatron from applying its default bias / 1-D rule
    for i, (override, ids) in enumerate(sorted(by_override.items())):
        key = ParamKey(with_name_predicate=ParamWithNamePredicate(
            name=f"{GROUP_KEY_PREFIX}{i}", fn=lambda param, name, ids=ids: id(param) in ids))
        overrides[key] = dict(override)
    return overrides


def build_optimizer(cfg: Config, model_chunks: List[torch.nn.Module]) -> MegatronOptimizer:
    """megatron optimizer (FP32Optimizer / Float16OptimizerWithFloat16Params / DistributedOptimizer, chained with
    the expert-parallel one for MoE) over the DDP-wrapped chunks from megafusion.parallel.wrapping.wrap_model."""
    if not all(hasattr(chunk, "ddp_config") for chunk in model_chunks):
        raise TypeError(
            "build_optimizer needs DistributedDataParallel-wrapped model chunks; build them with "
            "megafusion.parallel.wrapping.wrap_model"
        )
    return get_megatron_optimizer(
        build_optimizer_config(cfg), model_chunks, config_overrides=build_config_overrides(cfg, model_chunks)
    )


def build_lr_scheduler(cfg: Config, optimizer: MegatronOptimizer, total_steps: int) -> OptimizerParamScheduler:
    o = cfg.optimizer
    if total_steps < 1 or total_steps <= o.warmup_steps:  # megatron asserts warmup < decay steps
        raise ValueError(
            f"total_steps={total_steps} must be >= 1 and > optimizer.warmup_steps={o.warmup_steps}; lower "
            "optimizer.warmup_steps or raise training.train_steps"
        )
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=total_steps,
        lr_decay_style="cosine",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )


def expected_lr(cfg: Config, step: int, total_steps: int) -> float:
    """The schedule in closed form (what build_lr_scheduler produces after `step` scheduler steps)."""
    o = cfg.optimizer
    if o.warmup_steps > 0 and step <= o.warmup_steps:
        return o.lr * step / o.warmup_steps
    if step > total_steps:
        return o.min_lr
    ratio = (step - o.warmup_steps) / (total_steps - o.warmup_steps)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (o.lr - o.min_lr)
