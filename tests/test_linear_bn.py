"""convbn.LinearBN1d and the linear_bn operators against nn.Linear +
nn.BatchNorm1d (float64 reference): outputs, gradients, running statistics,
eval, gradcheck, opcheck, what is kept for backward, errors, autocast and
TorchScript."""

import copy

import pytest
import torch
from torch import nn
from torch.library import opcheck

import convbn
from convbn import LinearBN1d
from conftest import (
    TOLERANCE, assert_as_accurate_as_pair, assert_close_to_reference, error_type, nbytes, saved_tensors,
)

OPS = torch.ops.convbn


def make_pair(in_features, out_features, bias, affine=True, track=True, momentum=0.1, device="cpu"):
    linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=torch.float64)
    bn = nn.BatchNorm1d(out_features, momentum=momentum, affine=affine, track_running_stats=track,
                        device=device, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return linear, bn


def pair_grads(linear, bn):
    return [p.grad for p in (linear.weight, linear.bias, bn.weight, bn.bias) if p is not None]


def fused_grads(fused):
    return [p.grad for p in (fused.weight, fused.bias, fused.bn_weight, fused.bn_bias) if p is not None]


def assert_stats_equal(fused, bn, dtype):
    if bn.running_mean is None:
        assert fused.running_mean is None and fused.running_var is None
        return
    assert_close_to_reference(fused.running_mean, bn.running_mean, dtype, "running_mean")
    assert_close_to_reference(fused.running_var, bn.running_var, dtype, "running_var")
    assert fused.num_batches_tracked.item() == bn.num_batches_tracked.item()


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("bias,affine,track,momentum", [
    (False, True, True, 0.1),
    (True, True, True, None),
    (True, False, True, 0.3),
    (False, True, False, 0.1),
])
def test_matches_linear_batchnorm1d_float64(bias, affine, track, momentum, memory_efficient, device):
    linear, bn = make_pair(12, 7, bias, affine, track, momentum, device)
    fused = LinearBN1d.from_modules(linear, bn, memory_efficient)
    for step, batch in enumerate([16, 5, 9]):
        # A large mean and spread, so that centring before squaring matters.
        x = (torch.randn(batch, 12, dtype=torch.float64, device=device) * 4 + 3).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        out, ref = fused(x), bn(linear(x_ref))
        assert_close_to_reference(out, ref, torch.float64, f"output step {step}")
        grad = torch.randn_like(ref)
        out.backward(grad)
        ref.backward(grad)
        assert_close_to_reference(x.grad, x_ref.grad, torch.float64, "grad_input")
        for got, want in zip(fused_grads(fused), pair_grads(linear, bn)):
            assert_close_to_reference(got, want, torch.float64, "parameter grad")
        assert_stats_equal(fused, bn, torch.float64)

    fused.eval()
    bn.eval()
    x = torch.randn(6, 12, dtype=torch.float64, device=device)
    assert_close_to_reference(fused(x), bn(linear(x)), torch.float64, "eval")
    with torch.no_grad():  # the fold without autograd
        assert_close_to_reference(fused(x), bn(linear(x)), torch.float64, "eval, no grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_as_accurate_as_the_pair(dtype, device):
    linear, bn = make_pair(64, 32, True, device=device)
    x64 = torch.randn(48, 64, dtype=torch.float64, device=device) * 3 + 1
    ref = bn(linear(x64))
    low_linear, low_bn = copy.deepcopy(linear).to(dtype), copy.deepcopy(bn).to(dtype)
    fused = LinearBN1d.from_modules(low_linear, low_bn)
    x = x64.to(dtype)
    out, pair_out = fused(x), low_bn(low_linear(x))
    assert out.dtype == dtype
    assert_as_accurate_as_pair(out, pair_out, ref, dtype, "output")
    assert_as_accurate_as_pair(fused.running_var, low_bn.running_var, bn.running_var, dtype, "running_var")


def test_gradcheck_and_gradgradcheck(device):
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(6, 4, **kw)
    args = (x, torch.randn(3, 4, **kw), torch.randn(3, **kw), torch.rand(3, **kw), torch.randn(3, **kw))
    for memory_efficient in (True, False):
        def fn(*a):
            return OPS.linear_bn_train(*a, 1e-5, memory_efficient)[0]
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)
    assert torch.autograd.gradcheck(lambda *a: OPS.linear_bn_train(*a, None, None, 1e-5)[0], args[:3])


def _linear_tensors(dtype, device):
    return (
        torch.randn(5, 4, dtype=dtype, device=device, requires_grad=True),
        torch.randn(6, 4, dtype=dtype, device=device, requires_grad=True),
        torch.randn(6, dtype=dtype, device=device, requires_grad=True),
        (torch.rand(6, dtype=dtype, device=device) + 0.5).requires_grad_(),
        torch.randn(6, dtype=dtype, device=device, requires_grad=True),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_opcheck_linear_bn_train(dtype, memory_efficient, device):
    opcheck(OPS.linear_bn_train.default, _linear_tensors(dtype, device) + (1e-5, memory_efficient))


@pytest.mark.parametrize("mask", [[True] * 5, [True, False, False, True, False], [False, True, True, False, True]])
def test_opcheck_linear_bn_train_backward(mask, device):
    x, w, b, g, beta = _linear_tensors(torch.float32, device)
    out, mean, invstd, kept = OPS.linear_bn_train(x, w, b, g, beta, 1e-5, False)
    grad = torch.randn_like(out).requires_grad_()
    for linear_output in (None, kept.detach()):
        opcheck(OPS.linear_bn_train_backward.default,
                (grad, x, w, b, g, linear_output, mean, invstd, 1e-5, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_linear_bn_eval(dtype, device):
    stats = dict(dtype=torch.float32, device=device)
    opcheck(OPS.linear_bn_eval.default, _linear_tensors(dtype, device) + (
        torch.randn(6, **stats), torch.rand(6, **stats) + 0.5, 1e-5))


def test_memory_efficient_mode_keeps_no_linear_output(device):
    linear, bn = make_pair(256, 128, True, device=device)
    x = torch.randn(512, 256, dtype=torch.float64, device=device, requires_grad=True)
    fused = LinearBN1d.from_modules(linear, bn, memory_efficient=True)
    out, kept = saved_tensors(lambda: fused(x))
    allowed = {t.untyped_storage().data_ptr() for t in [x, *fused.parameters()]}
    for t in kept:  # only the input, the parameters and per-channel statistics
        assert t.untyped_storage().data_ptr() in allowed or t.numel() == 128, t.shape
    _, pair_kept = saved_tensors(lambda: bn(linear(x)))
    assert nbytes(pair_kept) - nbytes(kept) >= out.numel() * out.element_size()

    keep_output = LinearBN1d.from_modules(linear, bn, memory_efficient=False)
    _, kept = saved_tensors(lambda: keep_output(x))
    assert any(t.shape == out.shape for t in kept)


@pytest.mark.parametrize("bad,message", [
    (dict(input=torch.randn(2, 3, 4)), r"expected `input` of shape \(N, in_features\).*3-D"),
    (dict(input=torch.randn(4)), r"add the batch dimension"),
    (dict(input=torch.randn(8, 5)), r"feature mismatch: `input` has 5 features.*expects 4"),
    (dict(weight=torch.randn(6, 4).double()), r"`weight` has dtype Double but `input` has dtype Float"),
    (dict(bn_weight=torch.randn(5)), r"`bn_weight`.*one value per output channel \(6 values"),
    (dict(bias=torch.randn(6, 1)), r"`bias`.*1-D tensor with 6 values"),
    (dict(input=torch.randn(1, 4)), r"Expected more than 1 value per channel when training"),
])
def test_clear_errors_and_statistics_untouched(bad, message):
    args = dict(input=torch.randn(8, 4), weight=torch.randn(6, 4), bias=None,
                bn_weight=torch.rand(6) + 0.5, bn_bias=torch.randn(6))
    args.update(bad)
    running_mean, running_var, nbt = torch.zeros(6), torch.ones(6), torch.tensor(2)
    with pytest.raises(error_type(message), match=message):
        convbn.functional.linear_bn(**args, running_mean=running_mean, running_var=running_var,
                                    num_batches_tracked=nbt)
    assert running_mean.eq(0).all() and running_var.eq(1).all() and nbt.item() == 2


def test_module_errors_and_round_trip():
    with pytest.raises(ValueError, match="2-D input"):
        LinearBN1d(4, 3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="output features but the batch norm has num_features=5"):
        LinearBN1d.from_modules(nn.Linear(4, 3), nn.BatchNorm1d(5))
    with pytest.raises(TypeError, match="nn.BatchNorm1d"):
        LinearBN1d.from_modules(nn.Linear(4, 3), nn.BatchNorm2d(3))

    linear, bn = make_pair(5, 3, True, momentum=None)
    linear.weight.requires_grad_(False)
    bn.eval()
    fused = LinearBN1d.from_modules(linear, bn)
    back_linear, back_bn = fused.to_modules()
    assert not fused.training and not back_bn.training
    assert not back_linear.weight.requires_grad
    assert back_bn.momentum is None and back_bn.eps == bn.eps
    for a, b in zip(list(linear.state_dict().values()) + list(bn.state_dict().values()),
                    list(back_linear.state_dict().values()) + list(back_bn.state_dict().values())):
        assert torch.equal(a, b)
    assert list(fused.state_dict()) == ["weight", "bias", "bn_weight", "bn_bias", "running_mean",
                                        "running_var", "num_batches_tracked"]


def test_default_init_matches_the_pair():
    torch.manual_seed(1)
    fused = LinearBN1d(10, 4, bias=True)
    torch.manual_seed(1)
    linear, bn = nn.Linear(10, 4), nn.BatchNorm1d(4)
    assert torch.equal(fused.weight, linear.weight) and torch.equal(fused.bias, linear.bias)
    assert torch.equal(fused.bn_weight, bn.weight) and torch.equal(fused.bn_bias, bn.bias)


def test_autocast_bfloat16_keeps_float32_statistics():
    linear, bn = make_pair(16, 8, True)
    linear, bn = linear.float(), bn.float()
    fused = LinearBN1d.from_modules(linear, bn)
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
        ref = bn(linear(x))
    assert out.dtype == torch.bfloat16
    assert fused.running_mean.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref.float(), atol=0.05, rtol=0.05)
    torch.testing.assert_close(fused.running_mean, bn.running_mean, atol=0.02, rtol=0.02)
    out.float().sum().backward()
    assert fused.weight.grad.dtype == torch.float32 and fused.bn_weight.grad.dtype == torch.float32
    fused.eval()
    bn.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fused(x).float(), bn(linear(x)).float(), atol=0.05, rtol=0.05)


@pytest.mark.filterwarnings(r"ignore::DeprecationWarning:torch\.jit")
def test_scripted_module_matches_eager():
    linear, bn = make_pair(6, 4, True)
    eager = LinearBN1d.from_modules(linear, bn)
    scripted = torch.jit.script(copy.deepcopy(eager))
    for _ in range(2):
        x = torch.randn(8, 6, dtype=torch.float64)
        torch.testing.assert_close(scripted(x), eager(x), atol=0, rtol=0)
    torch.testing.assert_close(scripted.running_var, eager.running_var, atol=0, rtol=0)
    scripted.eval()
    eager.eval()
    back_linear, back_bn = eager.to_modules()
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(scripted(x), back_bn(back_linear(x)), atol=TOLERANCE[torch.float64], rtol=0)
