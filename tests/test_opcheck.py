"""torch.library.opcheck on every op: schema, autograd registration, fake
tensor kernels and AOT dispatch (dynamic shapes), with inputs that require
grad."""

import pytest
import torch
from torch.library import opcheck


def _tensors(dtype, channels_last, device="cpu"):
    x = torch.randn(2, 4, 6, 5, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (
        x.requires_grad_(),
        torch.randn(6, 2, 3, 3, dtype=dtype, device=device, requires_grad=True),
        torch.randn(6, dtype=dtype, device=device, requires_grad=True),
        (torch.rand(6, dtype=dtype, device=device) + 0.5).requires_grad_(),
        torch.randn(6, dtype=dtype, device=device, requires_grad=True),
    )


CONFIGS = [(torch.float32, False), (torch.float64, True), (torch.bfloat16, False)]
HYPER = ([1, 2], [1, 1], [1, 1], 2)


@pytest.mark.parametrize("dtype,channels_last", CONFIGS)
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_opcheck_conv_bn_train(dtype, channels_last, memory_efficient, device):
    args = _tensors(dtype, channels_last, device) + HYPER + (1e-5, memory_efficient)
    opcheck(torch.ops.convbn.conv_bn_train.default, args)


@pytest.mark.parametrize("dtype,channels_last", CONFIGS)
@pytest.mark.parametrize("mask", [[True] * 5, [True, False, False, True, False], [False, True, True, False, True]])
def test_opcheck_conv_bn_train_backward(dtype, channels_last, mask, device):
    x, w, b, g, beta = _tensors(dtype, channels_last, device)
    out, mean, invstd, conv_out = torch.ops.convbn.conv_bn_train(x, w, b, g, beta, *HYPER, 1e-5, False)
    grad = torch.randn_like(out).requires_grad_()
    for conv_output in (None, conv_out.detach()):
        args = (grad, x, w, b, g, conv_output, mean, invstd) + HYPER + (1e-5, mask)
        opcheck(torch.ops.convbn.conv_bn_train_backward.default, args)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_opcheck_update_running_stats(momentum, device):
    x, w, b, g, beta = _tensors(torch.float32, False, device)
    out, mean, invstd, _ = torch.ops.convbn.conv_bn_train(x, w, b, g, beta, *HYPER, 1e-5, True)
    args = (torch.zeros(6, device=device), torch.ones(6, device=device), torch.tensor(3, device=device),
            mean.detach(), invstd.detach(), 1e-5, momentum,
            out.shape[0] * out.shape[2] * out.shape[3])
    opcheck(torch.ops.convbn.update_running_stats.default, args)


@pytest.mark.parametrize("dtype,channels_last", CONFIGS)
def test_opcheck_conv_bn_eval(dtype, channels_last, device):
    stats_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    args = _tensors(dtype, channels_last, device) + (
        torch.randn(6, dtype=stats_dtype, device=device),
        torch.rand(6, dtype=stats_dtype, device=device) + 0.5) + HYPER + (1e-5,)
    opcheck(torch.ops.convbn.conv_bn_eval.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_fold_conv_bn(dtype):
    stats_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    _, w, b, g, beta = _tensors(dtype, False)
    args = (w, b, g, beta, torch.randn(6, dtype=stats_dtype), torch.rand(6, dtype=stats_dtype) + 0.5, 1e-5)
    opcheck(torch.ops.convbn.fold_conv_bn.default, args)
