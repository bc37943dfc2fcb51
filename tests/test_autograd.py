"""gradcheck/gradgradcheck in float64 for every differentiable input of every
op, in both memory modes; the backward op's output mask. The eval
operators' own node (frozen batch norm): forward-mode AD, torch.func,
tensor subclasses, running statistics updated before its backward."""

import copy

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from convbn import ConvBN2d

D = dict(dtype=torch.float64)


def _nondet_tol(device):
    # cuDNN's convolution backward may sum in a different order on each call;
    # gradcheck otherwise demands bit-identical repeated backwards.
    return 1e-10 if device == "cuda" else 0.0


def _inputs(with_bias=True, affine=True, channels_last=False, device="cpu"):
    x = torch.randn(2, 4, 5, 6, **D)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tensors = {
        "input": x,
        "weight": torch.randn(6, 2, 3, 3, **D),
        "bias": torch.randn(6, **D) if with_bias else None,
        "bn_weight": torch.rand(6, **D) + 0.5 if affine else None,
        "bn_bias": torch.randn(6, **D) if affine else None,
    }
    return {k: None if t is None else t.to(device).requires_grad_() for k, t in tensors.items()}


def _train_fn(names, others, memory_efficient, stride=(1, 2)):
    def fn(*tensors):
        args = dict(others, **dict(zip(names, tensors)))
        return torch.ops.convbn.conv_bn_train(
            args["input"], args["weight"], args["bias"], args["bn_weight"], args["bn_bias"],
            list(stride), [1, 0], [1, 1], 2, 1e-5, memory_efficient,
        )[0]
    return fn


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("with_bias,affine,channels_last", [(True, True, False), (False, False, True), (True, False, False)])
def test_train_gradcheck_and_gradgradcheck(memory_efficient, with_bias, affine, channels_last, device):
    tensors = _inputs(with_bias, affine, channels_last, device)
    names = [n for n, t in tensors.items() if t is not None]
    fn = _train_fn(names, tensors, memory_efficient)
    inputs = tuple(tensors[n] for n in names)
    assert gradcheck(fn, inputs, nondet_tol=_nondet_tol(device))
    assert gradgradcheck(fn, inputs, nondet_tol=_nondet_tol(device))


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_train_grads_for_a_subset_of_inputs(memory_efficient):
    # Only weight requires grad: the output mask skips the rest.
    tensors = _inputs()
    for name in ("input", "bias", "bn_bias"):
        tensors[name] = tensors[name].detach()
    fn = _train_fn(["weight", "bn_weight"], tensors, memory_efficient)
    assert gradcheck(fn, (tensors["weight"], tensors["bn_weight"]))


def test_backward_op_honours_output_mask():
    t = _inputs()
    out, mean, invstd, conv_out = torch.ops.convbn.conv_bn_train(
        t["input"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"], [1, 1], [1, 1], [1, 1], 2, 1e-5, True)
    with torch.no_grad():
        grads = torch.ops.convbn.conv_bn_train_backward(
            torch.randn_like(out), t["input"], t["weight"], t["bias"], t["bn_weight"], None, mean, invstd,
            [1, 1], [1, 1], [1, 1], 2, 1e-5, [False, True, False, True, False])
    assert grads[0] is None and grads[2] is None and grads[4] is None
    assert grads[1].shape == t["weight"].shape and grads[3].shape == (6,)


def test_conv_bias_gradient_is_zero_in_training():
    # Batch norm absorbs any per-channel constant: d(output)/d(conv bias) = 0.
    t = _inputs()
    out = torch.ops.convbn.conv_bn_train(
        t["input"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"], [1, 1], [1, 1], [1, 1], 2, 1e-5, True)[0]
    (out * torch.randn_like(out)).sum().backward()
    assert torch.count_nonzero(t["bias"].grad) == 0


def test_eval_gradcheck_and_gradgradcheck(device):
    t = _inputs(device=device)
    running_mean, running_var = torch.randn(6, **D, device=device), torch.rand(6, **D, device=device) + 0.5

    def fn(x, w, b, g, beta):
        return torch.ops.convbn.conv_bn_eval(x, w, b, g, beta, running_mean, running_var,
                                            [2, 1], [1, 1], [1, 2], 2, 1e-3)
    inputs = (t["input"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"])
    assert gradcheck(fn, inputs, nondet_tol=_nondet_tol(device))
    assert gradgradcheck(fn, inputs, nondet_tol=_nondet_tol(device))


def test_fold_gradcheck_and_gradgradcheck():
    t = _inputs()
    running_mean, running_var = torch.randn(6, **D), torch.rand(6, **D) + 0.5

    def fn(w, b, g, beta):
        return torch.ops.convbn.fold_conv_bn(w, b, g, beta, running_mean, running_var, 1e-3)
    inputs = (t["weight"], t["bias"], t["bn_weight"], t["bn_bias"])
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


# torch's forward AD loads its decompositions with torch.jit.script: its warning, not convbn's.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_eval_forward_mode_ad_matches_the_pair():
    """Forward-mode AD (dual tensors) through the eval operators, which
    their backward node does not implement: the composite is differentiated
    as written, and the tangent matches nn's pair in float64."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    t = _inputs()
    running_mean, running_var = torch.randn(6, **D), torch.rand(6, **D) + 0.5
    x, w, b, g, beta = (t[k].detach() for k in ("input", "weight", "bias", "bn_weight", "bn_bias"))
    tangents = [torch.randn_like(v) for v in (x, w, g)]
    with fwAD.dual_level():
        xd, wd, gd = (fwAD.make_dual(v, dv) for v, dv in zip((x, w, g), tangents))
        ours = fwAD.unpack_dual(torch.ops.convbn.conv_bn_eval(
            xd, wd, b, gd, beta, running_mean, running_var, [2, 1], [1, 1], [1, 2], 2, 1e-3)).tangent
        pair = fwAD.unpack_dual(F.batch_norm(
            F.conv2d(xd, wd, b, [2, 1], [1, 1], [1, 2], 2), running_mean, running_var, gd, beta, False, 0.0,
            1e-3)).tangent
        xl, wl = torch.randn(5, 7, **D), torch.randn(4, 7, **D)
        dx, dw = torch.randn_like(xl), torch.randn_like(wl)
        mean4, var4 = torch.randn(4, **D), torch.rand(4, **D) + 0.5
        xld, wld = fwAD.make_dual(xl, dx), fwAD.make_dual(wl, dw)
        ours_linear = fwAD.unpack_dual(torch.ops.convbn.linear_bn_eval(
            xld, wld, None, None, None, mean4, var4, 1e-5)).tangent
        pair_linear = fwAD.unpack_dual(F.batch_norm(F.linear(xld, wld), mean4, var4, None, None, False, 0.0,
                                                    1e-5)).tangent
    assert ours is not None and ours_linear is not None
    torch.testing.assert_close(ours, pair, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours_linear, pair_linear, rtol=1e-9, atol=1e-10)


def test_eval_gradcheck_through_every_input():
    """The eval operators' backward node against finite differences for
    every tensor input, the running statistics included (the node chains
    the gradients through the fold itself), to second order."""
    t = _inputs()
    running_mean = torch.randn(6, **D).requires_grad_()
    running_var = (torch.rand(6, **D) + 0.5).requires_grad_()

    def conv(x, w, b, g, beta, mean, var):
        return torch.ops.convbn.conv_bn_eval(x, w, b, g, beta, mean, var, [2, 1], [1, 1], [1, 2], 2, 1e-3)
    inputs = (t["input"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"], running_mean, running_var)
    assert gradcheck(conv, inputs)
    assert gradgradcheck(conv, inputs)

    x, w = torch.randn(5, 7, **D, requires_grad=True), torch.randn(4, 7, **D, requires_grad=True)
    b, g, beta, mean = (torch.randn(4, **D, requires_grad=True) for _ in range(4))
    var = (torch.rand(4, **D) + 0.5).requires_grad_()

    def linear(x, w, b, g, beta, mean, var):
        return torch.ops.convbn.linear_bn_eval(x, w, b, g, beta, mean, var, 1e-5)
    assert gradcheck(linear, (x, w, b, g, beta, mean, var))
    assert gradgradcheck(linear, (x, w, b, g, beta, mean, var))
    # Without the optional tensors (no conv bias, no affine).
    assert gradcheck(lambda x, w, mean, var: linear(x, w, None, None, None, mean, var), (x, w, mean, var))


class AtenOnlyTensor(torch.Tensor):
    """A wrapper subclass that, like a quantized or NF4 weight type, handles
    ATen operators only (__torch_dispatch__ sees what runs below autograd)."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device,
                                                   requires_grad=inner.requires_grad)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func.namespace != "aten":
            raise NotImplementedError(f"AtenOnlyTensor: {func} is not an ATen operator")
        unwrap = lambda t: t.inner if isinstance(t, AtenOnlyTensor) else t  # noqa: E731
        out = func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))
        return torch.utils._pytree.tree_map(lambda t: AtenOnlyTensor(t) if isinstance(t, torch.Tensor) else t, out)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_eval_ops_reach_tensor_subclasses_as_aten_ops(requires_grad):
    t = _inputs()
    mean, var = torch.randn(6, **D), torch.rand(6, **D) + 0.5
    weight = AtenOnlyTensor(t["weight"].detach()).requires_grad_(requires_grad)
    out = torch.ops.convbn.conv_bn_eval(t["input"].detach(), weight, None, t["bn_weight"].detach(), None, mean,
                                        var, [1, 1], [1, 1], [1, 1], 2, 1e-5)
    expected = torch.ops.convbn.conv_bn_eval(t["input"].detach(), t["weight"].detach(), None,
                                             t["bn_weight"].detach(), None, mean, var, [1, 1], [1, 1], [1, 1], 2, 1e-5)
    torch.testing.assert_close(out.inner, expected)
    linear = torch.ops.convbn.linear_bn_eval(torch.randn(3, 5, **D), AtenOnlyTensor(torch.randn(4, 5, **D)), None,
                                             None, None, torch.zeros(4, **D), torch.ones(4, **D), 1e-5)
    assert isinstance(linear, AtenOnlyTensor)


def test_torch_func_differentiates_the_eval_ops():
    """torch.func's transforms cannot go through a C++ autograd Function:
    the eval operators differentiate their composite under them."""
    t = _inputs()
    x, w, g = (t[k].detach() for k in ("input", "weight", "bn_weight"))
    mean, var = torch.randn(6, **D), torch.rand(6, **D) + 0.5

    def loss(w):
        return torch.ops.convbn.conv_bn_eval(x, w, None, g, None, mean, var, [1, 1], [1, 1], [1, 1], 2, 1e-5).square().sum()
    w_leaf = w.clone().requires_grad_()
    expected, = torch.autograd.grad(loss(w_leaf), w_leaf)
    torch.testing.assert_close(torch.func.grad(loss)(w), expected)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(w.unsqueeze(0).expand(2, -1, -1, -1, -1))[1],
                               expected)


def test_eval_backward_survives_a_later_running_statistics_update():
    """An eval forward, then a training forward of the same layer (which
    updates the running statistics in place), then the eval forward's
    backward: the gradients are those of the statistics the eval forward
    used (the node keeps what it needs of them, not the buffers)."""
    torch.manual_seed(0)
    layer = ConvBN2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 6, 6, **D, requires_grad=True)
    reference = copy.deepcopy(layer).eval()
    expected = torch.autograd.grad(reference(x).square().sum(), [x, *reference.parameters()])
    out = layer.eval()(x)
    layer.train()(torch.randn(4, 3, 6, 6, **D))  # updates running_mean/var in place
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours, theirs)
    with torch.inference_mode():  # running statistics made in inference mode
        frozen = ConvBN2d(3, 4, 3, padding=1).double().eval()
    for name, p in list(frozen.named_parameters()):  # the parameters train
        setattr(frozen, name, torch.nn.Parameter(p.clone()))
    assert frozen.running_var.is_inference()
    frozen(x).sum().backward()
    assert frozen.weight.grad is not None
