"""The one backend choice for hybrid attention: names -> functions, and `auto` resolution.

Function backends share one signature, fn(q, k, v, layout, scale, dropout_p) with q [b, nq, s, d] and k/v
[b, nkv, s, d], returning [b, nq, s, d]. Optional kernels are imported lazily inside their modules, so a missing
library only matters when its backend is chosen, and then the error names the alternative.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

_FUNCTIONS = {
    "dense": ("megafusion.model.attention.dense", "dense_attention"),
    "segmented": ("megafusion.model.attention.segmented", "segmented_attention"),
    "flex": ("megafusion.model.attention.flex", "flex_attention_backend"),
    "te": ("megafusion.model.attention.te", "te_attention"),
}
BACKENDS = ("dense", "segmented", "flex", "te")


def transformer_engine_available() -> bool:
    try:
        importlib.import_module("transformer_engine.pytorch")
        return True
    except Exception:
        return False


def resolve_backend(name: str, device: Optional[torch.device] = None) -> str:
    """`auto` -> segmented on CPU, flex on GPU. Explicit names are checked for availability here."""
    on_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
    if name == "auto":
        return "flex" if on_gpu else "segmented"
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend={name!r} is not one of {('auto',) + BACKENDS}")
    if name == "te" and not transformer_engine_available():
        raise ImportError(
            "model.attention_backend=te needs transformer-engine (pip install transformer-engine[pytorch] on a "
            "CUDA machine); use attention_backend=flex on GPU or segmented on CPU instead"
        )
    return name


def get_attention_function(name: str) -> Callable:
    if name not in _FUNCTIONS:
        raise ValueError(f"attention backend {name!r} has no function form; function backends: {list(_FUNCTIONS)}")
    module, attr = _FUNCTIONS[name]
    return getattr(importlib.import_module(module), attr)
