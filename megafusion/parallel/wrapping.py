"""Model chunks for megatron's schedules: virtual-pipeline stages, precision wrapper, DistributedDataParallel.

`wrap_model(model_provider, cfg)` calls `model_provider(pre_process, post_process, vp_stage)` once per virtual
pipeline stage of this rank (once when there is no virtual pipeline), wraps each chunk in megatron's Float16Module
when training in bf16, then in megatron's DistributedDataParallel (gradient buffers, bucketed reduce-scatter /
all-reduce, the distributed optimizer's shards), broadcasts the weights from data-parallel rank 0, and wires the
schedule hooks (no_sync, finalize_model_grads) into the model config, as megatron's own training loop does.
Precision: fp32 on CPU by default, bf16 on GPU (cfg.training.precision = auto | fp32 | bf16).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.module import Float16Module, MegatronModule

from megafusion.config.schema import Config

ModelProvider = Callable[[bool, bool, Optional[int]], MegatronModule]


def use_bf16(cfg: Config) -> bool:
    precision = cfg.training.precision
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def build_ddp_config(cfg: Config, *, bucket_size: Optional[int] = None,
                     grad_reduce_in_fp32: Optional[bool] = None) -> DistributedDataParallelConfig:
    """megatron DDP settings from the parallel section; gradients are reduced in fp32 when params are bf16."""
    p = cfg.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=use_bf16(cfg) if grad_reduce_in_fp32 is None else grad_reduce_in_fp32,
        overlap_grad_reduce=p.overlap_grad_reduce,
        use_distributed_optimizer=p.use_distributed_optimizer,
        bucket_size=bucket_size,
    )


def build_model_chunks(model_provider: ModelProvider) -> List[MegatronModule]:
    """Unwrapped chunks of this pipeline rank: one per virtual stage, pre/post_process set by stage."""
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    stages = list(range(vpp)) if vpp is not None else [None]
    chunks = []
    for vp_stage in stages:
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunk = model_provider(pre, post, vp_stage)
        if not isinstance(chunk, MegatronModule):
            raise TypeError(f"model_provider must return a megatron MegatronModule, got {type(chunk).__name__}")
        chunk.model_type = getattr(chunk, "model_type", None) or _encoder_or_decoder()
        chunks.append(chunk)
    return chunks


def _encoder_or_decoder():
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder


def wrap_model(model_provider: ModelProvider, cfg: Config, *, bucket_size: Optional[int] = None,
               grad_reduce_in_fp32: Optional[bool] = None, wrap_with_ddp: bool = True) -> List[MegatronModule]:
    """-> this rank's model chunks, each DistributedDataParallel(Float16Module?(model)), ready for
    get_forward_backward_func and megafusion.training.optimizer.build_optimizer."""
    chunks = build_model_chunks(model_provider)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    bf16 = use_bf16(cfg)
    for chunk in chunks:
        chunk.to(device)
        if bf16 != bool(chunk.config.bf16):
            raise ValueError(
                f"training.precision={cfg.training.precision!r} resolves to {'bf16' if bf16 else 'fp32'} but the "
                f"model_provider built a model with TransformerConfig.bf16={chunk.config.bf16}; build its config "
                "with megafusion.model.transformer_config.build_transformer_config(cfg)"
            )
    if bf16:
        chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]
    if not wrap_with_ddp:
        return chunks
    ddp_config = build_ddp_config(cfg, bucket_size=bucket_size, grad_reduce_in_fp32=grad_reduce_in_fp32)
    wrapped = [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # megatron buckets only the first chunk: later virtual stages reduce once, after the whole backward.
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()
    configure_schedule_hooks(wrapped)
    return wrapped


def configure_schedule_hooks(model_chunks: List[MegatronModule]) -> None:
    """Set the model config's no_sync_func / grad_sync_func / finalize_model_grads_func the way megatron's
    training loop does, so get_forward_backward_func delays and finalises gradient reduction correctly."""
    config = model_chunks[0].config
    no_sync = [chunk.no_sync for chunk in model_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if getattr(model_chunks[0], "ddp_config", None) is not None and model_chunks[0].ddp_config.overlap_grad_reduce:
        sync = [chunk.start_grad_sync for chunk in model_chunks]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    config.finalize_model_grads_func = finalize_with_partial_grads


def finalize_with_partial_grads(model, num_tokens=None, pg_collection=None, **kwargs):
    """megatron's finalize_model_grads, then a sum over the tensor-parallel group of the gradients megafusion
    marks `tp_partial_grad` (an MoE router under TP sees only this rank's share of its modality's rows,
    megafusion/model/modality_mlp.py; megatron sums such gradients itself only when the model is sequence
    parallel). One flattened all-reduce; nothing happens at TP = 1."""
    finalize_model_grads(model, num_tokens=num_tokens, pg_collection=pg_collection, **kwargs)
    if ps.get_tensor_model_parallel_world_size() <= 1:
        return
    config = model[0].config
    if config.sequence_parallel:  # megatron already summed them (they also carry sequence_parallel=True)
        return
    grads = []
    for chunk in model:
        for param in chunk.parameters():
            if getattr(param, "tp_partial_grad", False) and param.requires_grad:
                grad = getattr(param, "main_grad", None)
                grads.append(grad if grad is not None else param.grad)
    grads = [g for g in grads if g is not None]
    if not grads:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors([g.data for g in grads])
    torch.distributed.all_reduce(flat, group=ps.get_tensor_model_parallel_group())
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, [g.data for g in grads])):
        g.data.copy_(synced)
