"""gradcheck/gradgradcheck in float64 for every differentiable input of every
op, in both memory modes; the backward op's output mask."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

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
