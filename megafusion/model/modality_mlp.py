"""ModalityMLP: the FFN slot of a transformer layer with separate weights per modality (text, image; audio codes in
the masked-diffusion family).

Each modality's rows of the hidden states are gathered, run through that modality's own FFN, and scattered back:

    hidden [s, b, h] -> flat [s*b, h] -> text rows  [1, n_text, h] -> text FFN  -> [n_text, h] \\
                                      -> image rows [1, n_img, h]  -> image FFN -> [n_img, h]  -> [s, b, h]

Which rows belong to which modality comes from the AttentionLayout (`modality_rows`, cached once per batch), which
MultimodalTransformerLayer hands to the MLP through megatron's `padding_mask` channel (so it also survives
megatron's MLP recompute, a functools.partial closure). A modality's submodule is any megatron module built from a
ModuleSpec that returns (output, bias): a dense megatron MLP, or megatron's MoE layer (model.moe;
megafusion/model/moe.py), so each modality has its own experts and router. Submodules receive their rows as
[1, n, h] (n one-token sequences; megatron's linears and MoE flatten the two leading dims alike) with a matching
[b, s] = [n, 1] padding mask (True = padding) that keeps padding out of the MoE load-balancing statistics.
[1, n, h] rather than [n, 1, h]: on CPU, silu_backward over SwiGLU's chunked [n, 1, 2f] fc1 output takes a slow strided path (measured
251 ms vs 35 ms per training step at d=512, 8 layers, S=512, b=2; benchmarks/train_step.py).
Every submodule runs on every micro-batch, so collectives inside it (TP, EP token dispatch) and gradient hooks
fire identically on all ranks; a modality with zero rows (a text-only batch) runs one padding row instead (except
in generation, `layout.inference` set, where every rank skips the same empty branch), and
MoE layers may get more padding rows (megafusion/model/moe.py rows_to_run: megatron's router cannot reshape an
empty batch, its allgather dispatcher needs equal row counts on every expert-parallel rank).

MoE under tensor parallelism: megatron's MoE layer is built for sequence parallelism, where each TP rank routes its
own tokens, so a modality's MoE layer is built with sequence_parallel=True and run on this rank's share of the
rows (megafusion/model/moe.py run_moe_rows). The router's weight gradient is then a partial sum over TP ranks,
which megatron's finalize_model_grads sums only when the model itself is sequence parallel: such parameters are
marked `tp_partial_grad`, and megafusion's finalize step (megafusion/parallel/wrapping.py) sums them over TP.

Sequence parallelism: a rank holds [s/tp, b, h], and the modality rows of its slice differ in number from the
other ranks', which megatron's sequence-parallel linears (equal-sized all-gathers) cannot take. So the whole
sequence is gathered first (backward: keep this rank's slice), the submodules run as plain tensor-parallel FFNs
(built from a copy of the config with sequence_parallel=False; fc2 all-reduces), and the output is split back
to this rank's slice (backward: all-gather). Megatron's own sequence-parallel MLP instead all-gathers before fc1
and reduce-scatters after fc2; this costs one extra all-gather per FFN in each direction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megafusion.model.attention.layout import AttentionLayout
from megafusion.model.moe import run_moe_rows


@dataclass
class ModalityMLPSubmodules:
    text: ModuleSpec
    """FFN of text (and padding) positions."""
    image: ModuleSpec
    """FFN of latent (image / video frame) positions; in the masked-diffusion family, of image-code positions."""
    audio: Optional[ModuleSpec] = None
    """Masked-diffusion family only: FFN of audio-code positions (routed by AttentionLayout.route)."""


def _mlp_kwargs(spec, pg_collection: ProcessGroupCollection) -> dict:
    """The process-group argument each megatron FFN kind expects (mirrors TransformerLayer.__init__)."""
    from megatron.core.extensions.transformer_engine import TEFusedMLP
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, TEGroupedMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    module = spec.module if isinstance(spec, ModuleSpec) else spec
    if module in (MoELayer, GroupedMLP, TEGroupedMLP, SequentialMLP):
        return {"pg_collection": pg_collection}
    if module is MLP or (TEFusedMLP is not None and module is TEFusedMLP):
        return {"tp_group": pg_collection.tp}
    return {}


class ModalityMLP(MegatronModule):
    def __init__(
        self,
        config,
        submodules: ModalityMLPSubmodules,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.tp_group = pg_collection.tp
        self.tp_size = self.tp_group.size() if self.tp_group is not None else 1
        dense = config
        if config.sequence_parallel:  # the submodules see the gathered sequence (module docstring)
            dense = copy.copy(config)
            dense.sequence_parallel = False
        # MoE under TP runs as megatron's sequence-parallel MoE on this rank's share of the rows (docstring)
        moe = config
        if self.tp_size > 1 and not config.sequence_parallel:
            moe = copy.copy(config)
            moe.sequence_parallel = True
        self.names = ("text", "image") + (("audio",) if submodules.audio is not None else ())
        for name in self.names:
            spec = getattr(submodules, name)
            inner = moe if _is_moe(spec) else dense
            setattr(self, name, build_module(spec, config=inner, **_mlp_kwargs(spec, pg_collection)))
            if _is_moe(spec) and self.tp_size > 1:
                for param in getattr(self, name).parameters():
                    if getattr(param, "sequence_parallel", False):  # the router: a sum over TP ranks' shares
                        param.tp_partial_grad = True

    def set_layer_number(self, layer_number: int) -> None:
        """Forwarded to submodules that track it (megatron's MoE layer)."""
        for _, module in self.branches():
            if hasattr(module, "set_layer_number"):
                module.set_layer_number(layer_number)

    def branches(self):
        """(FFN path id, module) pairs: text = 0, image = 1 (latents, or image codes), audio codes = 2."""
        return tuple((i, getattr(self, name)) for i, name in enumerate(self.names))

    def forward(
        self, hidden_states: torch.Tensor, padding_mask: Optional[AttentionLayout] = None, **kwargs
    ) -> Tuple[torch.Tensor, None]:
        """hidden_states [s, b, h] and the batch's AttentionLayout (in `padding_mask`) -> ([s, b, h], None)."""
        layout = padding_mask
        if not isinstance(layout, AttentionLayout):
            raise TypeError(
                "ModalityMLP needs the batch's AttentionLayout in its padding_mask argument (got "
                f"{type(layout).__name__}); build layers with MultimodalTransformerLayer (megafusion/model/specs.py), "
                "which routes it there"
            )
        if self.config.sequence_parallel:
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.tp_group)
        s, b, h = hidden_states.shape
        if layout.seq_length * layout.batch_size != s * b:
            raise ValueError(
                f"ModalityMLP: hidden states [{s}, {b}, {h}] do not match the AttentionLayout [b={layout.batch_size}, "
                f"s={layout.seq_length}]"
            )
        flat = hidden_states.reshape(s * b, h)
        if layout.inference is not None:
            only = _single_path(layout)
            if only is not None and not _is_moe(self.branches()[only][1]):
                # generation step whose rows all take one FFN (a text token, an image block): gathering, the other
                # branches and the inverse permutation are identities; skip them (bitwise the same result)
                out, bias = self.branches()[only][1](flat.unsqueeze(0), padding_mask=_row_padding(layout, only)
                                                     .unsqueeze(1))
                return (out if bias is None else out + bias).view(s, b, -1), None
        outputs = []
        for modality, module in self.branches():
            rows = layout.modality_rows(modality)
            x, padding = flat.index_select(0, rows), _row_padding(layout, modality)
            n = rows.numel()
            if n == 0 and layout.inference is not None:
                # generation: every rank holds the same rows (TP) and experts are not split (EP = 1), so no
                # collective needs the empty branch; skipping it halves a decode step's FFN weight reads
                outputs.append(flat.new_zeros(0, h))
                continue
            if _is_moe(module):
                outputs.append(run_moe_rows(module, x, padding, layout, modality, self.tp_group))
                continue
            if n == 0:  # one padding row, so the FFN's parameters take part (their gradients are zero)
                x, padding = x.new_zeros(1, h), padding.new_ones(1)
            out, bias = module(x.unsqueeze(0), padding_mask=padding.unsqueeze(1))  # [1, n, h]: n one-token seqs
            outputs.append((out if bias is None else out + bias).reshape(-1, out.shape[-1])[:n])
        # one gather puts the concatenated branch outputs back in [s*b] order
        merged = torch.cat(outputs, dim=0).index_select(0, _inverse_permutation(layout, len(self.names)))
        merged = merged.view(s, b, -1)
        if self.config.sequence_parallel:
            merged = tensor_parallel.scatter_to_sequence_parallel_region(merged, group=self.tp_group)
        return merged, None


def _is_moe(spec_or_module) -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    module = spec_or_module.module if isinstance(spec_or_module, ModuleSpec) else spec_or_module
    return isinstance(module, MoELayer) or (isinstance(module, type) and issubclass(module, MoELayer))


def _row_padding(layout: AttentionLayout, modality: int) -> torch.Tensor:
    """[n] bool, True at padding positions among `modality`'s rows (MoE routing ignores them)."""

    def build():
        invalid = (~layout.valid).transpose(0, 1).reshape(-1)
        return invalid.index_select(0, layout.modality_rows(modality))

    return layout.cached(f"modality_mlp_padding_{modality}", build)


def _single_path(layout: AttentionLayout) -> Optional[int]:
    """The FFN path of every position when they all share one, else None."""

    def build():
        paths = layout.route if layout.route is not None else layout.modality
        first = int(paths.reshape(-1)[0])
        return first if bool((paths == first).all()) else None

    return layout.cached("modality_mlp_single_path", build)


def _inverse_permutation(layout: AttentionLayout, paths: int = 2) -> torch.Tensor:
    """Index that maps cat(rows of path 0, 1, ..) (text, image[, audio]) back to sequence-first [s*b] order."""

    def build():
        order = torch.cat([layout.modality_rows(m) for m in range(paths)])
        if order.numel() != layout.seq_length * layout.batch_size:
            raise ValueError(f"AttentionLayout routes positions to FFN paths other than the layer's {paths} "
                             f"(text, image[, audio]); an audio-code position needs the masked-diffusion family's "
                             f"audio FFN")
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return inverse

    return layout.cached(f"modality_mlp_inverse_{paths}", build)
