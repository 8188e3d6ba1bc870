"""Generation fast path of megatron-core's local tensor-parallel linears (targets megatron-core 0.16.1).

A decode step runs one token through every linear of the model; megatron's ColumnParallelLinear and
RowParallelLinear route each call through three autograd Functions (copy-to / reduce-from the tensor-parallel
region, LinearWithGradAccumulationAndAsyncCommunication) even when nothing needs a gradient or a collective: about a
millisecond per token on CPU for a 8-layer model (benchmarks/decode.py). These subclasses are the same modules
(same parameters, names, sharded state dict, init) whose forward, under torch.inference_mode with one
tensor-parallel rank and no sequence parallelism, does what megatron 0.16.1's forward computes in that case —
`torch.matmul(input, weight.t())`, the bias added by the same expression — and otherwise calls megatron's forward.
tests/model/test_inference_linear.py checks both paths give bitwise-equal outputs and that the megatron forward
still has the structure mirrored here (megafusion.version_check names the tested megatron-core range).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

MEGATRON_TARGET = "0.16.1"


def _single_rank(layer) -> bool:
    group = getattr(layer, "tp_group", None)
    return group is None or group.size() == 1


def _fast(layer) -> bool:
    return (torch.is_inference_mode_enabled() and not layer.sequence_parallel and not layer.explicit_expert_comm
            and _single_rank(layer) and layer.config._cpu_offloading_context is None)


class InferenceColumnParallelLinear(ColumnParallelLinear):
    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if weight is not None or not _fast(self):
            return super().forward(input_, weight, runtime_gather_output)
        bias = self.bias if not self.skip_bias_add else None
        output = torch.matmul(input_, self.weight.t())
        if bias is not None:
            output = output + bias
        return output, (self.bias if self.skip_bias_add else None)


class InferenceRowParallelLinear(RowParallelLinear):
    def forward(self, input_: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not _fast(self):
            return super().forward(input_)
        output_ = torch.matmul(input_, self.weight.t())
        if not self.skip_bias_add:
            output = (output_ + self.bias) if self.bias is not None else output_
            return output, None
        return output_, self.bias
