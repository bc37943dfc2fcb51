"""ConvBN2d against nn.Conv2d + nn.BatchNorm2d in float64, over an all-pairs
grid of every option: outputs, every grad, running statistics and
num_batches_tracked over several training steps, then the eval output."""

import copy
import itertools
import random

import pytest
import torch
from torch import nn

from conftest import assert_as_accurate_as_pair, assert_close_to_reference
from convbn import ConvBN2d

DIMENSIONS = {
    "kernel": [1, 3, 5],
    "stride": [1, 2],
    "padding": [0, 1, "same"],
    "dilation": [1, 2],
    "groups": ["1", "2", "depthwise"],
    "bias": [False, True],
    "affine": [True, False],
    "momentum": [0.1, None],
    "track": [True, False],
    "layout": ["nchw", "channels_last"],
    "dtype": [torch.float32, torch.float64, torch.bfloat16],
    "memory_efficient": [True, False],
}


def _pair_valid(a, va, b, vb):
    """padding='same' is not defined for strided convolutions (as in nn.Conv2d)."""
    values = {a: va, b: vb}
    return not (values.get("padding") == "same" and values.get("stride", 1) != 1)


def _valid(case):
    return _pair_valid("padding", case["padding"], "stride", case["stride"])


def _required_pairs(dimensions):
    return {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(list(dimensions), 2)
        for va in dimensions[a]
        for vb in dimensions[b]
        if _pair_valid(a, va, b, vb)
    }


def _all_pairs(dimensions, seed=1234, candidates=60):
    """A small set of valid cases in which every valid pair of values of any
    two dimensions appears at least once (greedy, seeded: the set is fixed)."""
    names = list(dimensions)
    rng = random.Random(seed)

    def pairs(case):
        return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(names, 2)}

    uncovered = _required_pairs(dimensions)
    cases = []
    while uncovered:
        best, best_gain = None, 0
        for _ in range(candidates):
            case = {n: rng.choice(dimensions[n]) for n in names}
            # Start each candidate from one uncovered pair so progress is certain.
            (a, va), (b, vb) = rng.choice(sorted(uncovered, key=repr))
            case[a], case[b] = va, vb
            if not _valid(case):
                continue
            gain = len(pairs(case) & uncovered)
            if gain > best_gain:
                best, best_gain = case, gain
        if best is not None:
            cases.append(best)
            uncovered -= pairs(best)
    return cases


# Several independent all-pairs sets: more triples of options meet too.
CASES = [case for seed in (1234, 5678, 91011, 121314) for case in _all_pairs(DIMENSIONS, seed)]


def _case_id(case):
    return "-".join(f"{k}={getattr(v, '__name__', str(v)).replace('torch.', '')}" for k, v in case.items())


def _channels(groups):
    # (in_channels, out_channels, groups)
    return {"1": (4, 6, 1), "2": (4, 6, 2), "depthwise": (4, 4, 4)}[groups]


def _round(t, dtype):
    """t's values as dtype can hold them, kept in float64."""
    return t.to(dtype).double()


def test_grid_covers_every_pair():
    names = list(DIMENSIONS)
    for ((a, va), (b, vb)) in _required_pairs(DIMENSIONS):
        assert any(c[a] == va and c[b] == vb for c in CASES), (a, va, b, vb)
    assert all(_valid(c) for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_conv_then_batchnorm(case, device):
    dtype = case["dtype"]
    in_ch, out_ch, groups = _channels(case["groups"])
    conv = nn.Conv2d(in_ch, out_ch, case["kernel"], case["stride"], case["padding"],
                     case["dilation"], groups, case["bias"], dtype=torch.float64)
    bn = nn.BatchNorm2d(out_ch, momentum=case["momentum"], affine=case["affine"],
                        track_running_stats=case["track"], dtype=torch.float64)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(_round(p, dtype))
        if case["affine"]:
            bn.weight.copy_(_round(torch.rand(out_ch) + 0.5, dtype))
            bn.bias.copy_(_round(torch.randn(out_ch), dtype))
        if case["track"]:
            bn.running_mean.copy_(_round(torch.randn(out_ch) * 0.1, dtype))
            bn.running_var.copy_(_round(torch.rand(out_ch) + 0.5, dtype))
    fused = ConvBN2d.from_modules(conv, bn, memory_efficient=case["memory_efficient"]).to(device, dtype)
    # float32/bfloat16 are held to the accuracy of the pair in that dtype (on the same device).
    low_precision = dtype != torch.float64
    conv_lp, bn_lp = (
        (copy.deepcopy(conv).to(device, dtype), copy.deepcopy(bn).to(device, dtype)) if low_precision else (None, None))

    def check(actual, expected, lp, name):
        if low_precision:
            assert_as_accurate_as_pair(actual.cpu(), lp.cpu(), expected, dtype, name)
        else:
            assert_close_to_reference(actual.cpu(), expected, dtype, name)
    memory_format = torch.channels_last if case["layout"] == "channels_last" else torch.contiguous_format

    def params(conv_, bn_, fused_):
        pairs = [("weight", conv_.weight, fused_.weight)]
        if case["bias"]:
            pairs.append(("bias", conv_.bias, fused_.bias))
        if case["affine"]:
            pairs += [("bn_weight", bn_.weight, fused_.bn_weight), ("bn_bias", bn_.bias, fused_.bn_bias)]
        return pairs

    for step in range(3):
        x = _round(torch.randn(3, in_ch, 10, 10) * 2 + step, dtype)
        x_ref = x.clone().requires_grad_()
        x_fused = x.to(device, dtype).contiguous(memory_format=memory_format).requires_grad_()
        out_ref = bn(conv(x_ref))
        out = fused(x_fused)
        assert out.dtype == dtype
        assert out.is_contiguous(memory_format=memory_format)
        grad = _round(torch.randn_like(out_ref), dtype)
        out_ref.backward(grad)
        out.backward(grad.to(device, dtype).contiguous(memory_format=memory_format))
        out_lp = x_lp = None
        if low_precision:
            x_lp = x.to(device, dtype).requires_grad_()
            out_lp = bn_lp(conv_lp(x_lp))
            out_lp.backward(grad.to(device, dtype))

        check(out, out_ref, out_lp, f"output, step {step}")
        check(x_fused.grad, x_ref.grad, x_lp.grad if low_precision else None, f"grad input, step {step}")
        lp_params = params(conv_lp, bn_lp, fused) if low_precision else [(None, None, None)] * 4
        for (name, ref_p, fused_p), (_, lp_p, _) in zip(params(conv, bn, fused), lp_params):
            check(fused_p.grad, ref_p.grad, lp_p.grad if low_precision else None, f"grad {name}, step {step}")
            ref_p.grad, fused_p.grad = None, None
            if low_precision:
                lp_p.grad = None

        if case["track"]:
            check(fused.running_mean, bn.running_mean, bn_lp.running_mean if low_precision else None, "running_mean")
            check(fused.running_var, bn.running_var, bn_lp.running_var if low_precision else None, "running_var")
            assert fused.num_batches_tracked.item() == bn.num_batches_tracked.item() == step + 1
            assert fused.running_mean.device.type == fused.num_batches_tracked.device.type == device
        else:
            assert fused.running_mean is None and fused.num_batches_tracked is None

    for module in (conv, bn, fused, conv_lp, bn_lp):
        if module is not None:
            module.eval()
    x = _round(torch.randn(2, in_ch, 10, 10), dtype)
    with torch.no_grad():
        out = fused(x.to(device, dtype).contiguous(memory_format=memory_format))
        out_lp = bn_lp(conv_lp(x.to(device, dtype))) if low_precision else None
        check(out, bn(conv(x)), out_lp, "eval output")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("channels,size", [(6, 40), (80, 20), (2048, 3)])
def test_statistics_over_many_blocks_with_a_large_mean(dtype, layout, channels, size, device):
    """Many planes / row blocks (channels_last blocks hold ~32K values, so
    6 channels x 3*40*40 rows spans several), and a mean of 1000 over a spread
    of ~1, where E[x^2] - E[x]^2 would lose every digit of a float32
    variance: the running statistics and the output still match the pair."""
    conv = nn.Conv2d(channels, channels, 1, groups=channels, bias=True, dtype=torch.float64)
    bn = nn.BatchNorm2d(channels, momentum=0.5, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(_round(torch.rand_like(conv.weight) + 0.5, dtype))
        conv.bias.fill_(1000.0)
    fused = ConvBN2d.from_modules(conv, bn).to(device, dtype)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = _round(torch.randn(3, channels, size, size), dtype)
    out_ref = bn(conv(x))
    out = fused(x.to(device, dtype).contiguous(memory_format=memory_format)).cpu()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out.double(), out_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(fused.running_mean.cpu().double(), bn.running_mean, rtol=tol, atol=0)
    torch.testing.assert_close(fused.running_var.cpu().double(), bn.running_var, rtol=tol, atol=tol)
