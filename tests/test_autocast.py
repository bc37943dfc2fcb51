"""Autocast: the conv runs in the autocast dtype, batch-norm parameters and
running statistics stay float32, grads reach the float32 parameters; the
numbers match nn.Conv2d + nn.BatchNorm2d under the same autocast."""

import copy

import pytest
import torch
from torch import nn

from conftest import assert_as_accurate_as_pair
from convbn import ConvBN2d


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_cpu_autocast_bfloat16_matches_the_pair(memory_efficient):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    fused = ConvBN2d.from_modules(conv, bn, memory_efficient)
    ref_conv, ref_bn = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    x = torch.randn(4, 4, 8, 8)
    grad = torch.randn(4, 6, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
        out_pair = bn(conv(x))
    assert out.dtype == torch.bfloat16
    assert fused.running_mean.dtype == fused.running_var.dtype == torch.float32
    assert fused.num_batches_tracked.item() == 1
    out.backward(grad.to(out.dtype))
    out_pair.backward(grad.to(out_pair.dtype))
    assert fused.weight.grad.dtype == fused.bn_weight.grad.dtype == torch.float32

    # float64 reference from the bfloat16-rounded input and weight that autocast used
    ref_conv.weight.data = conv.weight.detach().bfloat16().double()
    ref_conv.bias.data = conv.bias.detach().bfloat16().double()
    out_ref = ref_bn(ref_conv(x.bfloat16().double()))
    out_ref.backward(grad.double())
    assert_as_accurate_as_pair(out, out_pair, out_ref, torch.bfloat16, "autocast output")
    assert_as_accurate_as_pair(fused.running_var, bn.running_var, ref_bn.running_var, torch.bfloat16, "running_var")
    assert_as_accurate_as_pair(fused.bn_weight.grad, bn.weight.grad, ref_bn.weight.grad, torch.bfloat16, "grad bn_weight")
    assert_as_accurate_as_pair(fused.weight.grad, conv.weight.grad, ref_conv.weight.grad, torch.bfloat16, "grad weight")


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_cpu_autocast_eval_runs_the_conv_in_bfloat16(grad_enabled):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 1.5)
    bn.eval()
    fused = ConvBN2d.from_modules(conv, bn).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad_enabled):
        out = fused(x)
        out_pair = bn(conv(x))
    assert out.dtype == torch.bfloat16
    out_ref = bn.double()(conv.double()(x.double()))
    assert_as_accurate_as_pair(out, out_pair, out_ref, torch.bfloat16, "autocast eval output")
