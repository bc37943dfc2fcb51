"""The fused activation (the `activation` and `negative_slope` arguments of
the conv + batch norm operators, convbn.functional.conv_bn and the ConvBN /
ConvTransposeBN modules), against independent references: nn.Sequential(conv,
bn, act) of nn layers and torch.nn.functional in float64.

Covered: an all-pairs parity grid (every activation, both memory modes, both
layouts, 1-D/2-D/3-D and transposed convs, conv bias, affine, running
statistics, float64 and float32: outputs, every gradient, running statistics
over two training steps, then the eval output and frozen-BN gradients); each
piece of the piecewise activations; bfloat16 and CPU autocast; gradcheck and
gradgradcheck of conv_bn_train and conv_bn_eval; the backward operator
against autograd; forward-mode AD and torch.func on the eval operator;
torch.library.opcheck; what is kept for backward; TorchScript, torch.export
and torch.compile; the argument errors; NaN propagation; from_modules /
to_modules / state_dict / unfuse; the Sync variants in one process (over
gloo ranks: tests/test_distributed.py's layer configurations)."""

import copy
import itertools
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

import convbn
from conftest import assert_as_accurate_as_pair, assert_close_to_reference, nn_activation, saved_tensors
from convbn import (
    ConvBN1d, ConvBN2d, ConvBN3d, ConvTransposeBN1d, ConvTransposeBN2d, ConvTransposeBN3d,
)
from convbn.utils import saved_tensor_bytes

F64 = torch.float64
D = dict(dtype=F64)
OPS = torch.ops.convbn


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: intra-op threads only add synchronization."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the activations and their independent references ----------------------------

# (id, operator name, negative_slope): leaky_relu with a positive and a negative slope.
ACTIVATIONS = [
    ("identity", "identity", 0.01),
    ("relu", "relu", 0.01),
    ("relu6", "relu6", 0.01),
    ("leaky_relu_0.2", "leaky_relu", 0.2),
    ("leaky_relu_-0.5", "leaky_relu", -0.5),
    ("silu", "silu", 0.01),
    ("hardswish", "hardswish", 0.01),
    ("sigmoid", "sigmoid", 0.01),
    ("gelu", "gelu", 0.01),
]
ACTIVATION_IDS = [a[0] for a in ACTIVATIONS]
BY_ID = {a[0]: a[1:] for a in ACTIVATIONS}

# Where each piecewise activation changes formula (gradcheck stays away from them).
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,), "hardswish": (-3.0, 3.0)}


def functional_activation(name, slope):
    """The same, as a function of a tensor (torch.nn.functional)."""
    return {
        "identity": lambda t: t, "relu": F.relu, "relu6": F.relu6,
        "leaky_relu": lambda t: F.leaky_relu(t, slope), "silu": F.silu, "hardswish": F.hardswish,
        "sigmoid": torch.sigmoid, "gelu": F.gelu,
    }[name]


def test_the_activation_list_is_the_documented_one():
    assert convbn.activation.ACTIVATIONS == (
        "identity", "relu", "relu6", "leaky_relu", "silu", "hardswish", "sigmoid", "gelu")
    assert sorted({a[1] for a in ACTIVATIONS}) == sorted(convbn.activation.ACTIVATIONS)


def assert_away_from_kinks(z, name, margin=1e-3):
    """gradcheck's finite differences are only valid where the activation is
    smooth: the data must keep every activation input `margin` away from a
    kink (a precondition on the chosen seed and shapes, not a tolerance)."""
    for kink in KINKS.get(name, ()):
        distance = (z.detach() - kink).abs().min().item()
        assert distance > margin, f"{name}: an activation input is {distance:.2g} from the kink at {kink}"


# --- the parity grid ---------------------------------------------------------------

# kind: (fused class, nn conv, nn batch norm, conv keyword arguments, input shape (N, C_in=4, ...))
KINDS = {
    "ConvBN1d": (ConvBN1d, nn.Conv1d, nn.BatchNorm1d, dict(kernel_size=3, stride=2, padding=1), (3, 4, 11)),
    "ConvBN2d": (ConvBN2d, nn.Conv2d, nn.BatchNorm2d,
                 dict(kernel_size=3, stride=(2, 1), padding=1, dilation=(1, 2)), (3, 4, 6, 7)),
    "ConvBN3d": (ConvBN3d, nn.Conv3d, nn.BatchNorm3d, dict(kernel_size=2, padding=(1, 0, 1)), (2, 4, 3, 4, 3)),
    "ConvTransposeBN1d": (ConvTransposeBN1d, nn.ConvTranspose1d, nn.BatchNorm1d,
                          dict(kernel_size=3, stride=2, padding=1, output_padding=1), (3, 4, 6)),
    "ConvTransposeBN2d": (ConvTransposeBN2d, nn.ConvTranspose2d, nn.BatchNorm2d,
                          dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0)),
                          (3, 4, 4, 5)),
    "ConvTransposeBN3d": (ConvTransposeBN3d, nn.ConvTranspose3d, nn.BatchNorm3d,
                          dict(kernel_size=2, stride=(2, 1, 1), output_padding=(1, 0, 0)), (2, 4, 2, 3, 2)),
}

# (out_channels, groups) for 4 input channels: 18 channels fill the CPU
# kernels' vector registers in channels_last (and leave a tail).
CHANNELS = {"plain": (6, 1), "wide_grouped": (18, 2)}

GRID = {
    "activation": ACTIVATION_IDS,
    "kind": list(KINDS),
    "memory_efficient": [True, False],
    "layout": ["contiguous", "channels_last"],
    "bias": [False, True],
    "affine": [True, False],
    "track": [True, False],
    "channels": list(CHANNELS),
    "dtype": [F64, torch.float32],
}


def all_pairs(dims, seed, candidates=40):
    """A seeded greedy set of cases in which every pair of values of any two
    options appears at least once."""
    names = list(dims)
    rng = random.Random(seed)

    def pairs(case):
        return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(names, 2)}

    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2) for va in dims[a] for vb in dims[b]}
    cases = []
    while uncovered:
        best, best_gain = None, 0
        for _ in range(candidates):
            case = {n: rng.choice(dims[n]) for n in names}
            (a, va), (b, vb) = rng.choice(sorted(uncovered, key=repr))
            case[a], case[b] = va, vb
            gain = len(pairs(case) & uncovered)
            if gain > best_gain:
                best, best_gain = case, gain
        cases.append(best)
        uncovered -= pairs(best)
    return cases


# Two independent all-pairs sets: more triples of options meet too.
CASES = all_pairs(GRID, seed=7) + all_pairs(GRID, seed=8)


def case_id(case):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in case.items())


def test_grid_covers_every_pair():
    for a, b in itertools.combinations(list(GRID), 2):
        for va in GRID[a]:
            for vb in GRID[b]:
                assert any(c[a] == va and c[b] == vb for c in CASES), (a, va, b, vb)


def _round(t, dtype):
    """t's values as dtype holds them, kept in float64."""
    return t.to(dtype).double()


def _layout(x, layout):
    """x in the case's layout: channels_last(_3d) for 4-D/5-D, and for 3-D
    the (N, L, C) memory order seen as (N, C, L)."""
    if layout == "contiguous":
        return x.contiguous()
    if x.dim() == 3:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def make_triple(kind, out_ch, groups, bias, affine, track, dtype, act_name, slope):
    """The float64 reference nn.Sequential(conv, bn, act), with batch norm
    parameters and statistics away from their defaults (gamma up to 3 and
    beta of spread 1.5, so that relu6 saturates and hardswish's three pieces
    are all met), every value representable in dtype."""
    _, conv_type, bn_type, conv_kwargs, _ = KINDS[kind]
    conv = conv_type(4, out_ch, groups=groups, bias=bias, **conv_kwargs, **D)
    bn = bn_type(out_ch, affine=affine, track_running_stats=track, **D)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(_round(p, dtype))
        if affine:
            bn.weight.copy_(_round(torch.rand(out_ch, **D) * 2.5 + 0.5, dtype))
            bn.bias.copy_(_round(torch.randn(out_ch, **D) * 1.5, dtype))
        if track:
            bn.running_mean.copy_(_round(torch.randn(out_ch, **D) * 0.1, dtype))
            bn.running_var.copy_(_round(torch.rand(out_ch, **D) + 0.5, dtype))
    return nn.Sequential(conv, bn, nn_activation(act_name, slope))


def param_pairs(ref, fused, bias, affine):
    """(name, reference parameter, fused parameter) for every parameter."""
    conv, bn, _ = ref
    pairs = [("weight", conv.weight, fused.weight)]
    if bias:
        pairs.append(("bias", conv.bias, fused.bias))
    if affine:
        pairs += [("bn_weight", bn.weight, fused.bn_weight), ("bn_bias", bn.bias, fused.bn_bias)]
    return pairs


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_conv_bn_activation(case, device):
    """The module on `device` (CPU, and CUDA where there is one) against the
    float64 nn triple on the CPU."""
    act_name, slope = BY_ID[case["activation"]]
    cls, _, _, _, shape = KINDS[case["kind"]]
    out_ch, groups = CHANNELS[case["channels"]]
    dtype = case["dtype"]
    ref = make_triple(case["kind"], out_ch, groups, case["bias"], case["affine"], case["track"], dtype,
                      act_name, slope)
    fused = cls.from_modules(ref[0], ref[1], memory_efficient=case["memory_efficient"],
                             activation=copy.deepcopy(ref[2])).to(device=device, dtype=dtype)
    assert type(fused) is cls and fused.activation == act_name and fused.negative_slope == slope
    assert fused.memory_efficient == case["memory_efficient"]

    def check(actual, expected, name):
        assert actual.dtype == dtype and actual.device.type == device, name
        assert_close_to_reference(actual.cpu(), expected, dtype, name)

    for step in range(2):
        x = _round(torch.randn(*shape, **D) * 2 + step, dtype)
        x_ref = x.clone().requires_grad_()
        x_fused = _layout(x.to(device, dtype), case["layout"]).requires_grad_()
        out_ref = ref(x_ref)
        out = fused(x_fused)
        assert out.shape == out_ref.shape
        if case["layout"] == "channels_last" and out.dim() > 3:  # the input's memory format
            assert out.is_contiguous(memory_format=torch.channels_last if out.dim() == 4 else torch.channels_last_3d)
        grad = _round(torch.randn_like(out_ref), dtype)
        out_ref.backward(grad)
        out.backward(_layout(grad.to(device, dtype), case["layout"]))
        check(out, out_ref, f"output, step {step}")
        check(x_fused.grad, x_ref.grad, f"grad input, step {step}")
        for name, ref_p, fused_p in param_pairs(ref, fused, case["bias"], case["affine"]):
            check(fused_p.grad, ref_p.grad, f"grad {name}, step {step}")
            ref_p.grad = fused_p.grad = None
        if case["track"]:
            check(fused.running_mean, ref[1].running_mean, f"running_mean, step {step}")
            check(fused.running_var, ref[1].running_var, f"running_var, step {step}")
            assert fused.num_batches_tracked.item() == ref[1].num_batches_tracked.item() == step + 1
        else:
            assert fused.running_mean is None and fused.num_batches_tracked is None

    # Eval: the running statistics (or, without them, the batch's), with
    # gradients for the input and the weights (frozen batch norm).
    ref.eval(), fused.eval()
    x = _round(torch.randn(*shape, **D), dtype)
    x_ref = x.clone().requires_grad_()
    x_fused = _layout(x.to(device, dtype), case["layout"]).requires_grad_()
    out_ref, out = ref(x_ref), fused(x_fused)
    check(out, out_ref, "eval output")
    grad = _round(torch.randn_like(out_ref), dtype)
    out_ref.backward(grad)
    out.backward(_layout(grad.to(device, dtype), case["layout"]))
    check(x_fused.grad, x_ref.grad, "eval grad input")
    for name, ref_p, fused_p in param_pairs(ref, fused, case["bias"], case["affine"]):
        check(fused_p.grad, ref_p.grad, f"eval grad {name}")
    with torch.no_grad():
        check(fused(_layout(x.to(device, dtype), case["layout"])), out_ref, "eval output, no_grad")
    if case["track"]:
        assert fused.num_batches_tracked.item() == 2  # eval leaves the statistics alone

    # to_modules gives the triple back.
    modules = fused.to_modules()
    if act_name == "identity":
        assert len(modules) == 2
    else:
        assert len(modules) == 3 and type(modules[2]) is type(ref[2])
        assert repr(modules[2]) == repr(ref[2])
    with torch.no_grad():
        check(nn.Sequential(*modules)(x.to(device, dtype)), out_ref, "to_modules output")


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act_id", [a for a in ACTIVATION_IDS if BY_ID[a][0] in KINKS])
def test_every_piece_of_the_piecewise_activations(act_id, layout, memory_efficient):
    """Channels whose batch-norm shift puts the activation's input in each
    piece (below -3, [-3, 0), [0, 3], (3, 6], above 6) and across each kink:
    the output and every gradient against the nn triple in float64, in
    training and eval. 20 channels and 9x9 planes exercise the CPU kernels'
    vector loops and their tails in both layouts."""
    act_name, slope = BY_ID[act_id]
    betas = torch.tensor([-8.0, -4.0, -3.0, -1.5, 0.0, 1.5, 3.0, 4.5, 6.0, 8.0] * 2, **D)
    ref = nn.Sequential(nn.Conv2d(3, 20, 3, padding=1, bias=True, **D), nn.BatchNorm2d(20, **D),
                        nn_activation(act_name, slope))
    with torch.no_grad():
        ref[1].weight.uniform_(0.8, 1.2)
        ref[1].bias.copy_(betas)
        ref[1].running_mean.normal_(0, 0.5)
        ref[1].running_var.uniform_(0.5, 2.0)
    fused = ConvBN2d.from_modules(ref[0], ref[1], memory_efficient, activation=ref[2])
    for mode in ("train", "eval"):
        ref.train(mode == "train"), fused.train(mode == "train")
        x = torch.randn(3, 3, 9, 9, **D)
        x_ref = x.clone().requires_grad_()
        x_fused = _layout(x, layout).requires_grad_()
        out_ref, out = ref(x_ref), fused(x_fused)
        assert_close_to_reference(out, out_ref, F64, f"{mode} output")
        # The data does reach every piece.
        if act_name == "relu6":
            assert (out_ref == 0).any() and (out_ref == 6).any() and ((out_ref > 0) & (out_ref < 6)).any()
        if act_name == "hardswish":
            z = copy.deepcopy(ref[:2])(x)  # (a copy: leaves the running statistics alone)
            assert (z < -3).any() and (z > 3).any() and ((z > -3) & (z < 0)).any() and ((z > 0) & (z < 3)).any()
        grad = torch.randn_like(out_ref)
        out_ref.backward(grad)
        out.backward(_layout(grad, layout))
        assert_close_to_reference(x_fused.grad, x_ref.grad, F64, f"{mode} grad input")
        for name, ref_p, fused_p in param_pairs(ref, fused, True, True):
            assert_close_to_reference(fused_p.grad, ref_p.grad, F64, f"{mode} grad {name}")
            ref_p.grad = fused_p.grad = None


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act_id", [a for a in ACTIVATION_IDS if BY_ID[a][0] in KINKS])
def test_derivatives_exactly_at_the_kinks_are_aten_s(act_id, layout, memory_efficient, device):
    """The activation's input exactly at each kink: a zero conv
    weight makes every channel constant, so batch norm gives exactly beta,
    which sits on the kinks. The derivative there is a convention; it must
    be ATen's (relu: 0 at 0; relu6: 0 at 0 and 6; leaky_relu: the slope at
    0; hardswish: 0 at -3, 1 at 3), as nn's triple computes it, in the fused
    kernels (training) and in the frozen-BN node (eval), on the CPU (17
    channels reach the kernels' vector loops and their tails) and on CUDA
    where there is one."""
    act_name, slope = BY_ID[act_id]
    betas = torch.tensor((list(KINKS[act_name]) * 17)[:17], **D)
    ref = nn.Sequential(nn.Conv2d(3, 17, 3, padding=1, bias=False, **D), nn.BatchNorm2d(17, **D),
                        nn_activation(act_name, slope))
    with torch.no_grad():
        ref[0].weight.zero_()
        ref[1].bias.copy_(betas)
        ref[1].running_mean.zero_()
        ref[1].running_var.fill_(1.0)
    fused = ConvBN2d.from_modules(ref[0], ref[1], memory_efficient, activation=ref[2]).to(device)
    for mode in ("train", "eval"):
        ref.train(mode == "train"), fused.train(mode == "train")
        x = torch.randn(2, 3, 5, 5, **D)
        x_ref, x_fused = x.clone().requires_grad_(), _layout(x.to(device), layout).requires_grad_()
        out_ref, out = ref(x_ref), fused(x_fused)
        torch.testing.assert_close(out.cpu(), out_ref)
        grad = torch.randn_like(out_ref)
        out_ref.backward(grad)
        out.backward(_layout(grad.to(device), layout))
        torch.testing.assert_close(x_fused.grad.cpu(), x_ref.grad, msg=lambda m: f"{mode} grad input: {m}")
        for name, ref_p, fused_p in param_pairs(ref, fused, False, True):
            torch.testing.assert_close(fused_p.grad.cpu(), ref_p.grad, msg=lambda m: f"{mode} grad {name}: {m}")
            ref_p.grad = fused_p.grad = None


@pytest.mark.parametrize("act_id", ACTIVATION_IDS)
def test_bfloat16_module_is_as_accurate_as_the_bfloat16_triple(act_id):
    """A bfloat16 module (the CPU kernels' scalar path) against the float64
    triple, within the error of the nn triple run in bfloat16: outputs and
    running statistics for every activation, gradients for the smooth ones.
    (bfloat16 cannot resolve a kink: an activation input within bfloat16's
    error of one takes the other piece's derivative in any bfloat16
    computation, an O(1) difference in that element's gradient that the
    triple in bfloat16 may or may not happen to share. The float32 and
    float64 grid cases check the piecewise activations' gradients.)"""
    act_name, slope = BY_ID[act_id]
    smooth = act_name not in KINKS
    bf16 = torch.bfloat16
    ref = make_triple("ConvBN2d", 6, 1, True, True, True, bf16, act_name, slope)
    lp = copy.deepcopy(ref).to(bf16)
    fused = ConvBN2d.from_modules(ref[0], ref[1], activation=copy.deepcopy(ref[2])).to(bf16)
    for mode in ("train", "eval"):
        for m in (ref, lp, fused):
            m.train(mode == "train")
        x = _round(torch.randn(3, 4, 6, 7, **D), bf16)
        x_ref, x_lp, x_fused = x.clone().requires_grad_(), x.to(bf16).requires_grad_(), x.to(bf16).requires_grad_()
        outs = [m(t) for m, t in ((ref, x_ref), (lp, x_lp), (fused, x_fused))]
        grad = _round(torch.randn_like(outs[0]), bf16)
        for out in outs:
            out.backward(grad.to(out.dtype))
        assert outs[2].dtype == bf16
        assert_as_accurate_as_pair(outs[2], outs[1], outs[0], bf16, f"{mode} output")
        if smooth:
            assert_as_accurate_as_pair(x_fused.grad, x_lp.grad, x_ref.grad, bf16, f"{mode} grad input")
        for (name, ref_p, fused_p), (_, lp_p, _) in zip(param_pairs(ref, fused, True, True),
                                                        param_pairs(lp, fused, True, True)):
            assert fused_p.grad.dtype == bf16
            if smooth:
                assert_as_accurate_as_pair(fused_p.grad, lp_p.grad, ref_p.grad, bf16, f"{mode} grad {name}")
            ref_p.grad = lp_p.grad = fused_p.grad = None
        if mode == "train":
            assert_as_accurate_as_pair(fused.running_var, lp[1].running_var, ref[1].running_var, bf16, "running_var")


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_cpu_autocast_bfloat16_with_silu(memory_efficient):
    """Under CPU autocast (bfloat16) the conv runs in bfloat16, the batch
    norm's parameters and statistics stay float32, and the output and grads
    are as close to the float64 triple as the nn triple under autocast."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0), bn.bias.normal_()
    fused = ConvBN2d.from_modules(conv, bn, memory_efficient, activation=nn.SiLU())
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.SiLU()).double()
    with torch.no_grad():  # the bfloat16 values autocast computes with
        ref[0].weight.copy_(conv.weight.bfloat16().double())
        ref[0].bias.copy_(conv.bias.bfloat16().double())
    x, grad = torch.randn(4, 4, 8, 8), torch.randn(4, 6, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
        out_pair = F.silu(bn(conv(x)))
    assert out.dtype == torch.bfloat16
    assert fused.running_mean.dtype == fused.running_var.dtype == torch.float32
    out.backward(grad.to(out.dtype))
    out_pair.backward(grad.to(out_pair.dtype))
    out_ref = ref(x.bfloat16().double())
    out_ref.backward(grad.double())
    assert fused.weight.grad.dtype == fused.bn_weight.grad.dtype == torch.float32
    bf16 = torch.bfloat16
    assert_as_accurate_as_pair(out, out_pair, out_ref, bf16, "autocast output")
    assert_as_accurate_as_pair(fused.running_var, bn.running_var, ref[1].running_var, bf16, "running_var")
    assert_as_accurate_as_pair(fused.weight.grad, conv.weight.grad, ref[0].weight.grad, bf16, "grad weight")
    assert_as_accurate_as_pair(fused.bn_weight.grad, bn.weight.grad, ref[1].weight.grad, bf16, "grad bn_weight")
    assert_as_accurate_as_pair(fused.bn_bias.grad, bn.bias.grad, ref[1].bias.grad, bf16, "grad bn_bias")

    for m in (fused, conv, bn, ref):
        m.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_pair = fused(x), F.silu(bn(conv(x)))
    assert out.dtype == torch.bfloat16
    assert_as_accurate_as_pair(out, out_pair, ref(x.bfloat16().double()), bf16, "autocast eval output")


# --- gradcheck and gradgradcheck ---------------------------------------------------

# name: (input shape, weight shape, stride, padding, dilation, groups, transposed, output_padding)
OP_CONFIGS = {
    "2d": ((2, 4, 4, 3), (4, 2, 3, 2), [2, 1], [1, 0], [1, 1], 2, False, []),
    "1d": ((3, 2, 5), (3, 2, 3), [2], [1], [1], 1, False, []),
    "3d": ((2, 2, 2, 3, 2), (2, 2, 2, 2, 1), [1, 1, 1], [0, 1, 0], [1, 1, 1], 1, False, []),
    "transposed_2d": ((2, 2, 3, 2), (2, 3, 2, 2), [2, 1], [1, 0], [1, 1], 1, True, [1, 0]),
}


def op_hyper(config):
    _, _, stride, padding, dilation, groups, transposed, output_padding = OP_CONFIGS[config]
    return (stride, padding, dilation, groups), (transposed, output_padding)


def op_tensors(config, seed, affine="both", with_bias=True, dtype=F64):
    """(input, weight, bias, bn_weight, bn_bias) for config, requiring grad;
    affine: 'both', 'weight_only', 'bias_only' or 'none'."""
    gen = torch.Generator().manual_seed(seed)
    x_shape, w_shape, _, _, _, groups, transposed, _ = OP_CONFIGS[config]
    out_ch = w_shape[1] * groups if transposed else w_shape[0]

    def leaf(t):
        return t.to(dtype).requires_grad_()
    return [
        leaf(torch.randn(*x_shape, generator=gen, **D)),
        leaf(torch.randn(*w_shape, generator=gen, **D)),
        leaf(torch.randn(out_ch, generator=gen, **D)) if with_bias else None,
        leaf(torch.rand(out_ch, generator=gen, **D) + 0.5) if affine in ("both", "weight_only") else None,
        leaf(torch.randn(out_ch, generator=gen, **D)) if affine in ("both", "bias_only") else None,
    ]


def reference_conv(config, x, w, b):
    (stride, padding, dilation, groups), (transposed, output_padding) = op_hyper(config)
    n = x.dim() - 2
    return torch.convolution(x, w, b, stride, padding, dilation, transposed, output_padding or [0] * n, groups)


def train_reference(config, x, w, b, g, beta, eps, act_name, slope):
    z = F.batch_norm(reference_conv(config, x, w, b), None, None, g, beta, True, 0.0, eps)
    return functional_activation(act_name, slope)(z), z


# Seeds whose data keeps every activation input 1e-3 away from any kink (checked).
TRAIN_SEED = {"2d": 0, "1d": 1, "3d": 2, "transposed_2d": 3}

# First and second order, as separate tests.
ORDERS = {"gradcheck": gradcheck, "gradgradcheck": gradgradcheck}

# Second order through silu: the differentiable backward must not call
# at::silu_backward, which has no derivative (it failed so once).


# (The second order runs the differentiable backward, the same in both memory modes.)
@pytest.mark.parametrize("memory_efficient,order", [(True, "gradcheck"), (False, "gradcheck"),
                                                    (True, "gradgradcheck")])
@pytest.mark.parametrize("act_id", ACTIVATION_IDS)
def test_train_op_gradcheck(act_id, memory_efficient, order):
    act_name, slope = BY_ID[act_id]
    config = "2d"
    tensors = op_tensors(config, TRAIN_SEED[config])
    hyper, (transposed, output_padding) = op_hyper(config)
    out, z = train_reference(config, *tensors, 1e-3, act_name, slope)
    assert_away_from_kinks(z, act_name)

    def fn(*ts):
        return OPS.conv_bn_train(*ts, *hyper, 1e-3, memory_efficient, transposed, output_padding, act_name,
                                 slope)[0]
    assert_close_to_reference(fn(*tensors), out, F64, "output")
    assert ORDERS[order](fn, tuple(tensors))


# Each activation in two of the other rank / transposed configs.
OTHER_CONFIG_CASES = [(act_id, config) for i, act_id in enumerate(ACTIVATION_IDS)
                      for config in [["1d", "3d", "transposed_2d"][i % 3], ["1d", "3d", "transposed_2d"][(i + 1) % 3]]]


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("act_id,config", OTHER_CONFIG_CASES)
def test_train_op_gradcheck_other_ranks_and_transposed(act_id, config, order):
    act_name, slope = BY_ID[act_id]
    tensors = op_tensors(config, TRAIN_SEED[config])
    hyper, (transposed, output_padding) = op_hyper(config)
    out, z = train_reference(config, *tensors, 1e-5, act_name, slope)
    assert_away_from_kinks(z, act_name)

    def fn(*ts):
        return OPS.conv_bn_train(*ts, *hyper, 1e-5, True, transposed, output_padding, act_name, slope)[0]
    assert_close_to_reference(fn(*tensors), out, F64, "output")
    assert ORDERS[order](fn, tuple(tensors))


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("affine", ["weight_only", "bias_only", "none"])
@pytest.mark.parametrize("act_id", ["relu", "leaky_relu_-0.5", "silu", "hardswish"])
def test_functional_gradcheck_with_partial_affine(act_id, affine, order):
    """convbn.functional.conv_bn with only gamma, only beta, or neither (the
    activation's input is gamma * xhat + beta with the missing one 1 or 0),
    no conv bias, running statistics updated along the way."""
    act_name, slope = BY_ID[act_id]
    x, w, _, g, beta = op_tensors("2d", 4, affine=affine, with_bias=False)
    (stride, padding, dilation, groups), _ = op_hyper("2d")
    out_ref, z = train_reference("2d", x, w, None, g, beta, 1e-5, act_name, slope)
    assert_away_from_kinks(z, act_name)
    mean, var = torch.zeros(w.shape[0], **D), torch.ones(w.shape[0], **D)
    present = [t for t in (x, w, g, beta) if t is not None]

    def fn(*ts):
        it = iter(ts)
        args = [next(it) if t is not None else None for t in (x, w, g, beta)]
        return convbn.functional.conv_bn(
            args[0], args[1], None, args[2], args[3], mean, var, None, True, 0.1, 1e-5, stride, padding, dilation,
            groups, True, activation=act_name, negative_slope=slope)
    assert_close_to_reference(fn(*present), out_ref, F64, "output")
    assert ORDERS[order](fn, tuple(present))


EVAL_SEED = {"2d": 10, "transposed_2d": 11}


def eval_reference(config, x, w, b, g, beta, mean, var, eps, act_name, slope):
    z = F.batch_norm(reference_conv(config, x, w, b), mean, var, g, beta, False, 0.0, eps)
    return functional_activation(act_name, slope)(z), z


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("config", ["2d", "transposed_2d"])
@pytest.mark.parametrize("act_id", ACTIVATION_IDS)
def test_eval_op_gradcheck(act_id, config, order):
    """conv_bn_eval's own node (frozen batch norm: running statistics not
    requiring grad), which recomputes the conv output to differentiate the
    activation."""
    act_name, slope = BY_ID[act_id]
    tensors = op_tensors(config, EVAL_SEED[config])
    out_ch = tensors[3].numel()
    gen = torch.Generator().manual_seed(5)
    mean, var = torch.randn(out_ch, generator=gen, **D), torch.rand(out_ch, generator=gen, **D) + 0.5
    hyper, (transposed, output_padding) = op_hyper(config)
    out_ref, z = eval_reference(config, *tensors, mean, var, 1e-3, act_name, slope)
    assert_away_from_kinks(z, act_name)

    def fn(*ts):
        return OPS.conv_bn_eval(*ts, mean, var, *hyper, 1e-3, transposed, output_padding, act_name, slope)
    assert_close_to_reference(fn(*tensors), out_ref, F64, "output")
    assert ORDERS[order](fn, tuple(tensors))


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("act_id", ["relu6", "leaky_relu_-0.5", "silu", "sigmoid"])
def test_eval_op_gradcheck_through_the_running_statistics(act_id, order):
    """The same node with the running statistics differentiated too."""
    act_name, slope = BY_ID[act_id]
    tensors = op_tensors("2d", EVAL_SEED["2d"])
    gen = torch.Generator().manual_seed(5)
    mean = torch.randn(4, generator=gen, **D).requires_grad_()
    var = (torch.rand(4, generator=gen, **D) + 0.5).requires_grad_()
    hyper, _ = op_hyper("2d")
    _, z = eval_reference("2d", *tensors, mean.detach(), var.detach(), 1e-3, act_name, slope)
    assert_away_from_kinks(z, act_name)

    def fn(*ts):
        return OPS.conv_bn_eval(*ts, *hyper, 1e-3, False, [], act_name, slope)
    assert ORDERS[order](fn, (*tensors, mean, var))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("act_id", ["relu", "leaky_relu_0.2", "silu", "gelu"])
def test_module_double_backward_matches_the_triple(act_id, mode):
    """A module in training, and in eval with weights that train (frozen
    batch norm), differentiated twice (the squared norm of the first
    gradients), against the nn triple in float64."""
    act_name, slope = BY_ID[act_id]
    ref = make_triple("ConvBN2d", 6, 2, True, True, True, F64, act_name, slope)
    fused = ConvBN2d.from_modules(ref[0], ref[1], activation=copy.deepcopy(ref[2]))
    ref.train(mode == "train"), fused.train(mode == "train")
    x = torch.randn(2, 4, 6, 7, **D)
    results = []
    for model in (fused, ref):
        xi = x.clone().requires_grad_()
        params = [xi, *model.parameters()]
        out = model(xi)
        weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(1), **D)
        first = torch.autograd.grad((out * weights).sum(), params, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in first), params, allow_unused=True)
        results.append([*first, *[torch.zeros_like(p) if s is None else s for p, s in zip(params, second)]])
    for i, (ours, theirs) in enumerate(zip(*results)):
        assert_close_to_reference(ours, theirs, F64, f"gradient {i}")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("trains", ["conv_only", "bn_only", "bn_bias_only", "input_only"])
@pytest.mark.parametrize("act_id", ["relu", "leaky_relu_-0.5", "silu", "hardswish"])
def test_gradients_when_only_some_tensors_train(act_id, trains, mode):
    """Frozen parts (batch norm's affine frozen while the conv trains, the
    reverse, only beta, only the input): the gradients that are asked for
    are the triple's, and the frozen ones stay None."""
    act_name, slope = BY_ID[act_id]
    ref = make_triple("ConvBN2d", 6, 1, True, True, True, F64, act_name, slope)
    fused = ConvBN2d.from_modules(ref[0], ref[1], activation=copy.deepcopy(ref[2]))
    ref.train(mode == "train"), fused.train(mode == "train")
    training = {"conv_only": {"weight", "bias"}, "bn_only": {"bn_weight", "bn_bias"}, "bn_bias_only": {"bn_bias"},
                "input_only": set()}[trains]
    pairs = param_pairs(ref, fused, True, True)
    for name, ref_p, fused_p in pairs:
        ref_p.requires_grad_(name in training), fused_p.requires_grad_(name in training)
    x = torch.randn(3, 4, 6, 7, **D)
    x_ref, x_fused = x.clone().requires_grad_(trains == "input_only"), x.clone().requires_grad_(trains == "input_only")
    out_ref, out = ref(x_ref), fused(x_fused)
    assert_close_to_reference(out, out_ref, F64, "output")
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad), out.backward(grad)
    if trains == "input_only":
        assert_close_to_reference(x_fused.grad, x_ref.grad, F64, "grad input")
    for name, ref_p, fused_p in pairs:
        if name in training:
            assert_close_to_reference(fused_p.grad, ref_p.grad, F64, f"grad {name}")
        else:
            assert fused_p.grad is None, name


# --- the backward operator ---------------------------------------------------------

@pytest.mark.parametrize("config", ["2d", "1d", "transposed_2d"])
@pytest.mark.parametrize("act_id", ["relu", "leaky_relu_-0.5", "silu", "hardswish", "sigmoid", "gelu"])
def test_backward_op_matches_autograd_through_the_triple(act_id, config):
    """conv_bn_train_backward with bn_bias and the activation, with the conv
    output kept or recomputed, and output masks: against autograd through
    F.batch_norm and the activation; the mask leaves out what it says."""
    act_name, slope = BY_ID[act_id]
    x, w, b, g, beta = op_tensors(config, 21)
    hyper, (transposed, output_padding) = op_hyper(config)
    out, mean, invstd, conv_out = OPS.conv_bn_train(x, w, b, g, beta, *hyper, 1e-5, False, transposed,
                                                    output_padding, act_name, slope)
    grad = torch.randn_like(out)
    ref, _ = train_reference(config, x, w, b, g, beta, 1e-5, act_name, slope)
    expected = torch.autograd.grad(ref, [x, w, b, g, beta], grad)
    names = ["input", "weight", "bias", "bn_weight", "bn_bias"]
    for kept in (None, conv_out.detach()):
        for mask in ([True] * 5, [True, False, False, True, False], [False, True, True, False, True]):
            with torch.no_grad():
                got = OPS.conv_bn_train_backward(
                    grad, x, w, b, g, kept, mean, invstd, *hyper, 1e-5, mask, transposed, output_padding,
                    bn_bias=beta, activation=act_name, negative_slope=slope)
            for name, wanted, ours, want in zip(names, mask, got, expected):
                if wanted:
                    assert_close_to_reference(ours, want, F64, f"grad {name}")
                else:
                    assert ours is None or ours.numel() == 0 or not ours.any(), name


# --- forward-mode AD and torch.func on the eval operator ----------------------------

@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("act_id", ACTIVATION_IDS)
def test_eval_forward_mode_ad_matches_the_triple(act_id):
    """Dual tensors through conv_bn_eval with an activation (its composite
    is differentiated as written): the tangent is the nn triple's, as for
    nn.LeakyReLU with any slope."""
    import torch.autograd.forward_ad as fwAD

    act_name, slope = BY_ID[act_id]
    x, w, b, g, beta = (t.detach() for t in op_tensors("2d", EVAL_SEED["2d"]))
    mean, var = torch.randn(4, **D), torch.rand(4, **D) + 0.5
    hyper, _ = op_hyper("2d")
    tangents = [torch.randn_like(v) for v in (x, w, g)]
    with fwAD.dual_level():
        xd, wd, gd = (fwAD.make_dual(v, dv) for v, dv in zip((x, w, g), tangents))
        # leaky_relu with a negative slope: autograd refuses the in-place
        # form, which the eval composite once applied.
        ours = fwAD.unpack_dual(OPS.conv_bn_eval(xd, wd, b, gd, beta, mean, var, *hyper, 1e-3, False, [],
                                                 act_name, slope))
        theirs = fwAD.unpack_dual(eval_reference("2d", xd, wd, b, gd, beta, mean, var, 1e-3, act_name, slope)[0])
    assert_close_to_reference(ours.primal, theirs.primal, F64, "primal")
    assert_close_to_reference(ours.tangent, theirs.tangent, F64, "tangent")


@pytest.mark.parametrize("act_id", ["relu", "leaky_relu_0.2", "leaky_relu_-0.5", "silu", "gelu"])
def test_torch_func_grad_of_the_eval_op_matches_the_triple(act_id):
    act_name, slope = BY_ID[act_id]
    x, w, _, g, beta = (None if t is None else t.detach() for t in op_tensors("2d", EVAL_SEED["2d"]))
    mean, var = torch.randn(4, **D), torch.rand(4, **D) + 0.5
    hyper, _ = op_hyper("2d")

    def loss(w):
        return OPS.conv_bn_eval(x, w, None, g, beta, mean, var, *hyper, 1e-5, False, [], act_name,
                                slope).square().sum()

    def loss_ref(w):
        return eval_reference("2d", x, w, None, g, beta, mean, var, 1e-5, act_name, slope)[0].square().sum()
    assert_close_to_reference(torch.func.grad(loss)(w), torch.func.grad(loss_ref)(w), F64, "grad")


# --- opcheck -----------------------------------------------------------------------

def _opcheck_tensors(channels_last):
    x, w, b, g, beta = op_tensors("2d", 30, dtype=torch.float32)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    return x, w, b, g, beta


OPCHECK_CASES = [("silu", False), ("leaky_relu_-0.5", True), ("gelu", True)]


@pytest.mark.parametrize("act_id,channels_last", OPCHECK_CASES)
def test_opcheck_train_with_an_activation(act_id, channels_last):
    """Schema, autograd registration, fake kernel and AOT dispatch (dynamic
    shapes) of conv_bn_train with a non-identity activation."""
    act_name, slope = BY_ID[act_id]
    x, w, b, g, beta = _opcheck_tensors(channels_last)
    hyper, _ = op_hyper("2d")
    for memory_efficient in (True, False):
        opcheck(OPS.conv_bn_train.default,
                (x, w, b, g, beta, *hyper, 1e-5, memory_efficient, False, [], act_name, slope))


@pytest.mark.parametrize("act_id,channels_last", OPCHECK_CASES)
def test_opcheck_train_backward_with_an_activation(act_id, channels_last):
    """conv_bn_train_backward with bn_bias and the activation, the conv
    output recomputed or kept (test_aot_dispatch_dynamic differentiates
    the backward op itself)."""
    act_name, slope = BY_ID[act_id]
    x, w, b, g, beta = _opcheck_tensors(channels_last)
    hyper, _ = op_hyper("2d")
    out, mean, invstd, conv_out = OPS.conv_bn_train(x, w, b, g, beta, *hyper, 1e-5, False, False, [], act_name,
                                                    slope)
    grad = torch.randn_like(out).requires_grad_()
    for conv_output, mask in ((None, [True] * 5), (conv_out.detach(), [True, False, False, True, True])):
        opcheck(OPS.conv_bn_train_backward.default,
                (grad, x, w, b, g, conv_output, mean, invstd, *hyper, 1e-5, mask, False, [], beta, act_name, slope))


@pytest.mark.parametrize("act_id,channels_last", OPCHECK_CASES)
def test_opcheck_eval_with_an_activation(act_id, channels_last):
    act_name, slope = BY_ID[act_id]
    x, w, b, g, beta = _opcheck_tensors(channels_last)
    hyper, _ = op_hyper("2d")
    stats = (torch.randn(4), torch.rand(4) + 0.5)
    opcheck(OPS.conv_bn_eval.default, (x, w, b, g, beta, *stats, *hyper, 1e-5, False, [], act_name, slope))


# --- what is kept for backward -------------------------------------------------------

def _memory_layer(act_name, memory_efficient=True):
    torch.manual_seed(0)
    layer = ConvBN2d(4, 8, 3, padding=1, bias=True, memory_efficient=memory_efficient, activation=act_name)
    with torch.no_grad():
        layer.bn_weight.uniform_(0.5, 1.5), layer.bn_bias.uniform_(-1, 1)
        layer.running_mean.normal_(0, 0.5), layer.running_var.uniform_(0.5, 2.0)
    return layer, torch.randn(4, 4, 12, 12, requires_grad=True)


@pytest.mark.parametrize("act_name", ["silu", "relu", "sigmoid", "gelu"])
def test_memory_efficient_training_keeps_no_output_sized_tensor(act_name):
    layer, x = _memory_layer(act_name)
    out, kept = saved_tensors(lambda: layer(x))
    out_bytes = out.numel() * out.element_size()
    own = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters()]}
    for t in kept:  # the input, the parameters, per-channel vectors
        assert t.untyped_storage().data_ptr() in own or t.numel() == 8, tuple(t.shape)
    assert saved_tensor_bytes(lambda: layer(x), exclude=[x, *layer.parameters()]) <= 4 * 8 * 8
    # The eager nn chain keeps the conv output (for the batch norm) and the
    # batch norm's output (for the activation): two output-sized tensors.
    conv, bn, act = layer.to_modules()
    _, pair_kept = saved_tensors(lambda: act(bn(conv(x))))
    assert sum(t.numel() == out.numel() for t in pair_kept) >= 2
    assert (saved_tensor_bytes(lambda: act(bn(conv(x))))
            - saved_tensor_bytes(lambda: layer(x))) >= 2 * out_bytes

    # memory_efficient=False keeps the conv output only: neither the batch
    # norm's output nor the activation's.
    keep, _ = _memory_layer(act_name, memory_efficient=False)
    _, kept = saved_tensors(lambda: keep(x))
    assert sum(t.numel() == out.numel() for t in kept) == 1
    assert saved_tensor_bytes(lambda: keep(x), exclude=[x, *keep.parameters()]) <= out_bytes + 4 * 8 * 8


@pytest.mark.parametrize("act_name", ["silu", "relu", "hardswish"])
def test_frozen_batch_norm_keeps_no_output_sized_tensor(act_name):
    """Eval mode with weights that train: the input, the layer's own
    tensors and per-channel vectors; the activation's input is recomputed."""
    layer, x = _memory_layer(act_name)
    layer.eval()
    out, kept = saved_tensors(lambda: layer(x))
    own = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters(), *layer.buffers()]}
    extra = [t for t in kept if t.untyped_storage().data_ptr() not in own and t.numel() != 8]
    assert not extra, [tuple(t.shape) for t in extra]
    assert saved_tensor_bytes(lambda: layer(x), exclude=[x, *layer.parameters()]) <= 4 * 8 * 8
    pair = nn.Sequential(*layer.to_modules()).eval()
    assert saved_tensor_bytes(lambda: pair(x)) - saved_tensor_bytes(lambda: layer(x)) >= \
        out.numel() * out.element_size()


# --- TorchScript, torch.export, torch.compile ------------------------------------------

def _script(obj):
    """torch.jit.script(obj); skips (saying why) where this torch refuses TorchScript altogether."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.jit.script(_probe)
        except Exception as error:
            pytest.skip(f"torch {torch.__version__} refuses torch.jit.script: {error}")
        return torch.jit.script(obj)


def _probe(x: torch.Tensor) -> torch.Tensor:
    return x + 1


def _trained_like(layer):
    with torch.no_grad():
        layer.bn_weight.uniform_(0.5, 2.5), layer.bn_bias.normal_(0, 1.5)
        layer.running_mean.normal_(0, 0.5), layer.running_var.uniform_(0.5, 2.0)
    return layer


def _outputs_and_input_grads(models, x, grad):
    """[(output, input grad)] of each model on its own copy of x, one
    backward of grad each."""
    results = []
    for model in models:
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.backward(grad)
        results.append((out.detach(), xi.grad))
    return results


@pytest.mark.filterwarnings(r"ignore::DeprecationWarning:torch\.jit")
def test_scripted_module_matches_eager_and_the_triple():
    torch.manual_seed(0)
    eager = _trained_like(ConvBN2d(3, 6, 3, padding=1, groups=3, bias=True, activation="hardswish", **D))
    triple = nn.Sequential(*eager.to_modules())
    assert isinstance(triple[2], nn.Hardswish)
    scripted = _script(copy.deepcopy(eager))
    for step in range(2):
        x = torch.randn(3, 3, 7, 7, **D) * 2
        grad = torch.randn(3, 6, 7, 7, **D)
        (ys, gs), (ye, ge), (yt, gt) = _outputs_and_input_grads((scripted, eager, triple), x, grad)
        torch.testing.assert_close(ys, ye, rtol=0, atol=0)
        torch.testing.assert_close(gs, ge, rtol=0, atol=0)
        assert_close_to_reference(ys, yt, F64, f"output, step {step}")
        assert_close_to_reference(gs, gt, F64, f"grad input, step {step}")
        torch.testing.assert_close(scripted.weight.grad, eager.weight.grad, rtol=0, atol=0)
        assert_close_to_reference(scripted.bn_bias.grad, triple[1].bias.grad, F64, "grad bn_bias")
        torch.testing.assert_close(scripted.running_var, eager.running_var, rtol=0, atol=0)
        assert_close_to_reference(scripted.running_var, triple[1].running_var, F64, "running_var")
    for model in (scripted, eager, triple):
        model.eval()
    x = torch.randn(2, 3, 7, 7, **D)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), rtol=0, atol=0)
        assert_close_to_reference(scripted(x), triple(x), F64, "eval output")


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
@pytest.mark.parametrize("act_id", ["gelu", "leaky_relu_-0.5"])
def test_exported_eval_module_matches_eager_and_the_triple(act_id):
    act_name, slope = BY_ID[act_id]
    torch.manual_seed(0)
    layer = _trained_like(ConvBN2d(3, 6, 3, padding=1, bias=True, activation=act_name, negative_slope=slope,
                                   **D)).eval()
    triple = nn.Sequential(*layer.to_modules()).eval()
    example = torch.randn(2, 3, 6, 6, **D)
    exported = torch.export.export(layer, (example,),
                                   dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=64)}})
    programs = {"exported": exported.module(), "decomposed": exported.run_decompositions().module()}
    for n in (2, 5):
        x = torch.randn(n, 3, 6, 6, **D)
        with torch.no_grad():
            for name, program in programs.items():
                y = program(x)
                torch.testing.assert_close(y, layer(x), rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
                assert_close_to_reference(y, triple(x), F64, f"{name} against the triple (batch {n})")


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_training_with_silu_matches_eager(fresh_dynamo):
    """torch.compile(fullgraph=True) (Inductor) of a training module with
    activation='silu': output, input and parameter grads and running
    statistics as eager (the operators are opaque: bit-identical), and close
    to the nn triple."""
    torch.manual_seed(0)
    eager = _trained_like(ConvBN2d(3, 6, 3, padding=1, activation="silu", **D))
    net = copy.deepcopy(eager)
    triple = nn.Sequential(*eager.to_modules())
    compiled = torch.compile(net, fullgraph=True)
    for n in (4, 5):
        x, grad = torch.randn(n, 3, 8, 8, **D), torch.randn(n, 6, 8, 8, **D)
        (yc, gc), (ye, ge), (yt, gt) = _outputs_and_input_grads((compiled, eager, triple), x, grad)
        torch.testing.assert_close(yc, ye, rtol=0, atol=0)
        torch.testing.assert_close(gc, ge, rtol=0, atol=0)
        assert_close_to_reference(yc, yt, F64, f"output (batch {n})")
        assert_close_to_reference(gc, gt, F64, f"grad input (batch {n})")
        for (name, p_c), p_e in zip(net.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=0, atol=0, msg=lambda m: f"grad {name}: {m}")
        assert_close_to_reference(net.bn_weight.grad, triple[1].weight.grad, F64, "grad bn_weight")
        torch.testing.assert_close(net.running_var, eager.running_var, rtol=0, atol=0)
        assert_close_to_reference(net.running_mean, triple[1].running_mean, F64, "running_mean")
    assert int(net.num_batches_tracked) == 2


def test_compiled_frozen_batch_norm_with_leaky_relu_matches_the_triple(fresh_dynamo):
    """torch.compile (AOT autograd, no Inductor codegen) of an eval-mode
    module with weights that train, negative slope: forward and backward
    against the triple."""
    torch.manual_seed(0)
    layer = _trained_like(ConvBN2d(3, 6, 3, padding=1, bias=True, activation="leaky_relu", negative_slope=-0.5,
                                   **D)).eval()
    triple = nn.Sequential(*layer.to_modules()).eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 3, 6, 6, **D)
    grad = torch.randn(3, 6, 6, 6, **D)
    grads = []
    for model in (compiled, triple):
        xi = x.clone().requires_grad_()
        out = model(xi)
        grads.append([out.detach(), *torch.autograd.grad(out, [xi, *model.parameters()], grad)])
    for i, (ours, theirs) in enumerate(zip(*grads)):
        assert_close_to_reference(ours, theirs, F64, f"result {i}")


# --- errors --------------------------------------------------------------------------

BAD = [
    (dict(activation="tanh"), r"activation.*'tanh'"),
    (dict(activation="GELU"), r"activation.*'GELU'"),
    (dict(activation="leaky_relu", negative_slope=float("nan")), r"negative_slope.*nan"),
    (dict(activation="relu", negative_slope=float("inf")), r"negative_slope.*inf"),
]
BAD_IDS = ["tanh", "GELU", "nan_slope", "inf_slope"]


def _bad(kwargs):
    return kwargs.get("activation", "identity"), kwargs.get("negative_slope", 0.01)


@pytest.mark.parametrize("cls", [ConvBN1d, ConvBN2d, ConvBN3d, ConvTransposeBN1d, ConvTransposeBN2d,
                                 ConvTransposeBN3d, convbn.SyncConvBN2d])
@pytest.mark.parametrize("kwargs,match", BAD, ids=BAD_IDS)
def test_module_constructor_rejects_a_bad_activation(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(4, 6, 3, **kwargs)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kwargs,match", BAD, ids=BAD_IDS)
def test_functional_and_operators_reject_a_bad_activation(kwargs, match, training):
    act_name, slope = _bad(kwargs)
    x, w, b, g, beta = op_tensors("2d", 0, dtype=torch.float32)
    hyper, _ = op_hyper("2d")
    mean, var = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match=match):
        convbn.functional.conv_bn(x, w, b, g, beta, mean, var, None, training, 0.1, 1e-5, hyper[0], hyper[1],
                                  hyper[2], hyper[3], True, activation=act_name, negative_slope=slope)
    assert torch.equal(mean, torch.zeros(4)) and torch.equal(var, torch.ones(4))
    for grad_mode in (True, False):  # through the autograd node, and below it
        with torch.set_grad_enabled(grad_mode):
            with pytest.raises(ValueError, match=match):
                if training:
                    OPS.conv_bn_train(x, w, b, g, beta, *hyper, 1e-5, True, False, [], act_name, slope)
                else:
                    OPS.conv_bn_eval(x, w, b, g, beta, mean, var, *hyper, 1e-5, False, [], act_name, slope)
    if training:
        out, m, s, _ = OPS.conv_bn_train(x, w, b, g, beta, *hyper, 1e-5, True)
        with pytest.raises(ValueError, match=match):
            OPS.conv_bn_train_backward(torch.ones_like(out), x, w, b, g, None, m, s, *hyper, 1e-5, [True] * 5,
                                       False, [], beta, act_name, slope)
    # The fake kernels (torch.compile, torch.export) raise the same error.
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fakes = [mode.from_tensor(t.detach()) for t in (x, w, b, g, beta, mean, var)]
    with mode, pytest.raises(ValueError, match=match):
        if training:
            OPS.conv_bn_train(*fakes[:5], *hyper, 1e-5, True, False, [], act_name, slope)
        else:
            OPS.conv_bn_eval(*fakes, *hyper, 1e-5, False, [], act_name, slope)


@pytest.mark.parametrize("activation", [
    nn.Tanh(), nn.GELU(approximate="tanh"), nn.Hardtanh(-1.0, 1.0), nn.ELU(), nn.Mish(),
    type("MyReLU", (nn.ReLU,), {})(),
], ids=["Tanh", "GELU_tanh", "Hardtanh_-1_1", "ELU", "Mish", "ReLU_subclass"])
def test_from_modules_rejects_other_activations(activation):
    conv, bn = nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)
    with pytest.raises(TypeError, match="activation"):
        ConvBN2d.from_modules(conv, bn, activation=activation)


# --- NaN propagation -------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act_id", ACTIVATION_IDS)
def test_a_nan_shift_propagates_through_the_activation(act_id, layout):
    """A NaN batch-norm shift on one channel: that channel's output is NaN
    everywhere (as nn's activations propagate NaN: relu(NaN) is NaN, not 0),
    the others are finite and match, in training and eval, in the vector
    loops and their tails."""
    act_name, slope = BY_ID[act_id]
    ref = make_triple("ConvBN2d", 18, 1, False, True, True, F64, act_name, slope)
    with torch.no_grad():
        ref[1].bias[5] = float("nan")
    fused = ConvBN2d.from_modules(ref[0], ref[1], activation=copy.deepcopy(ref[2]))
    for mode in ("train", "eval"):
        ref.train(mode == "train"), fused.train(mode == "train")
        x = torch.randn(2, 4, 9, 9, **D)
        with torch.no_grad():
            expected, out = ref(x), fused(_layout(x, layout))
        assert expected[:, 5].isnan().all()
        assert out[:, 5].isnan().all(), f"{mode}: NaN lost in channel 5"
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_a_nan_input_propagates_through_relu(mode, memory_efficient):
    """A NaN in the input propagates to the output as the nn triple with
    nn.ReLU propagates it (in eval, exactly at the positions it reaches)."""
    ref = make_triple("ConvBN2d", 6, 1, True, True, True, F64, "relu", 0.01)
    fused = ConvBN2d.from_modules(ref[0], ref[1], memory_efficient, activation=nn.ReLU())
    ref.train(mode == "train"), fused.train(mode == "train")
    x = torch.randn(2, 4, 6, 7, **D)
    x[1, 2, 3, 3] = float("nan")
    with torch.no_grad():
        expected, out = ref(x), fused(x)
    if mode == "eval":  # only where the conv reaches the NaN
        assert expected.isnan().any() and not expected.isnan().all()
    else:  # the batch statistics of every channel are NaN
        assert expected.isnan().all()
    torch.testing.assert_close(out.isnan(), expected.isnan())
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9, equal_nan=True)


# --- from_modules, to_modules, state_dict, repr, unfuse ----------------------------------

@pytest.mark.parametrize("module,expected", [
    (None, ("identity", 0.01)),
    (nn.Identity(), ("identity", 0.01)),
    (nn.ReLU(inplace=True), ("relu", 0.01)),
    (nn.ReLU6(), ("relu6", 0.01)),
    (nn.Hardtanh(0.0, 6.0), ("relu6", 0.01)),
    (nn.LeakyReLU(0.3), ("leaky_relu", 0.3)),
    (nn.LeakyReLU(-0.5, inplace=True), ("leaky_relu", -0.5)),
    (nn.SiLU(inplace=True), ("silu", 0.01)),
    (nn.Hardswish(), ("hardswish", 0.01)),
    (nn.Sigmoid(), ("sigmoid", 0.01)),
    (nn.GELU(), ("gelu", 0.01)),
], ids=["None", "Identity", "ReLU_inplace", "ReLU6", "Hardtanh_0_6", "LeakyReLU_0.3", "LeakyReLU_-0.5_inplace",
        "SiLU_inplace", "Hardswish", "Sigmoid", "GELU"])
def test_from_modules_and_to_modules_round_trip(module, expected):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=True, **D), nn.BatchNorm2d(6, **D)
    randomize = _trained_like
    fused = randomize(ConvBN2d.from_modules(conv, bn, activation=module))
    assert (fused.activation, fused.negative_slope) == expected
    act_module = fused.activation_module()
    modules = fused.to_modules()
    if expected[0] == "identity":
        assert len(modules) == 2 and isinstance(act_module, nn.Identity)
        assert "activation" not in repr(fused)
    else:
        assert len(modules) == 3 and type(modules[2]) is type(act_module)
        assert f"activation='{expected[0]}'" in repr(fused)
        assert ("negative_slope" in repr(fused)) == (expected[0] == "leaky_relu")
    if expected[0] == "leaky_relu":
        assert modules[2].negative_slope == expected[1]
        assert f"negative_slope={expected[1]}" in repr(fused)
    # A round trip keeps everything.
    again = ConvBN2d.from_modules(modules[0], modules[1], activation=modules[2] if len(modules) == 3 else None)
    assert repr(again) == repr(fused)
    assert again.state_dict().keys() == fused.state_dict().keys()
    for k, v in fused.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    # The chain computes what the module does (and what `module` after the pair does).
    x = torch.randn(2, 4, 5, 5, **D)
    chain = nn.Sequential(*modules)
    reference = nn.Sequential(copy.deepcopy(modules[0]), copy.deepcopy(modules[1]),
                              copy.deepcopy(module) if module is not None else nn.Identity())
    for mode in (True, False):
        for m in (fused, chain, reference):
            m.train(mode)
        y = fused(x)
        assert_close_to_reference(y, chain(x), F64, f"to_modules chain (training={mode})")
        assert_close_to_reference(y, reference(x.clone()), F64, f"from_modules' module (training={mode})")


@pytest.mark.parametrize("act_id", [a for a in ACTIVATION_IDS if a != "identity"])
def test_the_activation_adds_no_state(act_id):
    act_name, slope = BY_ID[act_id]
    torch.manual_seed(0)
    plain = _trained_like(ConvBN2d(4, 6, 3, bias=True, **D))
    fused = ConvBN2d(4, 6, 3, bias=True, activation=act_name, negative_slope=slope, **D)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    # Checkpoints move between the two, and from/to the nn triple's conv + bn.
    fused.load_state_dict(plain.state_dict())
    conv, bn, act = fused.to_modules()
    triple = nn.Sequential(conv, bn, act)
    mapping = {"weight": "0.weight", "bias": "0.bias", "bn_weight": "1.weight", "bn_bias": "1.bias",
               "running_mean": "1.running_mean", "running_var": "1.running_var",
               "num_batches_tracked": "1.num_batches_tracked"}
    assert sorted(triple.state_dict()) == sorted(mapping[k] for k in fused.state_dict())
    for k, v in fused.state_dict().items():
        assert torch.equal(triple.state_dict()[mapping[k]], v), k
    assert list(fused.buffers()) and len(list(fused.parameters())) == len(list(plain.parameters()))
    plain.load_state_dict(fused.state_dict())


def test_activation_module_follows_train_and_eval():
    layer = ConvBN2d(4, 6, 3, activation="leaky_relu", negative_slope=0.25)
    assert layer.activation_module().training and isinstance(layer.activation_module(), nn.LeakyReLU)
    assert not layer.eval().activation_module().training
    assert layer.activation_module().negative_slope == 0.25
    assert layer.to_modules()[2].negative_slope == 0.25 and not layer.to_modules()[2].training


@pytest.mark.parametrize("act_id", ["relu", "silu", "leaky_relu_-0.5"])
def test_unfuse_keeps_the_activation(act_id):
    """convbn.unfuse on a model holding a hand-built module with an
    activation gives a model that computes the same."""
    act_name, slope = BY_ID[act_id]
    torch.manual_seed(0)
    model = nn.Sequential(_trained_like(ConvBN2d(3, 4, 3, padding=1, activation=act_name, negative_slope=slope,
                                                 **D)), nn.Flatten())
    x = torch.randn(2, 3, 5, 5, **D)
    for mode in (False, True):
        model.train(mode)
        unfused = convbn.unfuse(model)
        assert not any(isinstance(m, ConvBN2d) for m in unfused.modules())
        with torch.no_grad():
            assert_close_to_reference(unfused(x), copy.deepcopy(model)(x), F64, f"training={mode}")


def test_empty_batch_with_an_activation():
    """An empty batch in training: an empty output, zero grads, the running
    statistics as they were and the batch counted, as the nn triple."""
    ref = make_triple("ConvBN2d", 6, 1, True, True, True, F64, "silu", 0.01)
    fused = ConvBN2d.from_modules(ref[0], ref[1], activation=nn.SiLU())
    x = torch.randn(0, 4, 6, 7, **D, requires_grad=True)
    out, out_ref = fused(x), ref(x)
    assert out.shape == out_ref.shape == (0, 6, 3, 5)
    out.sum().backward()
    assert not fused.weight.grad.any() and not fused.bn_bias.grad.any()
    assert fused.num_batches_tracked.item() == ref[1].num_batches_tracked.item() == 1
    assert torch.equal(fused.running_mean, ref[1].running_mean)


# --- the Sync variants ------------------------------------------------------------------

def test_sync_module_keeps_the_activation_and_computes_alone_without_a_group():
    """SyncConvBN2d takes the activation; from_conv_bn and
    convert_sync_batchnorm keep it; without torch.distributed initialized it
    computes as the nn triple."""
    torch.manual_seed(0)
    layer = _trained_like(ConvBN2d(4, 6, 3, padding=1, activation="leaky_relu", negative_slope=0.3, **D))
    sync = convbn.SyncConvBN2d.from_conv_bn(layer)
    assert (sync.activation, sync.negative_slope) == ("leaky_relu", 0.3)
    assert "negative_slope=0.3" in repr(sync)
    converted = convbn.convert_sync_batchnorm(nn.Sequential(copy.deepcopy(layer)))
    assert isinstance(converted[0], convbn.SyncConvBN2d) and converted[0].activation == "leaky_relu"
    built = convbn.SyncConvBN1d(4, 6, 3, activation="gelu")
    assert built.activation == "gelu" and isinstance(built.to_modules()[2], nn.GELU)
    triple = nn.Sequential(*layer.to_modules())
    x = torch.randn(3, 4, 6, 6, **D)
    xs, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out_ref = sync(xs), triple(xt)
    assert_close_to_reference(out, out_ref, F64, "output")
    grad = torch.randn_like(out)
    out.backward(grad), out_ref.backward(grad)
    assert_close_to_reference(xs.grad, xt.grad, F64, "grad input")
    assert_close_to_reference(layer.bn_bias.grad, triple[1].bias.grad, F64, "grad bn_bias (shared)")
