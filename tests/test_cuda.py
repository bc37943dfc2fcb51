"""CUDA-only checks of the CUDA issue: half types against the pair run in
float32, a tensor past 2^31 elements, NaN/Inf, non-contiguous input, a
non-default stream, inputs on two devices, autocast. (The parity grid,
gradcheck, opcheck and memory tests run on CUDA through the `device`
fixture.) All skip without a CUDA device."""

import copy

import pytest
import torch
from torch import nn

from conftest import assert_as_accurate_as_pair, requires_cuda
from convbn import ConvBN2d

pytestmark = requires_cuda


def _pair(cin=8, cout=16, k=3, **conv_kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, **conv_kwargs).cuda()
    bn = nn.BatchNorm2d(cout).cuda()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    return conv, bn


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_half_types_match_the_pair_in_float32(dtype, channels_last, memory_efficient):
    conv, bn = _pair()
    fused = ConvBN2d.from_modules(conv, bn, memory_efficient).to(dtype)
    x = torch.randn(8, 8, 20, 20, device="cuda")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xh = x.to(dtype).contiguous(memory_format=fmt).requires_grad_()
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    with torch.no_grad():
        ref_conv.weight.copy_(conv.weight.to(dtype).float())
        ref_conv.bias.copy_(conv.bias.to(dtype).float())
    xr = x.to(dtype).float().requires_grad_()
    out, ref = fused(xh), ref_bn(ref_conv(xr))
    assert out.is_contiguous(memory_format=fmt)
    g = torch.randn_like(ref)
    out.backward(g.to(dtype)), ref.backward(g)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * 4)
    torch.testing.assert_close(xh.grad.float(), xr.grad, rtol=tol, atol=tol * 4)
    # Statistics stay float32 inside and are only rounded when stored.
    torch.testing.assert_close(fused.running_var.float(), ref_bn.running_var, rtol=tol, atol=tol)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_tf32_is_as_accurate_as_the_pair_under_tf32(channels_last, memory_efficient):
    """With cuDNN's TF32 on, as it is by default (the other tests turn it
    off: conftest.py), convbn's float32 results are as far from the float64
    pair as nn's float32 pair under TF32 is: training and eval, the output,
    the gradients and the running statistics. Like with like: both take
    their convolutions from cuDNN under the same flags."""
    torch.backends.cudnn.allow_tf32 = True  # conftest's fixture restores it
    conv, bn = _pair(cin=64, cout=32)
    ref_conv, ref_bn = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    pair_conv, pair_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    fused = ConvBN2d.from_modules(conv, bn, memory_efficient)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(2):
        x = torch.randn(8, 64, 16, 16, device="cuda") + step
        g = torch.randn(8, 32, 16, 16, device="cuda")
        xs = [x.double().requires_grad_(), x.clone().requires_grad_(),
              x.contiguous(memory_format=fmt).requires_grad_()]
        outs = [ref_bn(ref_conv(xs[0])), pair_bn(pair_conv(xs[1])), fused(xs[2])]
        for out in outs:
            out.backward(g.to(out.dtype))
        results = {
            "output": [o.detach() for o in outs],
            "grad input": [x.grad for x in xs],
            "grad weight": [ref_conv.weight.grad, pair_conv.weight.grad, fused.weight.grad],
            "grad bn_weight": [ref_bn.weight.grad, pair_bn.weight.grad, fused.bn_weight.grad],
            "running_var": [ref_bn.running_var, pair_bn.running_var, fused.running_var],
        }
        for name, (expected, pair, actual) in results.items():
            assert_as_accurate_as_pair(actual.cpu(), pair.cpu(), expected.cpu(), torch.float32, f"{name}, step {step}")
        for p in [*ref_conv.parameters(), *ref_bn.parameters(), *pair_conv.parameters(), *pair_bn.parameters(),
                  *fused.parameters()]:
            p.grad = None
    for m in (ref_bn, pair_bn, fused):
        m.eval()
    x = torch.randn(8, 64, 16, 16, device="cuda")
    with torch.no_grad():
        expected, pair = ref_bn(ref_conv(x.double())), pair_bn(pair_conv(x))
        actual = fused(x.contiguous(memory_format=fmt))
    assert_as_accurate_as_pair(actual.cpu(), pair.cpu(), expected.cpu(), torch.float32, "eval output")


# Just below 2^31 elements (2^31 - 2: one grid stride short, where a 32-bit
# loop counter would wrap) and past it, in both layouts: every element of
# the output and of the input's gradient against the float16 pair.
# tests/cpp/test_index_walk.cpp checks the same launches' indexing on the CPU.
@pytest.mark.parametrize("shape", [(2, 3, 3, 119304647), (2, 16, 8192, 8193)],
                         ids=["just_below_2pow31", "past_2pow31"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_around_2_pow_31_elements(shape, channels_last):
    if torch.cuda.get_device_properties(0).total_memory < 80 * 2**30:
        pytest.skip("needs a GPU with 80 GiB")
    n, c, h, w = shape
    conv = nn.Conv2d(c, c, 1, groups=c, bias=False).cuda().half()
    bn = nn.BatchNorm2d(c).cuda().half()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    fused = ConvBN2d.from_modules(conv, bn)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device="cuda", dtype=torch.float16).contiguous(memory_format=fmt)
    assert abs(x.numel() - 2**31) < 2**31 // 8
    x.requires_grad_()
    out = fused(x)
    assert out.is_contiguous(memory_format=fmt)
    g = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, g)
    x_ref = x.detach().requires_grad_()
    ref = bn(conv(x_ref))
    (grad_ref,) = torch.autograd.grad(ref, x_ref, g)
    del g
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    del out, ref
    torch.testing.assert_close(grad_x, grad_ref, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(fused.running_mean.float(), bn.running_mean.float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(fused.running_var.float(), bn.running_var.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_behave_like_the_pair(bad):
    conv, bn = _pair()
    fused = ConvBN2d.from_modules(conv, bn)
    x = torch.randn(4, 8, 10, 10, device="cuda")
    x[0, 0, 0, 0] = bad
    out, ref = fused(x), bn(conv(x))
    # Wherever the pair produces a non-finite value, so do we, and the rest matches.
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite])
    assert torch.equal(torch.isfinite(fused.running_var), torch.isfinite(bn.running_var))


def test_non_contiguous_input_and_non_default_stream():
    conv, bn = _pair()
    fused = ConvBN2d.from_modules(conv, bn)
    x = torch.randn(4, 8, 24, 24, device="cuda")[:, :, ::2, 1::2]
    assert not x.is_contiguous()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fused(x)
        ref = bn(conv(x))
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, ref)


def test_inputs_on_two_devices_are_named():
    conv, bn = _pair()
    fused = ConvBN2d.from_modules(conv, bn)
    with pytest.raises(RuntimeError, match=r"`input` is on cpu|is on cuda:0 but `input` is on cpu"):
        fused(torch.randn(2, 8, 6, 6))


def test_cuda_autocast_keeps_statistics_in_float32():
    conv, bn = _pair()
    fused = ConvBN2d.from_modules(conv, bn)
    x = torch.randn(4, 8, 10, 10, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused(x)
        ref = bn(conv(x))
    assert out.dtype == torch.bfloat16 and fused.running_var.dtype == torch.float32
    out.float().sum().backward()
    assert fused.weight.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)
