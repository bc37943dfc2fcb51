"""The training backward ops, called directly: every tensor the kernels read
(grad_output, the kept conv/linear output, save_mean, save_invstd) is checked
for device, dtype and shape before anything runs, with an error naming it;
and strided saved statistics give the gradients of nn's pair.

A CPU tensor beside CUDA ones would hand a host pointer to a CUDA kernel
(an illegal address that ends the CUDA context). Without a GPU, a meta
tensor stands in for the other device, and `redispatch` sends the call to
the CPU kernel, which runs the same device-generic driver as CUDA's (normal
dispatch would pick the meta/fake kernel for a call with a meta tensor)."""

import pytest
import torch
from torch import nn

from conftest import assert_close_to_reference, requires_cuda

OPS = torch.ops.convbn
STRIDE, PADDING, DILATION, GROUPS, EPS = [1, 1], [1, 1], [1, 1], 1, 1e-5
ALL = [True] * 5


def _conv_case(device="cpu", dtype=torch.float64, bias=True, memory_efficient=False):
    x = torch.randn(3, 4, 6, 5, device=device, dtype=dtype) * 2 + 1
    w = torch.randn(6, 4, 3, 3, device=device, dtype=dtype)
    b = torch.randn(6, device=device, dtype=dtype) if bias else None
    gamma = torch.rand(6, device=device, dtype=dtype) + 0.5
    beta = torch.randn(6, device=device, dtype=dtype)
    out, mean, invstd, kept = OPS.conv_bn_train(
        x, w, b, gamma, beta, STRIDE, PADDING, DILATION, GROUPS, EPS, memory_efficient)
    return dict(grad_output=torch.randn_like(out), input=x, weight=w, bias=b, bn_weight=gamma,
                bn_bias=beta, kept_output=kept, save_mean=mean, save_invstd=invstd)


def _linear_case(device="cpu", dtype=torch.float64, bias=True, memory_efficient=False):
    x = torch.randn(7, 5, device=device, dtype=dtype) * 2 + 1
    w = torch.randn(4, 5, device=device, dtype=dtype)
    b = torch.randn(4, device=device, dtype=dtype) if bias else None
    gamma = torch.rand(4, device=device, dtype=dtype) + 0.5
    beta = torch.randn(4, device=device, dtype=dtype)
    out, mean, invstd, kept = OPS.linear_bn_train(x, w, b, gamma, beta, EPS, memory_efficient)
    return dict(grad_output=torch.randn_like(out), input=x, weight=w, bias=b, bn_weight=gamma,
                bn_bias=beta, kept_output=kept, save_mean=mean, save_invstd=invstd)


# Each backward op: (case maker, name of its kept output, call(op_or_redispatch, case)).
# The synchronized ops get a one-rank group; the checks run before any exchange.
def _conv_args(c):
    return (c["grad_output"], c["input"], c["weight"], c["bias"], c["bn_weight"], c["kept_output"],
            c["save_mean"], c["save_invstd"], STRIDE, PADDING, DILATION, GROUPS, EPS)


def _linear_args(c):
    return (c["grad_output"], c["input"], c["weight"], c["bias"], c["bn_weight"], c["kept_output"],
            c["save_mean"], c["save_invstd"], EPS)


def _count(c):
    return torch.tensor(c["grad_output"].numel() // c["grad_output"].shape[1])


BACKWARD_OPS = {
    "conv_bn_train_backward": (
        _conv_case, "conv_output", lambda c: (*_conv_args(c), ALL)),
    "sync_conv_bn_train_backward": (
        _conv_case, "conv_output", lambda c: (*_conv_args(c), "no-group", 1, _count(c), ALL)),
    "linear_bn_train_backward": (
        _linear_case, "linear_output", lambda c: (*_linear_args(c), ALL)),
    "sync_linear_bn_train_backward": (
        _linear_case, "linear_output", lambda c: (*_linear_args(c), "no-group", 1, _count(c), ALL)),
}
CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _call_cpu_kernel(name, args):
    return getattr(OPS, name).default.redispatch(CPU_KEYS, *args)


@pytest.mark.parametrize("name", BACKWARD_OPS)
@pytest.mark.parametrize("argument", ["grad_output", "kept_output", "save_mean", "save_invstd"])
def test_argument_on_another_device_is_named(name, argument):
    make_case, kept_name, args_of = BACKWARD_OPS[name]
    case = make_case()
    case[argument] = case[argument].to("meta")
    shown = kept_name if argument == "kept_output" else argument
    message = rf"`{shown}` is on meta but (`input`|the data) is on cpu"
    with pytest.raises(RuntimeError, match=message):
        _call_cpu_kernel(name, args_of(case))
    # The fake kernel (torch.compile, export) says the same.
    with pytest.raises(RuntimeError, match=message):
        getattr(OPS, name)(*args_of(case))


@pytest.mark.parametrize("name", BACKWARD_OPS)
@pytest.mark.parametrize("argument", ["grad_output", "kept_output"])
def test_output_sized_argument_with_wrong_dtype_or_shape_is_named(name, argument):
    make_case, kept_name, args_of = BACKWARD_OPS[name]
    shown = kept_name if argument == "kept_output" else argument
    case = make_case()
    case[argument] = case[argument].float()
    with pytest.raises(RuntimeError, match=rf"`{shown}` has dtype Float but `input` has dtype Double"):
        _call_cpu_kernel(name, args_of(case))
    case = make_case()
    case[argument] = case[argument][:-1]
    with pytest.raises(RuntimeError, match=rf"`{shown}` has shape .* but the output has shape"):
        _call_cpu_kernel(name, args_of(case))


@requires_cuda
@pytest.mark.parametrize("name", BACKWARD_OPS)
@pytest.mark.parametrize("argument", ["grad_output", "kept_output", "save_mean", "save_invstd"])
def test_cpu_argument_beside_cuda_input_is_named(name, argument):
    make_case, kept_name, args_of = BACKWARD_OPS[name]
    case = make_case("cuda")
    case[argument] = case[argument].cpu()
    shown = kept_name if argument == "kept_output" else argument
    with pytest.raises(RuntimeError, match=rf"`{shown}` is on cpu but (`input`|the data) is on cuda"):
        getattr(OPS, name)(*args_of(case))
    torch.cuda.synchronize()  # the CUDA context is still usable


def _strided(t):
    """t's values as a non-contiguous view (every other element of a buffer
    whose other values are junk)."""
    buffer = torch.stack([t, torch.full_like(t, 1e3)], dim=1)
    view = buffer[:, 0]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def _nn_grads(case, linear):
    """float64 gradients of nn's pair for the case's input, weights and grad_output."""
    c = {k: v.detach().double().clone() if torch.is_tensor(v) else v for k, v in case.items()}
    leaves = [c["input"], c["weight"], c["bn_weight"], c["bn_bias"]]
    for t in leaves:
        t.requires_grad_()
    if linear:
        y = nn.functional.linear(c["input"], c["weight"], c["bias"])
    else:
        y = nn.functional.conv2d(c["input"], c["weight"], c["bias"], STRIDE, PADDING, DILATION, GROUPS)
    out = nn.functional.batch_norm(y, None, None, c["bn_weight"], c["bn_bias"], training=True, eps=EPS)
    return torch.autograd.grad(out, leaves, c["grad_output"])


@pytest.mark.parametrize("name", ["conv_bn_train_backward", "linear_bn_train_backward"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strided_saved_statistics_give_the_pairs_gradients(device, name, bias, memory_efficient, dtype):
    make_case, _, args_of = BACKWARD_OPS[name]
    case = make_case(device, dtype, bias, memory_efficient)
    case["save_mean"] = _strided(case["save_mean"])
    case["save_invstd"] = _strided(case["save_invstd"])
    grads = getattr(OPS, name)(*args_of(case))
    expected = _nn_grads(case, linear=name.startswith("linear"))
    for got, ref, what in zip(
            [grads[0], grads[1], grads[3], grads[4]], expected, ["input", "weight", "bn_weight", "bn_bias"]):
        assert_close_to_reference(got, ref, dtype, what)


# grad_output dense in channels_last whose size-1 dimension has another
# stride than the canonical one: is_contiguous(channels_last) holds (so the
# driver keeps it as it is) while suggest_memory_format() says NCHW. Kernels
# that took the layout from the latter walked it as NCHW: wrong gradients.
ODD_STRIDED_GRADS = [
    ((2, 3, 5, 1), (20, 1, 4, 1)),   # W = 1, W-stride 1 instead of 4
    ((2, 3, 1, 5), (20, 1, 1, 4)),   # H = 1, H-stride 1 instead of 20
    ((1, 3, 5, 5), (1, 1, 20, 4)),   # N = 1, N-stride 1 instead of 100
]


@pytest.mark.parametrize("input_shape,grad_strides", ODD_STRIDED_GRADS)
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_channels_last_grad_output_with_odd_size_one_strides(device, input_shape, grad_strides,
                                                              memory_efficient):
    x = torch.randn(input_shape, device=device, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(4, 3, 1, 1, device=device, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    gamma = torch.rand(4, device=device, dtype=torch.float64) + 0.5
    beta = torch.randn(4, device=device, dtype=torch.float64)
    out, mean, invstd, kept = OPS.conv_bn_train(
        x, w, None, gamma, beta, [1, 1], [0, 0], [1, 1], 1, EPS, memory_efficient)
    storage = torch.randn(out.numel(), device=device, dtype=torch.float64)
    grad = storage.as_strided(out.shape, grad_strides)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    # ...with strides other than channels_last's own (the misleading case).
    assert grad.stride() != torch.empty(out.shape, memory_format=torch.channels_last).stride()
    grads = OPS.conv_bn_train_backward(
        grad, x, w, None, gamma, kept, mean, invstd, [1, 1], [0, 0], [1, 1], 1, EPS, ALL)
    leaves = [t.clone().requires_grad_() for t in (x, w, gamma, beta)]
    ref_out = nn.functional.batch_norm(
        nn.functional.conv2d(leaves[0], leaves[1]), None, None, leaves[2], leaves[3], training=True, eps=EPS)
    expected = torch.autograd.grad(ref_out, leaves, grad)
    for got, ref, what in zip([grads[0], grads[1], grads[3], grads[4]], expected,
                              ["input", "weight", "bn_weight", "bn_bias"]):
        assert_close_to_reference(got, ref, torch.float64, what)


def test_module_gradient_through_squeeze_and_transpose(device):
    """The same case as a user meets it: a channels_last layer whose output
    is squeezed and transposed before the loss."""
    from convbn import ConvBN2d
    conv = nn.Conv2d(3, 4, 1).to(device, torch.float64)
    bn = nn.BatchNorm2d(4).to(device, torch.float64)
    fused = ConvBN2d.from_modules(conv, bn)
    x = torch.randn(2, 3, 5, 1, device=device, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    target = torch.randn(2, 5, 4, device=device, dtype=torch.float64)

    def grads(layer_params, forward):
        xi = x.clone().requires_grad_()
        loss = (forward(xi).squeeze(-1).transpose(1, 2) * target).sum()
        return torch.autograd.grad(loss, [xi, *layer_params])

    got = grads([fused.weight, fused.bn_weight, fused.bn_bias], fused)
    ref = grads([conv.weight, bn.weight, bn.bias], lambda t: bn(conv(t)))
    for g, r, what in zip(got, ref, ["input", "weight", "bn_weight", "bn_bias"]):
        assert_close_to_reference(g, r, torch.float64, what)
