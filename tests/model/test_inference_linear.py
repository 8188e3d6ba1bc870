"""The generation fast path of megatron's linears (megafusion/model/inference_linear.py) computes bitwise what
megatron-core's forward computes, and megatron's code still has the structure it mirrors."""

import inspect

import pytest
import torch
from megatron.core.tensor_parallel import layers as megatron_layers

from distributed import megatron_cpu_single_process
from megafusion.model.inference_linear import (MEGATRON_TARGET, InferenceColumnParallelLinear,
                                               InferenceRowParallelLinear)
from megafusion.model.transformer_config import build_transformer_config
from tiny_model import tiny_config


@pytest.mark.parametrize("bias, skip_bias_add", [(False, False), (True, False), (True, True)])
def test_fast_path_equals_megatrons_forward(bias, skip_bias_add):
    config = build_transformer_config(tiny_config(add_bias_linear=bias))
    with megatron_cpu_single_process():
        torch.manual_seed(0)
        column = InferenceColumnParallelLinear(64, 96, config=config, init_method=config.init_method, bias=bias,
                                               skip_bias_add=skip_bias_add, gather_output=False)
        row = InferenceRowParallelLinear(96, 64, config=config, init_method=config.init_method, bias=bias,
                                         skip_bias_add=skip_bias_add, input_is_parallel=True)
        with torch.no_grad():
            for layer in (column, row):
                if layer.bias is not None:
                    layer.bias.normal_()
        x = torch.randn(5, 3, 64)
        with torch.no_grad():  # megatron's path (inference mode off)
            ref_c, ref_cb = column(x)
            ref_r, ref_rb = row(ref_c)
        with torch.inference_mode():
            out_c, out_cb = column(x)
            out_r, out_rb = row(out_c)
    assert torch.equal(out_c, ref_c) and torch.equal(out_r, ref_r)
    for a, b in ((out_cb, ref_cb), (out_rb, ref_rb)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_megatron_forward_still_has_the_mirrored_structure():
    """If a megatron-core upgrade changes how a local linear computes its output, the fast path must be revisited."""
    from megafusion.version_check import in_tested_range

    assert in_tested_range(MEGATRON_TARGET)  # the version mirrored is one CI tests
    fn = inspect.getsource(megatron_layers.LinearWithGradAccumulationAndAsyncCommunication.forward)
    assert "output = torch.matmul(total_input, weight.t())" in fn and "output = output + bias" in fn
    row = inspect.getsource(megatron_layers.RowParallelLinear.forward)
    assert "output = (output_ + self.bias) if self.bias is not None else output_" in row
    column = inspect.getsource(megatron_layers.ColumnParallelLinear.forward)
    assert "bias = self.bias if not self.skip_bias_add else None" in column
    assert "output_bias = self.bias if self.skip_bias_add else None" in column
