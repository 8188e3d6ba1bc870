"""Mixture-of-Transformers attention (BAGEL): per-modality QKV / output projections and norms, one attention.

With `model.modality_attention=true` the layer spec (megafusion/model/specs.py) puts, in megatron's own slots of
SelfAttention and TransformerLayer,

    input_layernorm, pre_mlp_layernorm   ModalityNorm:    a text norm and an image norm
    self_attention.linear_qkv            ModalityLinear:  a text and an image ColumnParallelLinear (QKV)
    self_attention.linear_proj           ModalityLinear:  a text and an image RowParallelLinear (output)

Each routes the rows of its input by modality (text and padding rows to `text`, latent rows to `image`), runs each
modality's own module on its rows and scatters the results back, so queries, keys and values of both modalities
form one sequence and the attention itself (the hybrid mask, RoPE, the KV cache) runs once over it, unchanged.
Parameter names: `...linear_qkv.text.weight`, `...input_layernorm.image.weight`; under tensor parallelism each
modality's projections are column / row parallel like the shared ones (a row-parallel output all-reduces once per
modality). With the option off nothing here is built.

Which rows are which comes from the batch's AttentionLayout. megatron calls these modules without it
(SelfAttention calls `linear_qkv(hidden_states)`, TransformerLayer calls `input_layernorm(hidden_states)`), so the
layer hands it over first: `routed(modules, layout)` sets it for the duration of one forward (a recomputed forward
sets it again) and clears it afterwards, so no batch is kept alive by a module.

Every modality's module runs on every micro-batch, even on zero rows (its weight gradient is then zero), so
gradient hooks and tensor-parallel collectives fire identically on all ranks; generation (`layout.inference`)
skips an empty modality, as ModalityMLP does. Sequence parallelism is refused by the config (a rank's slice holds
different numbers of each modality's rows than its peers').
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Optional, Tuple

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from megafusion.data.batch import MODALITY_IMAGE, MODALITY_TEXT
from megafusion.model.attention.layout import AttentionLayout

MODALITIES = ((MODALITY_TEXT, "text"), (MODALITY_IMAGE, "image"))


def _inverse(layout: AttentionLayout) -> torch.Tensor:
    """Index mapping cat(text rows, image rows) back to sequence-first [s*b] order (cached per batch)."""

    def build():
        order = torch.cat([layout.modality_rows(m) for m, _ in MODALITIES])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return inverse

    return layout.cached("modality_routing_inverse", build)


class _Routed(MegatronModule):
    """Holds one module per modality and the layout of the forward in progress."""

    layout: Optional[AttentionLayout] = None

    def _route(self, x: torch.Tensor, run) -> torch.Tensor:
        """x [s, b, ...] -> per-modality rows -> run(module, rows [1, n, ...]) -> [s, b, ...] in the same order."""
        layout = self.layout
        if not isinstance(layout, AttentionLayout):
            raise RuntimeError(f"{type(self).__name__} was called without the batch's AttentionLayout; it belongs in "
                               "a MultimodalTransformerLayer built by megafusion/model/specs.py, which hands it over")
        s, b = x.shape[:2]
        if layout.seq_length * layout.batch_size != s * b:
            raise ValueError(f"{type(self).__name__}: input [{s}, {b}, ...] does not match the layout "
                             f"[b={layout.batch_size}, s={layout.seq_length}]")
        flat = x.reshape(s * b, *x.shape[2:])
        outputs = []
        for modality, name in MODALITIES:
            rows = layout.modality_rows(modality)
            if rows.numel() == 0 and layout.inference is not None:
                outputs.append(None)
                continue
            outputs.append(run(getattr(self, name), flat.index_select(0, rows).unsqueeze(0)).squeeze(0))
        width = next(o for o in outputs if o is not None).shape[1:]
        parts = [o if o is not None else flat.new_zeros(0, *width) for o in outputs]
        return torch.cat(parts).index_select(0, _inverse(layout)).view(s, b, *width)


class ModalityLinear(_Routed):
    """A megatron linear (column or row parallel) per modality; returns (output, None) with each modality's bias
    already added to its rows."""

    def __init__(self, *args, submodules=None, **kwargs):
        config = kwargs.get("config")
        super().__init__(config=config)
        self.text = build_module(submodules, *args, **kwargs)
        self.image = build_module(submodules, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, None]:
        def run(module, rows):
            out, bias = module(rows)
            return out if bias is None else out + bias

        return self._route(x, run), None

    def backward_dw(self) -> None:  # megatron's delayed weight-gradient hook, forwarded
        for module in (self.text, self.image):
            if hasattr(module, "backward_dw"):
                module.backward_dw()


class ModalityNorm(_Routed):
    """A norm per modality (megatron's norm signature: config, hidden_size, eps)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, submodules=None, **kwargs):
        super().__init__(config=config)
        self.text = build_module(submodules, config=config, hidden_size=hidden_size, eps=eps, **kwargs)
        self.image = build_module(submodules, config=config, hidden_size=hidden_size, eps=eps, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._route(x, lambda module, rows: module(rows))


@contextmanager
def routed(modules: Iterable[torch.nn.Module], layout):
    """Give the modality-routed modules among `modules` the batch's layout for one forward."""
    targets = [m for m in modules if isinstance(m, _Routed)]
    for m in targets:
        m.layout = layout
    try:
        yield
    finally:
        for m in targets:
            m.layout = None
