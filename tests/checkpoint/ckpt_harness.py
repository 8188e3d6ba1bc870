"""Shared pieces of the checkpoint tests: a tiny megatron GPTModel trained through megafusion's parallel runtime
(initialize_parallel, wrap_model, build_optimizer: DistributedOptimizer + LR schedule), full (TP-gathered)
weights, and the inner optimizer's state tensors for bit-exact comparisons.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from megafusion.config.schema import Config, OptimizerConfig, ParallelConfig, TrainingConfig
from megafusion.parallel.initialize import initialize_parallel
from megafusion.parallel.wrapping import wrap_model
from megafusion.training.optimizer import build_lr_scheduler, build_optimizer

VOCAB = 64
SEQ = 8
MBS = 2
NUM_MICROBATCHES = 2


def make_cfg(tp: int = 1, distributed_optimizer: bool = True, pp: int = 1, vp=None) -> Config:
    return Config(
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                virtual_pipeline_model_parallel_size=vp,
                                use_distributed_optimizer=distributed_optimizer),
        optimizer=OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.1, clip_grad=1.0),
        training=TrainingConfig(micro_batch_size=MBS, global_batch_size=MBS * NUM_MICROBATCHES, precision="fp32"),
    )


def transformer_config(cfg: Config, num_layers: int = 2) -> TransformerConfig:
    p = cfg.parallel
    return TransformerConfig(
        num_layers=num_layers, hidden_size=16, num_attention_heads=4, ffn_hidden_size=32, activation_func=F.gelu,
        normalization="RMSNorm", add_bias_linear=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        pipeline_dtype=torch.float32, params_dtype=torch.float32, use_cpu_initialization=True,
    )


def build(cfg: Config, seed: int, total_steps: int = 10, num_layers: int = 2):
    """(re)initialise the parallel layout, then model chunks, optimizer and LR scheduler, weights from `seed`."""
    initialize_parallel(cfg.parallel, seed)

    def provider(pre_process, post_process, vp_stage):
        return GPTModel(transformer_config(cfg, num_layers), get_gpt_layer_local_spec(), vocab_size=VOCAB,
                        max_sequence_length=SEQ, pre_process=pre_process, post_process=post_process,
                        position_embedding_type="rope", vp_stage=vp_stage)

    chunks = wrap_model(provider, cfg)
    optimizer = build_optimizer(cfg, chunks)
    scheduler = build_lr_scheduler(cfg, optimizer, total_steps=total_steps)
    return chunks, optimizer, scheduler


def _batches(step: int) -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (NUM_MICROBATCHES * MBS, SEQ + 1), generator=g)
    return [{"tokens": tokens[i * MBS:(i + 1) * MBS, :-1], "labels": tokens[i * MBS:(i + 1) * MBS, 1:]}
            for i in range(NUM_MICROBATCHES)]


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)
    output = model(batch["tokens"], positions, None, labels=batch["labels"])

    def loss_func(out):
        loss = out.float().mean()
        return loss, {"loss": loss.detach()}

    return output, loss_func


def train_step(chunks, optimizer, scheduler, step: int) -> float:
    """One optimizer step on the step's batch (the same batch on every data-parallel rank)."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    out = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(_batches(step)), model=chunks,
        num_microbatches=NUM_MICROBATCHES, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
    ok, _, _ = optimizer.step()
    assert ok
    scheduler.step(1)
    return float(torch.stack([o["loss"] for o in out]).mean())


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def full_weights(chunks) -> Dict[str, torch.Tensor]:
    """Every parameter gathered over the tensor-parallel group (the TP=1 view), keyed by name."""
    out = {}
    tp = ps.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        for name, p in _unwrap(chunk).named_parameters():
            t = p.detach().clone()
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                parts = [torch.empty_like(t) for _ in range(tp)]
                torch.distributed.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
                t = torch.cat(parts, dim=p.partition_dim)
            out[name] = t
    return out


def global_weights(chunks) -> Dict[str, torch.Tensor]:
    """Every parameter of the whole model (all pipeline stages and virtual chunks, TP=1), keyed by a name with the
    global layer number, gathered on every rank."""
    local = {}
    for chunk in chunks:
        model = _unwrap(chunk)
        for name, p in model.named_parameters():
            parts = name.split(".")
            if name.startswith("decoder.layers."):
                parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
            local[".".join(parts)] = p.detach().clone()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    merged = {}
    for piece in gathered:
        merged.update(piece)
    return merged


def optimizer_tensors(optimizer) -> List[torch.Tensor]:
    """The inner torch optimizer's state tensors (Adam moments of this rank's main-param shards), in order."""
    inner = [optimizer]
    if hasattr(optimizer, "chained_optimizers"):
        inner = optimizer.chained_optimizers
    tensors = []
    for opt in inner:
        torch_opt = opt.optimizer
        for group in torch_opt.param_groups:
            for p in group["params"]:
                for key in sorted(torch_opt.state.get(p, {})):
                    value = torch_opt.state[p][key]
                    tensors.append(value.detach().clone() if torch.is_tensor(value) else torch.tensor(value))
    return tensors
