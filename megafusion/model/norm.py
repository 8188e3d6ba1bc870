"""LocalNorm: the torch LayerNorm / RMSNorm of the local (non-Transformer-Engine) layer spec.

megatron's WrappedTorchNorm builds the same torch module but refuses sequence parallelism. Under sequence
parallelism a norm sees only this rank's slice of the sequence, so its weight gradients are partial sums over the
tensor-parallel group; megatron's finalize_model_grads all-reduces exactly the parameters marked
`sequence_parallel=True`, as TENorm and apex's FusedLayerNorm mark theirs. Parameter names (weight, bias) and
initialisation are WrappedTorchNorm's, so checkpoints are unchanged.
"""

from __future__ import annotations

import torch

_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class LocalNorm:
    """Factory with megatron's norm signature: LocalNorm(config, hidden_size, eps) -> torch.nn.LayerNorm/RMSNorm."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.normalization not in _NORMS:
            raise ValueError(f"model.normalization={config.normalization!r}: use one of {sorted(_NORMS)}")
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError("zero-centered gamma and memory-efficient layer norm need transformer_impl="
                             "transformer_engine")
        norm = _NORMS[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm
