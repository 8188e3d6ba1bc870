"""AdamW through megatron's optimizer stack, weight-decay groups, and the warmup + cosine LR schedule.

`build_optimizer(cfg, model_chunks)` -> megatron's get_megatron_optimizer with Adam in decoupled-weight-decay mode
(AdamW), global-norm clipping, and the distributed optimizer (optimizer state and fp32 main params sharded over the
data-parallel group) when cfg.parallel.use_distributed_optimizer. Params without weight decay (megatron-core
0.16.1 expresses this as `config_overrides={ParamKey: {"wd_mult": 0.0}}`; there is no no_weight_decay_cond):
  * norms and biases (1-D params or names ending in .bias) unless cfg.optimizer.decay_norms_and_biases;
  * embeddings (params of torch.nn.Embedding / megatron VocabParallelEmbedding modules, and any param a model marks
    with `param.is_embedding_parameter = True`) unless cfg.optimizer.decay_embeddings. A tied LM head is the
    embedding weight and follows it; an untied output layer is a linear layer and is decayed.

`build_lr_scheduler(cfg, optimizer, total_steps)` -> megatron's OptimizerParamScheduler: linear warmup from 0 to
lr over warmup_steps, then cosine from lr to min_lr at total_steps (min_lr afterwards); weight decay constant.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Set

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import VocabParallelEmbedding

from megafusion.config.schema import Config

NO_DECAY_KEY_NAME = "megafusion_no_weight_decay"


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


def build_config_overrides(cfg: Config, model_chunks: List[torch.nn.Module]) -> Dict:
    predicate = no_weight_decay_predicate(cfg, model_chunks)
    if predicate is None:
        return {}  # an empty dict (not None) keeps megatron from applying its default bias/1-D rule
    key = ParamKey(with_name_predicate=ParamWithNamePredicate(name=NO_DECAY_KEY_NAME, fn=predicate))
    return {key: {"wd_mult": 0.0}}


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
