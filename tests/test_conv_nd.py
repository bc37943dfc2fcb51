"""The 1-D, 3-D and transposed members of the operator family
(ConvBN1d/3d, ConvTransposeBN1d/2d/3d, the operators with transposed=True and
1 or 3 spatial values), each against the nn pair it stands for
(nn.Conv1d/3d or nn.ConvTranspose1d/2d/3d followed by nn.BatchNorm1d/2d/3d)
in float64: an all-pairs grid of every option per module kind, gradcheck and
gradgradcheck of the operators, opcheck, what is kept for backward, the
argument errors, convbn.fuse / unfuse, checkpoints and recalibrate."""

import copy
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

import convbn
from conftest import assert_close_to_reference, nbytes, randomize_batch_norms, saved_tensors
from convbn import (
    ConvBN1d, ConvBN2d, ConvBN3d, ConvTransposeBN1d, ConvTransposeBN2d, ConvTransposeBN3d,
)
from convbn.modules import _ConvBNNd
from convbn.utils import saved_tensor_bytes

pytestmark = pytest.mark.filterwarnings(
    "ignore:Using padding='same' with even kernel lengths:UserWarning")  # nn.Conv1d's own, on the reference

F64 = torch.float64
D = dict(dtype=F64)
OPS = torch.ops.convbn

# Tighter than conftest's float64 tolerance: the fused and the pair's results
# differ only by summation order.
TIGHT = 1e-10


def close(actual, expected, name=""):
    """actual against the float64 reference expected, to TIGHT of the
    reference's scale."""
    expected = expected.double()
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=TIGHT, atol=TIGHT * scale,
                               msg=lambda m: f"{name}: {m}")


@pytest.fixture(autouse=True)
def _one_thread():
    """These shapes are tiny: intra-op threads only add synchronization
    (and on a busy 2-core machine, spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the parity grid -----------------------------------------------------------

# kind: (fused class, nn conv, nn batch norm, spatial dims, transposed)
KINDS = {
    "ConvBN1d": (ConvBN1d, nn.Conv1d, nn.BatchNorm1d, 1, False),
    "ConvBN3d": (ConvBN3d, nn.Conv3d, nn.BatchNorm3d, 3, False),
    "ConvTransposeBN1d": (ConvTransposeBN1d, nn.ConvTranspose1d, nn.BatchNorm1d, 1, True),
    "ConvTransposeBN2d": (ConvTransposeBN2d, nn.ConvTranspose2d, nn.BatchNorm2d, 2, True),
    "ConvTransposeBN3d": (ConvTransposeBN3d, nn.ConvTranspose3d, nn.BatchNorm3d, 3, True),
}

# Input shapes (N, C, spatial...): small, distinct sizes per dimension so a
# swapped dimension shows.
INPUT_SHAPES = {
    (1, False): (3, 4, 11),
    (3, False): (2, 4, 6, 5, 7),
    (1, True): (3, 4, 6),
    (2, True): (3, 4, 4, 5),
    (3, True): (2, 4, 3, 4, 3),
}

# (in_channels, out_channels, groups)
CHANNELS = {"1": (4, 6, 1), "2": (4, 6, 2), "depthwise": (4, 4, 4), "depthwise_x2": (4, 8, 4)}

COMMON = {
    "kernel": [1, 2, 3],
    "stride": [1, 2, "mixed"],
    "dilation": [1, 2],
    "groups": list(CHANNELS),
    "bias": [False, True],
    "affine": [True, False],
    "track": [True, False],
    "momentum": [0.1, None],
    "memory_efficient": [True, False],
}


def dimensions(kind):
    _, _, _, n, transposed = KINDS[kind]
    dims = dict(COMMON)
    if transposed:
        dims["padding"] = [0, 1, "mixed"]
        dims["output_padding"] = [0, "max"]
    else:
        dims["padding"] = [0, 1, "mixed", "same", "valid"]
        dims["padding_mode"] = ["zeros", "reflect", "replicate", "circular"]
    if n == 3:
        dims["channels_last"] = [False, True]
    return dims


def valid(kind, case):
    if case.get("padding") == "same" and case.get("stride", 1) != 1:
        return False  # not defined for strided convolutions (as nn.ConvNd)
    if case.get("output_padding") == "max" and case.get("stride", 1) == 1 and case.get("dilation", 1) == 1:
        return False  # output_padding must be smaller than the stride or the dilation
    return True


def all_pairs(kind, seed, candidates=40):
    """A seeded greedy set of valid cases in which every valid pair of
    values of any two options appears at least once."""
    dims = dimensions(kind)
    names = list(dims)
    rng = random.Random(seed)

    def pairs(case):
        return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(names, 2)}

    uncovered = {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(names, 2) for va in dims[a] for vb in dims[b]
        if valid(kind, {a: va, b: vb})
    }
    cases = []
    while uncovered:
        best, best_gain = None, 0
        for _ in range(candidates):
            case = {name: rng.choice(dims[name]) for name in names}
            (a, va), (b, vb) = rng.choice(sorted(uncovered, key=repr))
            case[a], case[b] = va, vb
            if not valid(kind, case):
                continue
            gain = len(pairs(case) & uncovered)
            if gain > best_gain:
                best, best_gain = case, gain
        if best is not None:
            cases.append(best)
            uncovered -= pairs(best)
    return cases


def explicit_cases(kind):
    """'same' with odd and even kernels (an odd total padding puts the extra
    row at the end), with every padding mode, and the largest output_padding."""
    _, _, _, n, transposed = KINDS[kind]
    base = dict(kernel=3, stride=1, dilation=1, groups="1", bias=True, affine=True, track=True, momentum=0.1,
                memory_efficient=True)
    if n == 3:
        base["channels_last"] = False
    cases = []
    if transposed:
        base.update(padding=1, output_padding=0)
        cases.append(dict(base, stride="mixed", dilation=2, output_padding="max", memory_efficient=False))
        cases.append(dict(base, kernel=2, stride=2, output_padding="max", groups="2", momentum=None))
    else:
        modes = ["zeros", "reflect", "replicate", "circular"]
        for i, (kernel, dilation) in enumerate(((2, 1), (2, 2), (3, 2), (4, 1))):
            for mode in (modes[i], modes[3 - i]):
                cases.append(dict(base, kernel=kernel, dilation=dilation, padding="same", padding_mode=mode,
                                  memory_efficient=mode in ("zeros", "replicate")))
        if n == 3:
            cases.append(dict(base, kernel=2, padding="same", padding_mode="reflect", channels_last=True))
    return cases


CASES = [(kind, case) for kind in KINDS
         for case in all_pairs(kind, seed=2024) + explicit_cases(kind)]


def case_id(item):
    kind, case = item
    return kind + "-" + "-".join(f"{k}={v}" for k, v in case.items())


def conv_arguments(kind, case):
    """(in, out, positional/keyword arguments of the nn conv) for case."""
    _, _, _, n, transposed = KINDS[kind]
    in_ch, out_ch, groups = CHANNELS[case["groups"]]
    stride = {1: 1, 2: 2, "mixed": {1: (3,), 2: (2, 1), 3: (1, 2, 3)}[n]}[case["stride"]]
    stride_t = stride if isinstance(stride, tuple) else (stride,) * n
    dilation_t = (case["dilation"],) * n
    padding = case["padding"]
    if padding == "mixed":
        padding = {1: (2,), 2: (1, 0), 3: (0, 1, 2)}[n] if not transposed else {1: (1,), 2: (1, 0), 3: (1, 0, 1)}[n]
    kwargs = dict(kernel_size=case["kernel"], stride=stride, padding=padding, dilation=case["dilation"],
                  groups=groups, bias=case["bias"])
    if transposed:
        if case["output_padding"] == "max":
            kwargs["output_padding"] = tuple(max(s, d) - 1 for s, d in zip(stride_t, dilation_t))
        else:
            kwargs["output_padding"] = 0
    else:
        kwargs["padding_mode"] = case["padding_mode"]
    return in_ch, out_ch, kwargs


def make_pair(kind, case):
    _, conv_type, bn_type, _, _ = KINDS[kind]
    in_ch, out_ch, kwargs = conv_arguments(kind, case)
    conv = conv_type(in_ch, out_ch, **kwargs, dtype=F64)
    bn = bn_type(out_ch, momentum=case["momentum"], affine=case["affine"], track_running_stats=case["track"],
                 dtype=F64)
    with torch.no_grad():
        if case["affine"]:
            bn.weight.copy_(torch.rand(out_ch) + 0.5)
            bn.bias.copy_(torch.randn(out_ch))
        if case["track"]:
            bn.running_mean.copy_(torch.randn(out_ch) * 0.1)
            bn.running_var.copy_(torch.rand(out_ch) + 0.5)
    return conv, bn


def param_pairs(case, conv, bn, fused):
    pairs = [("weight", conv.weight, fused.weight)]
    if case["bias"]:
        pairs.append(("bias", conv.bias, fused.bias))
    if case["affine"]:
        pairs += [("bn_weight", bn.weight, fused.bn_weight), ("bn_bias", bn.bias, fused.bn_bias)]
    return pairs


def test_grids_cover_every_pair_of_options():
    for kind in KINDS:
        dims = dimensions(kind)
        cases = [c for k, c in CASES if k == kind]
        assert all(valid(kind, c) for c in cases)
        for a, b in itertools.combinations(list(dims), 2):
            for va in dims[a]:
                for vb in dims[b]:
                    if valid(kind, {a: va, b: vb}):
                        assert any(c[a] == va and c[b] == vb for c in cases), (kind, a, va, b, vb)


@pytest.mark.parametrize("item", CASES, ids=[case_id(c) for c in CASES])
def test_matches_the_nn_pair(item):
    kind, case = item
    cls, _, _, n, transposed = KINDS[kind]
    conv, bn = make_pair(kind, case)
    fused = cls.from_modules(conv, bn, memory_efficient=case["memory_efficient"])
    assert type(fused) is cls and fused.memory_efficient == case["memory_efficient"]
    channels_last = case.get("channels_last", False)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    shape = INPUT_SHAPES[(n, transposed)]

    for step in range(3):
        x = torch.randn(*shape, **D) * 2 + step
        x_ref = x.clone().requires_grad_()
        x_fused = x.contiguous(memory_format=memory_format).requires_grad_()
        out_ref = bn(conv(x_ref))
        out = fused(x_fused)
        assert out.shape == out_ref.shape and out.dtype == F64
        if channels_last and case.get("padding_mode") != "circular":
            # (F.pad's circular mode returns a contiguous tensor: the conv then sees that layout.)
            assert out.is_contiguous(memory_format=torch.channels_last_3d)
        grad = torch.randn_like(out_ref)
        out_ref.backward(grad)
        out.backward(grad.contiguous(memory_format=memory_format))
        close(out, out_ref, f"output, step {step}")
        close(x_fused.grad, x_ref.grad, f"grad input, step {step}")
        for name, ref_p, fused_p in param_pairs(case, conv, bn, fused):
            close(fused_p.grad, ref_p.grad, f"grad {name}, step {step}")
            ref_p.grad = fused_p.grad = None
        if case["track"]:
            close(fused.running_mean, bn.running_mean, f"running_mean, step {step}")
            close(fused.running_var, bn.running_var, f"running_var, step {step}")
            assert fused.num_batches_tracked.item() == bn.num_batches_tracked.item() == step + 1
        else:
            assert fused.running_mean is None and fused.running_var is None and fused.num_batches_tracked is None

    # Eval (the running statistics folded in, or batch statistics without
    # them), with gradients: frozen batch norm.
    conv.eval(), bn.eval(), fused.eval()
    statistics = [None if t is None else t.clone() for t in (fused.running_mean, fused.running_var)]
    x = torch.randn(*shape, **D)
    x_ref = x.clone().requires_grad_()
    x_fused = x.contiguous(memory_format=memory_format).requires_grad_()
    out_ref, out = bn(conv(x_ref)), fused(x_fused)
    close(out, out_ref, "eval output")
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out.backward(grad)
    close(x_fused.grad, x_ref.grad, "eval grad input")
    for name, ref_p, fused_p in param_pairs(case, conv, bn, fused):
        close(fused_p.grad, ref_p.grad, f"eval grad {name}")
    with torch.no_grad():
        close(fused(x.contiguous(memory_format=memory_format)), out_ref, "eval output, no_grad")
    if case["track"]:  # eval leaves the statistics alone
        assert torch.equal(fused.running_mean, statistics[0]) and torch.equal(fused.running_var, statistics[1])
        assert fused.num_batches_tracked.item() == 3

    # to_modules gives the pair back, hyper-parameters included.
    conv2, bn2 = fused.to_modules()
    assert repr(conv2) == repr(conv) and repr(bn2) == repr(bn)
    with torch.no_grad():
        close(bn2(conv2(x)), out_ref, "to_modules output")


@pytest.mark.parametrize("kind", list(KINDS))
def test_constructor_takes_the_pairs_arguments_in_their_order(kind):
    cls, conv_type, bn_type, n, transposed = KINDS[kind]
    if transposed:
        # nn.ConvTransposeNd's order: stride, padding, output_padding, groups, bias, dilation.
        args = (4, 6, 3, 2, 1, 1, 2, True, 1, "zeros")
    else:
        # nn.ConvNd's order: stride, padding, dilation, groups, bias, padding_mode.
        args = (4, 6, 3, 2, 1, 2, 2, True, "replicate")
    fused = cls(*args, 1e-3, 0.3, True, True, False, dtype=F64)
    conv = conv_type(*args, dtype=F64)
    bn = bn_type(6, 1e-3, 0.3, dtype=F64)
    conv_back, bn_back = fused.to_modules()
    assert repr(conv_back) == repr(conv) and repr(bn_back) == repr(bn)
    assert fused.weight.shape == conv.weight.shape and not fused.memory_efficient
    assert list(fused.state_dict()) == ["weight", "bias", "bn_weight", "bn_bias", "running_mean", "running_var",
                                        "num_batches_tracked"]
    assert fused.transposed == transposed
    # The same initialization as the pair.
    torch.manual_seed(3)
    a = cls(*args, dtype=F64)
    torch.manual_seed(3)
    b = conv_type(*args, dtype=F64)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert torch.equal(a.bn_weight, torch.ones(6, **D)) and torch.equal(a.bn_bias, torch.zeros(6, **D))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_functional_conv_bn_infers_the_rank_from_the_weight(n, transposed):
    x = torch.randn(3, 4, *[5, 4, 6][:n], **D)
    w = torch.randn(*((4, 3) if transposed else (6, 2)), *[3, 2, 3][:n], **D)
    groups = 2
    stride, padding = [2, 1, 2][:n], [1, 0, 1][:n]
    mean, var = torch.randn(6, **D), torch.rand(6, **D) + 0.5
    g, b = torch.rand(6, **D) + 0.5, torch.randn(6, **D)
    if transposed:
        out_padding = [1, 0, 1][:n]
        conv = torch.convolution(x, w, None, stride, padding, [1] * n, True, out_padding, groups)
        kwargs = dict(transposed=True, output_padding=tuple(out_padding))
    else:
        conv = torch.convolution(x, w, None, stride, padding, [1] * n, False, [0] * n, groups)
        kwargs = {}
    for training in (True, False):
        m, v = mean.clone(), var.clone()
        got = convbn.functional.conv_bn(x, w, None, g, b, m, v, None, training, 0.1, 1e-5, tuple(stride),
                                        tuple(padding), 1, groups, True, **kwargs)
        m_ref, v_ref = mean.clone(), var.clone()
        want = F.batch_norm(conv, m_ref, v_ref, g, b, training, 0.1, 1e-5)
        close(got, want, f"training={training}")
        close(m, m_ref, "running_mean")
        close(v, v_ref, "running_var")


# --- gradcheck and gradgradcheck -------------------------------------------------

# name: (input shape, weight shape, stride, padding, dilation, groups, transposed, output_padding)
OP_CONFIGS = {
    "1d": ((3, 4, 7), (6, 2, 3), [2], [1], [1], 2, False, []),
    "3d": ((2, 2, 3, 4, 3), (4, 1, 2, 2, 2), [1, 2, 1], [1, 0, 1], [1, 1, 2], 2, False, []),
    "transposed_1d": ((3, 2, 4), (2, 3, 3), [2], [1], [1], 1, True, [1]),
    "transposed_2d": ((2, 4, 3, 3), (4, 3, 3, 2), [2, 1], [1, 0], [1, 2], 2, True, [1, 1]),
    "transposed_3d": ((2, 2, 2, 2, 2), (2, 2, 2, 2, 2), [2, 1, 2], [0, 0, 1], [1, 1, 1], 1, True, [1, 0, 0]),
}


def op_tensors(config, with_bias=True, affine=True, channels_last=False, dtype=F64):
    x_shape, w_shape, _, _, _, groups, transposed, _ = OP_CONFIGS[config]
    out_ch = w_shape[1] * groups if transposed else w_shape[0]
    x = torch.randn(*x_shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return [
        x.requires_grad_(),
        torch.randn(*w_shape, dtype=dtype).requires_grad_(),
        torch.randn(out_ch, dtype=dtype).requires_grad_() if with_bias else None,
        (torch.rand(out_ch, dtype=dtype) + 0.5).requires_grad_() if affine else None,
        torch.randn(out_ch, dtype=dtype).requires_grad_() if affine else None,
    ]


def hyper(config):
    _, _, stride, padding, dilation, groups, _, _ = OP_CONFIGS[config]
    return stride, padding, dilation, groups


def transposed_args(config):
    _, _, _, _, _, _, transposed, output_padding = OP_CONFIGS[config]
    return transposed, output_padding


def reference_conv(config, x, w, b):
    stride, padding, dilation, groups = hyper(config)
    transposed, output_padding = transposed_args(config)
    n = x.dim() - 2
    return torch.convolution(x, w, b, stride, padding, dilation, transposed, output_padding or [0] * n, groups)


@pytest.mark.parametrize("config", list(OP_CONFIGS))
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_train_op_matches_the_pair_and_passes_gradcheck(config, memory_efficient):
    tensors = op_tensors(config, channels_last=config == "3d" and not memory_efficient)
    transposed, output_padding = transposed_args(config)

    def fn(*ts):
        out, mean, invstd, conv_out = OPS.conv_bn_train(*ts, *hyper(config), 1e-3, memory_efficient, transposed,
                                                        output_padding)
        return out

    x, w, b, g, beta = tensors
    out, mean, invstd, conv_out = OPS.conv_bn_train(*tensors, *hyper(config), 1e-3, memory_efficient, transposed,
                                                    output_padding)
    conv = reference_conv(config, x, w, b)
    dims = [0, *range(2, conv.dim())]
    close(out, F.batch_norm(conv, None, None, g, beta, True, 0.0, 1e-3), "output")
    close(mean, conv.mean(dims), "save_mean")
    close(invstd, (conv.var(dims, unbiased=False) + 1e-3).rsqrt(), "save_invstd")
    if not memory_efficient:  # the conv output before the bias (documented in csrc/convbn.h)
        close(conv_out, reference_conv(config, x, w, None), "conv_output")
    else:
        assert conv_out.numel() == 0
    assert gradcheck(fn, tuple(tensors))
    assert gradgradcheck(fn, tuple(tensors))


@pytest.mark.parametrize("config", ["1d", "3d", "transposed_2d"])
def test_train_op_without_bias_or_affine(config):
    tensors = [t for t in op_tensors(config, with_bias=False, affine=False) if t is not None]
    transposed, output_padding = transposed_args(config)

    def fn(x, w):
        return OPS.conv_bn_train(x, w, None, None, None, *hyper(config), 1e-5, True, transposed, output_padding)[0]
    assert gradcheck(fn, tuple(tensors))
    assert gradgradcheck(fn, tuple(tensors))


@pytest.mark.parametrize("config", ["1d", "3d", "transposed_1d", "transposed_2d", "transposed_3d"])
@pytest.mark.parametrize("mask", [[True] * 5, [False, True, False, True, False], [True, False, True, False, True]])
def test_backward_op_output_mask(config, mask):
    """conv_bn_train_backward against autograd through the nn pair; the
    output mask leaves out exactly the gradients it says."""
    x, w, b, g, beta = op_tensors(config)
    transposed, output_padding = transposed_args(config)
    out, mean, invstd, conv_out = OPS.conv_bn_train(x, w, b, g, beta, *hyper(config), 1e-5, False, transposed,
                                                    output_padding)
    grad = torch.randn_like(out)
    ref = F.batch_norm(reference_conv(config, x, w, b), None, None, g, beta, True, 0.0, 1e-5)
    expected = torch.autograd.grad(ref, [x, w, b, g, beta], grad)
    for kept in (None, conv_out.detach()):
        got = OPS.conv_bn_train_backward(grad, x.detach(), w.detach(), b.detach(), g.detach(), kept, mean, invstd,
                                         *hyper(config), 1e-5, mask, transposed, output_padding)
        for name, wanted, ours, want in zip(["input", "weight", "bias", "bn_weight", "bn_bias"], mask, got, expected):
            if wanted:
                close(ours, want, f"grad {name}")
            else:
                assert ours is None or ours.numel() == 0 or not ours.any(), name


@pytest.mark.parametrize("config", ["1d", "3d", "transposed_1d", "transposed_2d", "transposed_3d"])
def test_eval_op_gradcheck_through_every_input(config):
    x, w, b, g, beta = op_tensors(config)
    out_ch = g.numel()
    mean = torch.randn(out_ch, **D).requires_grad_()
    var = (torch.rand(out_ch, **D) + 0.5).requires_grad_()
    transposed, output_padding = transposed_args(config)

    def fn(*ts):
        return OPS.conv_bn_eval(*ts, *hyper(config), 1e-3, transposed, output_padding)
    inputs = (x, w, b, g, beta, mean, var)
    close(fn(*inputs), frozen_batch_norm(reference_conv(config, x, w, b), mean, var, g, beta, 1e-3))
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)
    # Without the optional tensors.
    assert gradcheck(lambda x, w, m, v: OPS.conv_bn_eval(x, w, None, None, None, m, v, *hyper(config), 1e-3,
                                                         transposed, output_padding), (x, w, mean, var))


def frozen_batch_norm(y, mean, var, g, beta, eps):
    """F.batch_norm in eval mode, written out (differentiable in mean and var)."""
    shape = (1, -1, *[1] * (y.dim() - 2))
    return (y - mean.reshape(shape)) / (var.reshape(shape) + eps).sqrt() * g.reshape(shape) + beta.reshape(shape)


def fold_reference(w, b, g, beta, mean, var, eps, transposed, groups):
    """The fold written out: scale = g / sqrt(var + eps) multiplies each
    output channel of the weight (dim 0, or for a transposed weight
    (C_in, C_out / groups, k...) dim 1 within each group's block of dim 0)."""
    scale = g / (var + eps).sqrt()
    if transposed:
        c_in, c_out_g = w.shape[:2]
        blocks = w.reshape(groups, c_in // groups, c_out_g, *w.shape[2:])
        s = scale.reshape(groups, 1, c_out_g, *[1] * (w.dim() - 2))
        folded = (blocks * s).reshape(w.shape)
    else:
        folded = w * scale.reshape(-1, *[1] * (w.dim() - 1))
    return folded, (b - mean) * scale + beta


@pytest.mark.parametrize("config", list(OP_CONFIGS))
def test_fold_matches_the_written_out_fold_and_the_pair(config):
    x, w, b, g, beta = op_tensors(config)
    out_ch = g.numel()
    mean = torch.randn(out_ch, **D).requires_grad_()
    var = (torch.rand(out_ch, **D) + 0.5).requires_grad_()
    transposed, _ = transposed_args(config)
    groups = hyper(config)[3]
    folded_w, folded_b = OPS.fold_conv_bn(w, b, g, beta, mean, var, 1e-3, transposed, groups)
    want_w, want_b = fold_reference(w, b, g, beta, mean, var, 1e-3, transposed, groups)
    close(folded_w, want_w, "folded weight")
    close(folded_b, want_b, "folded bias")
    # The folded conv computes the pair in eval.
    close(reference_conv(config, x, folded_w, folded_b),
          frozen_batch_norm(reference_conv(config, x, w, b), mean, var, g, beta, 1e-3), "folded conv")
    assert gradcheck(lambda *ts: OPS.fold_conv_bn(*ts, 1e-3, transposed, groups), (w, b, g, beta, mean, var))
    assert gradgradcheck(lambda *ts: OPS.fold_conv_bn(*ts, 1e-3, transposed, groups), (w, b, g, beta, mean, var))


def test_fold_of_a_transposed_weight_with_groups_scales_output_channels_within_each_group():
    # weight (C_in=4, C_out/groups=3, k): output channel j of group gi is column j of rows 2*gi, 2*gi+1.
    w = torch.ones(4, 3, 1, **D)
    scale = torch.arange(1.0, 7.0, **D)
    folded, _ = OPS.fold_conv_bn(w, None, scale, None, torch.zeros(6, **D), torch.ones(6, **D) - 1e-5, 1e-5,
                                 True, 2)
    expected = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 5, 6], [4, 5, 6]], **D).unsqueeze(-1)
    close(folded, expected)


# --- opcheck ---------------------------------------------------------------------

@pytest.mark.parametrize("config", list(OP_CONFIGS))
def test_opcheck_train_and_eval(config):
    tensors = op_tensors(config, dtype=torch.float32)
    transposed, output_padding = transposed_args(config)
    for memory_efficient in (True, False):
        opcheck(OPS.conv_bn_train.default,
                (*tensors, *hyper(config), 1e-5, memory_efficient, transposed, output_padding))
    out_ch = tensors[3].numel()
    stats = (torch.randn(out_ch), torch.rand(out_ch) + 0.5)
    opcheck(OPS.conv_bn_eval.default, (*tensors, *stats, *hyper(config), 1e-5, transposed, output_padding))
    w, b, g, beta = tensors[1:]
    opcheck(OPS.fold_conv_bn.default, (w, b, g, beta, *stats, 1e-5, transposed, hyper(config)[3]))


@pytest.mark.parametrize("config", list(OP_CONFIGS))
def test_opcheck_train_backward(config):
    x, w, b, g, beta = op_tensors(config, dtype=torch.float32)
    transposed, output_padding = transposed_args(config)
    out, mean, invstd, conv_out = OPS.conv_bn_train(x, w, b, g, beta, *hyper(config), 1e-5, False, transposed,
                                                    output_padding)
    grad = torch.randn_like(out).requires_grad_()
    for conv_output, mask in ((None, [True] * 5), (conv_out.detach(), [True, False, False, True, False])):
        opcheck(OPS.conv_bn_train_backward.default,
                (grad, x, w, b, g, conv_output, mean, invstd, *hyper(config), 1e-5, mask, transposed,
                 output_padding))


@pytest.mark.parametrize("make,shape", [
    (lambda: ConvBN1d(4, 6, 3, padding="same", groups=2, padding_mode="reflect"), (3, 4, 9)),
    (lambda: ConvBN3d(4, 6, 2, stride=(1, 2, 1), padding=1, bias=True), (3, 4, 5, 6, 5)),
    (lambda: ConvTransposeBN2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (3, 4, 4, 5)),
    (lambda: ConvTransposeBN3d(4, 2, 2, stride=2, bias=True, momentum=None), (3, 4, 2, 3, 2)),
], ids=["ConvBN1d", "ConvBN3d", "ConvTransposeBN2d", "ConvTransposeBN3d"])
def test_torch_export_with_a_dynamic_batch(make, shape):
    """torch.export (through the fake kernels, batch size dynamic) in eval
    mode, also decomposed to ATen ops, and in training mode (the program
    updates the running statistics as the pair does)."""
    torch.manual_seed(0)
    layer = make().double()
    with torch.no_grad():
        layer.bn_weight.uniform_(0.5, 1.5)
        layer.bn_bias.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    pair = nn.Sequential(*layer.to_modules())
    batch = torch.export.Dim("batch", min=2, max=64)
    x = torch.randn(*shape, **D)
    layer.eval(), pair.eval()
    exported = torch.export.export(layer, (x,), dynamic_shapes={"input": {0: batch}})
    for program in (exported.module(), exported.run_decompositions().module()):
        for n in (2, 5):
            y = torch.randn(n, *shape[1:], **D)
            with torch.no_grad():
                close(program(y), pair(y), f"eval, batch {n}")

    layer.train(), pair.train()
    exported = torch.export.export(layer, (x,), dynamic_shapes={"input": {0: batch}})
    program = exported.module()  # (records the training graph)
    for n in (4, 3):
        y = torch.randn(n, *shape[1:], **D)
        close(program(y), pair(y), f"train, batch {n}")
    state = program.state_dict()
    close(state["running_mean"], pair[1].running_mean, "running_mean")
    close(state["running_var"], pair[1].running_var, "running_var")
    assert state["num_batches_tracked"].item() == pair[1].num_batches_tracked.item()


# --- what is kept for backward --------------------------------------------------------

MEMORY_CASES = {
    "ConvBN3d": (lambda me: ConvBN3d(4, 8, 3, stride=1, padding=1, bias=True, memory_efficient=me), (2, 4, 8, 8, 8)),
    "ConvBN3d_channels_last": (lambda me: ConvBN3d(4, 8, 3, stride=2, padding=1, memory_efficient=me),
                               (2, 4, 8, 8, 8)),
    "ConvTransposeBN2d": (lambda me: ConvTransposeBN2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                                                       bias=True, memory_efficient=me), (4, 8, 10, 10)),
    "ConvTransposeBN1d": (lambda me: ConvTransposeBN1d(8, 8, 4, stride=2, padding=1, memory_efficient=me),
                          (4, 8, 32)),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_memory_efficient_mode_keeps_no_conv_output(case):
    make, shape = MEMORY_CASES[case]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    if case.endswith("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    fused = make(True)
    conv, bn = fused.to_modules()
    out, kept = saved_tensors(lambda: fused(x))
    conv_output_bytes = out.numel() * out.element_size()
    channels = fused.out_channels
    own = {t.untyped_storage().data_ptr() for t in [x, *fused.parameters()]}
    for t in kept:
        # Only the input, the parameters and per-channel statistics.
        assert t.untyped_storage().data_ptr() in own or t.numel() == channels, tuple(t.shape)
    extra = nbytes([t for t in kept if t.untyped_storage().data_ptr() not in own])
    assert extra <= 4 * channels * 8
    assert saved_tensor_bytes(lambda: fused(x), exclude=[x, *fused.parameters()]) < conv_output_bytes
    assert saved_tensor_bytes(lambda: fused(x)) <= nbytes([x]) + nbytes(list(fused.parameters())) + 4 * channels * 8
    # The pair keeps (at least) the conv output for its batch norm.
    pair_bytes = saved_tensor_bytes(lambda: bn(conv(x)))
    assert pair_bytes - saved_tensor_bytes(lambda: fused(x)) >= conv_output_bytes

    keep_output = make(False)
    keep_output.load_state_dict(fused.state_dict())
    kept_bytes = saved_tensor_bytes(lambda: keep_output(x), exclude=[x, *keep_output.parameters()])
    efficient_bytes = saved_tensor_bytes(lambda: fused(x), exclude=[x, *fused.parameters()])
    assert kept_bytes == efficient_bytes + conv_output_bytes
    _, kept = saved_tensors(lambda: keep_output(x))
    assert sum(t.shape == out.shape for t in kept) == 1


@pytest.mark.parametrize("cls,shape", [(ConvTransposeBN2d, (4, 6, 7, 7)), (ConvTransposeBN3d, (2, 6, 4, 4, 4)),
                                       (ConvBN3d, (2, 6, 5, 5, 5))], ids=["ConvTransposeBN2d", "ConvTransposeBN3d",
                                                                          "ConvBN3d"])
def test_frozen_batch_norm_keeps_no_folded_weight(cls, shape):
    """Eval mode with weights that train: the node keeps the input, the
    layer's own tensors and per-channel vectors, not a folded copy of the
    (transposed) weight nor the conv output; the gradients are the pair's."""
    torch.manual_seed(0)
    layer = cls(6, 8, 3, stride=2, padding=1, groups=2, bias=True).double()
    with torch.no_grad():
        layer.bn_weight.uniform_(0.5, 1.5)
        layer.bn_bias.uniform_(-1, 1)
        layer.running_mean.normal_(0, 0.5)
        layer.running_var.uniform_(0.5, 2.0)
    layer.eval()
    pair = nn.Sequential(*layer.to_modules()).eval()
    x = torch.randn(*shape, **D, requires_grad=True)
    out, saved = saved_tensors(lambda: layer(x))
    own = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters(), *layer.buffers()]}
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in own and t.shape != (8,)]
    assert not extra, [tuple(t.shape) for t in extra]
    _, pair_saved = saved_tensors(lambda: pair(x))
    assert nbytes(pair_saved) > nbytes(saved) + out.numel() * out.element_size() // 2
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, *layer.parameters()], grad)
    theirs = torch.autograd.grad(pair(x), [x, *pair.parameters()], grad)
    for a, b in zip(ours, theirs):
        close(a, b)


# --- errors ------------------------------------------------------------------------

def test_module_input_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"ConvBN2d expect(s|ed) a 4-D input \(N, C, H, W\), got a 5-D input"):
        ConvBN2d(3, 4, 3)(torch.randn(2, 3, 4, 5, 6))
    with pytest.raises(ValueError, match=r"ConvBN3d expect(s|ed) a 5-D input.*4-D.*unsqueeze\(0\)"):
        ConvBN3d(3, 4, 3)(torch.randn(3, 5, 5, 5))
    with pytest.raises(ValueError, match=r"ConvTransposeBN1d expect(s|ed) a 3-D input \(N, C, L\)"):
        ConvTransposeBN1d(3, 4, 3)(torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("cls,kwargs", [
    (ConvTransposeBN1d, dict(stride=2, output_padding=2)),
    (ConvTransposeBN2d, dict(stride=(2, 1), output_padding=(1, 1))),
    (ConvTransposeBN3d, dict(stride=1, output_padding=1)),
    (ConvTransposeBN2d, dict(stride=1, dilation=2, output_padding=2)),
])
def test_output_padding_not_smaller_than_stride_or_dilation(cls, kwargs):
    with pytest.raises(ValueError, match="output_padding"):
        cls(4, 4, 3, **kwargs)


@pytest.mark.parametrize("cls,kwargs,word", [
    (ConvTransposeBN2d, dict(padding="same"), "padding"),
    (ConvTransposeBN2d, dict(padding_mode="reflect"), "padding_mode"),
    (ConvBN3d, dict(stride=2, padding="same"), "strided"),
    (ConvBN3d, dict(stride=(1, 2)), "stride"),
    (ConvTransposeBN3d, dict(groups=3), "divisible"),
])
def test_constructor_errors(cls, kwargs, word):
    with pytest.raises(ValueError, match=word):
        cls(4, 4, 3, **kwargs)


def _op_call(**changes):
    a = dict(input=torch.randn(2, 4, 5, 6, 5), weight=torch.randn(6, 4, 3, 3, 3), stride=[1, 1, 1],
             padding=[1, 1, 1], dilation=[1, 1, 1], groups=1, transposed=False, output_padding=[])
    a.update(changes)
    return a


@pytest.mark.parametrize("changes,pattern", [
    (dict(stride=[1, 1]), "stride"),
    (dict(stride=[1, 1, 1, 1]), "stride"),
    (dict(padding=[1]), "padding"),
    (dict(dilation=[1, 1]), "dilation"),
    (dict(output_padding=[1, 0, 0]), "output_padding"),
    (dict(output_padding=[0, 0, 0]), None),  # zeros are fine
    (dict(transposed=True, weight=torch.randn(4, 3, 3, 3, 3), output_padding=[1, 0]), "output_padding"),
    (dict(transposed=True, weight=torch.randn(4, 3, 3, 3, 3), stride=[2, 2, 2], output_padding=[2, 0, 0]),
     "output_padding"),
    (dict(weight=torch.randn(6, 4, 3, 3)), "weight"),
    (dict(transposed=True, weight=torch.randn(5, 3, 3, 3, 3)), "channel"),
])
def test_op_argument_errors_name_the_argument(changes, pattern):
    a = _op_call(**changes)
    g, beta = torch.rand(a["weight"].shape[1] if a["transposed"] else a["weight"].shape[0]) + 0.5, None
    calls = [
        lambda: OPS.conv_bn_train(a["input"], a["weight"], None, None, None, a["stride"], a["padding"],
                                  a["dilation"], a["groups"], 1e-5, True, a["transposed"], a["output_padding"]),
        lambda: OPS.conv_bn_eval(a["input"], a["weight"], None, g, beta, torch.zeros_like(g), torch.ones_like(g),
                                 a["stride"], a["padding"], a["dilation"], a["groups"], 1e-5, a["transposed"],
                                 a["output_padding"]),
    ]
    for call in calls:
        if pattern is None:
            call()
        else:
            with pytest.raises(RuntimeError, match=pattern):
                call()


def test_backward_op_checks_its_arguments_too():
    x, w = torch.randn(2, 4, 5, 6, 5), torch.randn(6, 4, 3, 3, 3)
    out, mean, invstd, _ = OPS.conv_bn_train(x, w, None, None, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1, 1e-5)
    with pytest.raises(RuntimeError, match="stride"):
        OPS.conv_bn_train_backward(torch.randn_like(out), x, w, None, None, None, mean, invstd, [1, 1],
                                   [1, 1, 1], [1, 1, 1], 1, 1e-5, [True] * 5)
    with pytest.raises(RuntimeError, match="output_padding"):
        OPS.conv_bn_train_backward(torch.randn_like(out), x, w, None, None, None, mean, invstd, [1, 1, 1],
                                   [1, 1, 1], [1, 1, 1], 1, 1e-5, [True] * 5, False, [1, 1, 1])


def test_functional_errors():
    x, w = torch.randn(2, 4, 9), torch.randn(6, 4, 3)
    with pytest.raises(ValueError, match="output_padding"):
        convbn.functional.conv_bn(x, w, output_padding=1)
    with pytest.raises(ValueError, match="transposed"):
        convbn.functional.conv_bn(x, torch.randn(4, 6, 3), transposed=True, padding="same")
    with pytest.raises(ValueError, match="stride"):
        convbn.functional.conv_bn(x, w, stride=(1, 2))
    with pytest.raises(ValueError, match="weight"):
        convbn.functional.conv_bn(x, torch.randn(6, 4))


# --- fuse and unfuse -----------------------------------------------------------------

class MixedRanks(nn.Module):
    """Conv3d -> BN3d, Conv1d -> BN1d, ConvTranspose2d -> BN2d with ReLUs
    between them, and a ConvTranspose2d called with output_size (not
    fusable: the fused module takes no output_size)."""

    def __init__(self):
        super().__init__()
        self.block3d = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU())
        self.conv1d, self.bn1d = nn.Conv1d(4, 6, 3, padding=1, groups=2), nn.BatchNorm1d(6)
        self.up = nn.Sequential(nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1),
                                nn.BatchNorm2d(4), nn.ReLU())
        self.sized_up, self.sized_bn = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1), nn.BatchNorm2d(2)
        self.up3d = nn.Sequential(nn.ConvTranspose3d(3, 2, 2, stride=2, groups=1), nn.BatchNorm3d(2, momentum=None))

    def forward(self, x):
        n = x.shape[0]
        y = self.block3d(x)  # (N, 4, 4, 4, 4)
        y = torch.relu(self.bn1d(self.conv1d(y.flatten(2))))  # (N, 6, 64)
        y = self.up(y.reshape(n, 6, 8, 8))  # (N, 4, 16, 16)
        y = self.sized_bn(self.sized_up(y, output_size=[32, 32]))  # (N, 2, 32, 32)
        z = self.up3d(x)  # (N, 2, 8, 8, 8)
        return y.mean((2, 3)) + z.mean((2, 3, 4))


def fused_count(model):
    return sum(isinstance(m, _ConvBNNd) for m in model.modules())


def assert_same(fused, original, x, steps=2):
    """SGD steps on both in training mode: outputs, input and parameter
    grads (by state_dict name), every state_dict entry; then eval outputs
    and grads, and eval under no_grad."""
    assert list(fused.state_dict()) == list(original.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (original, fused)]
    original.train(), fused.train()
    for step in range(steps + 1):
        if step == steps:
            original.eval(), fused.eval()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = original(xa), fused(xb)
        close(out_b, out_a, f"output, step {step}")
        g = torch.randn_like(out_a)
        out_a.backward(g), out_b.backward(g)
        close(xb.grad, xa.grad, f"grad input, step {step}")
        params_b = fused.state_dict(keep_vars=True)
        for name, p in original.state_dict(keep_vars=True).items():
            if isinstance(p, nn.Parameter):
                assert (p.grad is None) == (params_b[name].grad is None), name
                if p.grad is not None:
                    close(params_b[name].grad, p.grad, f"grad {name}, step {step}")
        for opt in opts:
            opt.step(), opt.zero_grad()
        for name, value in original.state_dict().items():
            close(fused.state_dict()[name], value, f"{name}, step {step}")
    with torch.no_grad():
        close(fused(x), original(x), "eval, no_grad")


def test_fuse_and_unfuse_pairs_of_every_rank():
    torch.manual_seed(0)
    original = randomize_batch_norms(MixedRanks().double())
    x = torch.randn(2, 3, 4, 4, 4, **D)
    fused, report = convbn.fuse(original, report=True)
    assert type(fused) is MixedRanks and fused is not original
    kinds = {p.layer: p.kind for p in report.fused}
    assert kinds == {"block3d.0": "ConvBN3d", "conv1d": "ConvBN1d", "up.0": "ConvTransposeBN2d",
                     "up3d.0": "ConvTransposeBN3d"}, report
    assert {p.bn for p in report.fused} == {"block3d.1", "bn1d", "up.1", "up3d.1"}
    assert type(fused.block3d[0]) is ConvBN3d and type(fused.conv1d) is ConvBN1d
    assert type(fused.up[0]) is ConvTransposeBN2d and type(fused.up3d[0]) is ConvTransposeBN3d
    assert isinstance(fused.bn1d, convbn.FusedBatchNormSlot) and fused.bn1d.fused is fused.conv1d
    # output_size= in forward: left alone, with the reason.
    (left,) = report.left_alone
    assert (left.layer, left.bn) == ("sized_up", "sized_bn") and "output_size" in left.reason
    assert type(fused.sized_up) is nn.ConvTranspose2d and type(fused.sized_bn) is nn.BatchNorm2d
    assert fused_count(fused) == 4
    reference = copy.deepcopy(original)
    assert_same(fused, reference, x)

    # unfuse: the original's module types and state_dict keys again, the
    # (trained) values kept.
    restored = convbn.unfuse(fused)
    assert [type(m) for m in restored.modules()] == [type(m) for m in original.modules()]
    assert list(restored.state_dict()) == list(original.state_dict())
    assert_same(restored, reference, x, steps=1)


def test_fuse_in_eval_mode_and_checkpoints_load_both_ways():
    torch.manual_seed(0)
    original = randomize_batch_norms(MixedRanks().double()).eval()
    x = torch.randn(2, 3, 4, 4, 4, **D)
    fused = convbn.fuse(original)
    assert fused_count(fused) == 4
    with torch.no_grad():
        close(fused(x), original(x), "eval")
    other = randomize_batch_norms(MixedRanks().double(), bias_std=1.0)
    fused.load_state_dict(other.state_dict())
    assert torch.equal(fused.up3d[0].running_var, other.up3d[1].running_var)
    assert torch.equal(fused.conv1d.bn_weight, other.bn1d.weight)
    original.load_state_dict(fused.state_dict())
    for name, value in other.state_dict().items():
        assert torch.equal(original.state_dict()[name], value), name
    assert_same(fused, original, x, steps=1)


@pytest.mark.parametrize("conv,bn", [
    (nn.Conv1d(4, 4, 3), nn.BatchNorm2d(4)), (nn.Conv3d(4, 4, 3), nn.BatchNorm2d(4)),
    (nn.ConvTranspose1d(4, 4, 3), nn.BatchNorm3d(4)), (nn.ConvTranspose3d(4, 4, 3), nn.BatchNorm1d(4)),
])
def test_pairs_of_mismatched_ranks_are_left_alone(conv, bn):
    """A conv followed by a batch norm of another rank is not a pair fuse
    converts."""
    model = nn.Sequential(conv, bn).double()
    fused, report = convbn.fuse(model, report=True)
    assert fused_count(fused) == 0 and type(fused[0]) is type(conv)
    (left,) = report.left_alone
    assert "not a pair fuse converts" in left.reason, left.reason


def test_convert_sync_batchnorm_converts_every_rank():
    model = nn.Sequential(ConvBN1d(2, 2, 1), ConvBN3d(2, 2, 1), ConvTransposeBN1d(2, 2, 1),
                          ConvTransposeBN2d(2, 2, 1), ConvTransposeBN3d(2, 2, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    synced = convbn.convert_sync_batchnorm(model)
    assert [type(m) for m in synced] == [convbn.SyncConvBN1d, convbn.SyncConvBN3d, convbn.SyncConvTransposeBN1d,
                                         convbn.SyncConvTransposeBN2d, convbn.SyncConvTransposeBN3d]
    for name, value in synced.state_dict().items():
        assert torch.equal(value, state[name]), name
    # Without torch.distributed initialized it computes alone, as the layer.
    layer = ConvTransposeBN3d(2, 3, 2, stride=2).double()
    sync = convbn.SyncConvTransposeBN3d(2, 3, 2, stride=2, process_group=None).double()
    sync.load_state_dict(layer.state_dict())
    x = torch.randn(2, 2, 2, 2, 2, **D)
    close(sync(x), layer(x))


@pytest.fixture
def one_rank_group():
    """A one-process gloo group (the sync operators then reduce over one
    rank), torn down afterwards."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not yet initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("config", list(OP_CONFIGS))
def test_sync_ops_on_one_rank_match_the_pair(config, one_rank_group):
    """sync_conv_bn_train (and its backward, through autograd) with the
    transposed and 1-/3-D arguments, over a group of one: the pair's
    output, batch statistics, count and gradients."""
    transposed, output_padding = transposed_args(config)
    for memory_efficient in (True, False):
        x, w, b, g, beta = op_tensors(config)
        out, mean, invstd, conv_out, count = OPS.sync_conv_bn_train(
            x, w, b, g, beta, *hyper(config), 1e-5, one_rank_group.group_name, 1, memory_efficient, transposed,
            output_padding)
        conv = reference_conv(config, x, w, b)
        ref = F.batch_norm(conv, None, None, g, beta, True, 0.0, 1e-5)
        close(out, ref, "output")
        dims = [0, *range(2, conv.dim())]
        close(mean, conv.mean(dims), "save_mean")
        assert count.item() == conv.numel() // conv.shape[1]
        grad = torch.randn_like(ref)
        ours = torch.autograd.grad(out, [x, w, b, g, beta], grad)
        theirs = torch.autograd.grad(ref, [x, w, b, g, beta], grad)
        for name, a, e in zip(["input", "weight", "bias", "bn_weight", "bn_bias"], ours, theirs):
            close(a, e, f"grad {name}")


# --- checkpoints ------------------------------------------------------------------------

def _pair_keys(key):
    """A ConvTransposeBN3d's state_dict key under nn.Sequential(conv, bn)'s names."""
    if key in ("weight", "bias"):
        return "0." + key
    return "1." + {"bn_weight": "weight", "bn_bias": "bias"}.get(key, key)


def test_conv_transpose_bn3d_state_dict_interchanges_with_a_fused_pair():
    torch.manual_seed(0)
    layer = ConvTransposeBN3d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, bias=True,
                              momentum=None).double()
    layer(torch.randn(2, 4, 3, 3, 3, **D))  # running statistics that are not the defaults
    with torch.no_grad():
        layer.bn_weight.uniform_(0.5, 1.5)
        layer.bn_bias.normal_()
    conv = nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, bias=True, **D)
    pair = nn.Sequential(conv, nn.BatchNorm3d(6, momentum=None, **D))
    fused = convbn.fuse(pair)
    assert isinstance(fused[0], ConvTransposeBN3d) and isinstance(fused[1], convbn.FusedBatchNormSlot)
    assert list(fused.state_dict()) == list(pair.state_dict()) == [_pair_keys(k) for k in layer.state_dict()]

    # The layer's checkpoint into the fused model and into the plain pair.
    renamed = {_pair_keys(k): v for k, v in layer.state_dict().items()}
    fused.load_state_dict(renamed)
    pair.load_state_dict(renamed)
    x = torch.randn(2, 4, 3, 3, 3, **D)
    for mode in ("eval", "train"):
        for m in (layer, fused, pair):
            getattr(m, mode)()
        want = layer(x)
        close(fused(x), want, f"{mode}: fused model vs layer")
        close(pair(x), want, f"{mode}: pair vs layer")
    assert fused[0].num_batches_tracked.item() == layer.num_batches_tracked.item() == 2

    # And back: the fused model's checkpoint into a fresh layer.
    fresh = ConvTransposeBN3d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, bias=True,
                              momentum=None).double()
    fresh.load_state_dict({k: fused.state_dict()[_pair_keys(k)] for k in fresh.state_dict()})
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, layer.state_dict()[k]), k
    fresh.eval(), layer.eval()
    close(fresh(x), layer(x), "fresh layer")


# --- recalibrate ---------------------------------------------------------------------------

def uneven_batches(shape, sizes=(5, 3, 6, 2)):
    return [torch.randn(n, *shape, **D) * 2 + 1 for n in sizes]


@pytest.mark.parametrize("make,shape,conv", [
    (lambda: ConvBN3d(3, 5, 3, stride=2, padding=1, bias=True, momentum=None, dtype=F64), (3, 5, 6, 5),
     lambda x, m: F.conv3d(x, m.weight, m.bias, stride=2, padding=1)),
    (lambda: ConvBN1d(3, 4, 3, dilation=2, dtype=F64), (3, 9),
     lambda x, m: F.conv1d(x, m.weight, None, dilation=2)),
    (lambda: ConvTransposeBN2d(3, 4, 3, stride=2, output_padding=1, groups=1, bias=True, dtype=F64), (3, 4, 3),
     lambda x, m: F.conv_transpose2d(x, m.weight, m.bias, stride=2, output_padding=1)),
])
def test_recalibrate_gives_the_population_statistics(make, shape, conv):
    layer = make()
    batches = uneven_batches(shape)
    layer.eval()
    assert convbn.recalibrate(layer, batches, progress=False) is layer
    assert not layer.training and layer.num_batches_tracked.item() == 0
    y = conv(torch.cat(batches), layer)
    dims = [0, *range(2, y.dim())]
    assert_close_to_reference(layer.running_mean, y.mean(dims), F64, "running_mean")
    assert_close_to_reference(layer.running_var, y.var(dims, unbiased=True), F64, "running_var")


def test_recalibrate_a_conv_bn3d_model_fused_and_unfused():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                             nn.Conv3d(4, 4, 3, stride=2), nn.BatchNorm3d(4)).double()
    batches = [torch.randn(n, 2, 5, 6, 5, **D) for n in (4, 1, 3)]
    fused = convbn.fuse(original)
    assert fused_count(fused) == 2
    unfused = copy.deepcopy(original)
    convbn.recalibrate(fused, batches, progress=False)
    convbn.recalibrate(unfused, batches, progress=False)
    # The reference: each batch norm's input over all batches, each batch
    # normalized with its own statistics (training mode).
    with torch.no_grad():
        x = [original[0](b) for b in batches]
        first = torch.cat(x)
        dims = (0, 2, 3, 4)
        normalized = [F.batch_norm(t, None, None, original[1].weight, original[1].bias, True) for t in x]
        second = torch.cat([original[3](F.relu(t)) for t in normalized])
    for bn_index, values in ((1, first), (4, second)):
        for model in (fused, unfused):
            assert_close_to_reference(model[bn_index].running_mean, values.mean(dims), F64, "running_mean")
            assert_close_to_reference(model[bn_index].running_var, values.var(dims), F64, "running_var")
