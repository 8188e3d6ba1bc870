"""megafusion.parallel: the parallel runtime on megatron-core, the same code on GPU (NCCL) and CPU (gloo).

  initialize.py   initialize_parallel(parallel_cfg, seed) -> ParallelInfo; destroy_parallel()
  cpu_compat.py   the only place that adapts megatron-core 0.16.1 to a CPU-only machine (enable_cpu_compat)
  wrapping.py     wrap_model(model_provider, cfg) -> model chunks in megatron DistributedDataParallel
  liveness.py     peer heartbeats; a collective failing on a dead peer -> PeerLostError naming rank and step

Typical use (the optimizer lives in megafusion.training.optimizer):

    info = initialize_parallel(cfg.parallel, cfg.training.seed)
    chunks = wrap_model(model_provider, cfg)          # model_provider(pre_process, post_process, vp_stage)
    optimizer = build_optimizer(cfg, chunks)
    forward_backward = megatron.core.pipeline_parallel.get_forward_backward_func()
"""

from megafusion.parallel.cpu_compat import cpu_compat_enabled, disable_cpu_compat, enable_cpu_compat
from megafusion.parallel.initialize import ParallelInfo, destroy_parallel, initialize_parallel

__all__ = [
    "ParallelInfo",
    "cpu_compat_enabled",
    "destroy_parallel",
    "disable_cpu_compat",
    "enable_cpu_compat",
    "initialize_parallel",
    "wrap_model",
]


def __getattr__(name):  # wrap_model imports megatron's DDP; load it on first use
    if name == "wrap_model":
        from megafusion.parallel.wrapping import wrap_model

        return wrap_model
    raise AttributeError(f"module 'megafusion.parallel' has no attribute {name!r}")
