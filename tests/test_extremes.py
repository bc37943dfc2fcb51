"""float32 ConvBN2d / LinearBN1d (and their synchronized versions) at the
edges of float32's range, where nn.Conv2d + nn.BatchNorm2d (nn.Linear +
nn.BatchNorm1d) in float32 stays finite and accurate:

  std1e15, std1e16  a batch whose conv/linear output has a std of ~1e15 or
                    ~1e16 (the backward once formed gamma * invstd^3, which
                    underflows to 0 there: grad_input/grad_weight off by O(1));
  tiny_std          a std of ~1e-18 with eps = 1e-30 (invstd ~1e18: invstd^3
                    overflowed, NaN gradients);
  constant_1e30     every input value 2^100 ~ 1.27e30 (one input channel, a
                    1x1 kernel): each output channel is one constant, of
                    variance 0 (the statistics pass once squared a float32
                    rounding error of ~1e23 into inf: running_var = inf).

Everything is compared with the float64 pair and held to the accuracy of the
float32 pair on the same device (conftest.assert_as_accurate_as_pair); each
value that must be finite in ours is checked finite in the float32 pair
first, so that the comparison is fair."""

import copy

import pytest
import torch
from torch import nn

from conftest import assert_as_accurate_as_pair
from convbn import ConvBN2d, LinearBN1d
from sync_workers import launch

F32 = torch.float32

CASES = {
    "std1e15": {"std": 1e15, "eps": 1e-5},
    "std1e16": {"std": 1e16, "eps": 1e-5},
    "tiny_std": {"std": 1e-18, "eps": 1e-30},
    # Chosen so that the reference is exact and the gradients do not hang on
    # rounding noise: the output is w * 2^100 (w float32, the bias far below
    # its ulp), whose sums ATen takes exactly in float64; eps = 2^-16 makes
    # invstd exactly 256, gamma has 5 significant bits, and dy is +-1 with a
    # sum of 0 per channel, so that grad_y = +-gamma * 256 exactly and the
    # conv/linear weight grad, 2^100 * sum(grad_y), is exactly 0 in float32
    # and float64 alike instead of rounding errors times 2^100.
    "constant_1e30": {"constant": 2.0**100, "eps": 2.0**-16},
}


def _f32(t):
    """t's values as float32 holds them, kept in float64."""
    return t.to(F32).double()


# Samples per batch: for the linear layers, as many as make the old float32
# sum of a constant channel round (a conv channel has 36 values per sample).
BATCH_SIZE = {"conv": 8, "linear": 24}


def _balanced_signs(shape, dims):
    """+1 and -1, as many of each in every channel (over dims), shuffled."""
    channels = shape[1]
    per_channel = torch.Size(shape).numel() // channels
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(per_channel // 2)
    assert signs.numel() == per_channel
    moved = torch.stack([signs[torch.randperm(per_channel)] for _ in range(channels)])
    if len(dims) == 1:  # (N, C)
        return moved.t().contiguous()
    n, _, h, w = shape
    return moved.view(channels, n, h, w).permute(1, 0, 2, 3).contiguous()


def make_case(kind, case_name, batch_size=None):
    """The float64 pair (layer, bn), the float64 input and the float64 loss
    weights w (loss = sum(w * output)) of a case; every value float32
    representable. Checks that the case is what its name says."""
    batch_size = batch_size or BATCH_SIZE[kind]
    case = CASES[case_name]
    constant = "constant" in case
    # A constant input: one input channel and a 1x1 kernel, so that every
    # output value of a channel is the same product (a GEMM may sum several
    # in another order at another position).
    inputs = 1 if constant else 3
    if kind == "conv":
        size = 1 if constant else 3
        layer = nn.Conv2d(inputs, 4, size, padding=size // 2, bias=True, dtype=torch.float64)
        x_shape = (batch_size, inputs, 6, 6)
        dims = [0, 2, 3]
    else:
        layer = nn.Linear(inputs, 4, bias=True, dtype=torch.float64)
        x_shape = (batch_size, inputs)
        dims = [0]
    bn = (nn.BatchNorm2d if kind == "conv" else nn.BatchNorm1d)(4, eps=case["eps"], momentum=0.1, dtype=torch.float64)
    with torch.no_grad():
        if constant:
            bn.weight.copy_(torch.randint(16, 48, (4,), dtype=torch.float64) / 32)
        else:
            bn.weight.copy_(_f32(torch.rand(4, dtype=torch.float64) + 0.5))
        bn.bias.copy_(_f32(torch.randn(4, dtype=torch.float64)))
        bn.running_mean.copy_(_f32(torch.randn(4, dtype=torch.float64) * 0.1))
        bn.running_var.copy_(_f32(torch.rand(4, dtype=torch.float64) + 0.5))
        layer.weight.copy_(_f32(layer.weight))
        if constant:
            x = torch.full(x_shape, case["constant"], dtype=torch.float64)
            layer.bias.copy_(_f32(layer.bias))
        else:
            # The input scaled so that the output's std is about case["std"];
            # the bias of the same scale (a bias of 0.1 on a std of 1e-18
            # would leave nothing of the spread in float32 or float64).
            unit = torch.randn(x_shape, dtype=torch.float64)
            layer.bias.zero_()
            spread = layer(unit).std(dims).mean().item()
            x = _f32(unit * (case["std"] / spread))
            layer.bias.copy_(_f32(layer.bias.uniform_(-1, 1) * case["std"]))
        y = layer(x)
    if constant:
        per_channel = y.amax(dims) - y.amin(dims)
        assert (per_channel == 0).all(), "the float64 output is not constant per channel"
        assert y.abs().amax() > 1e29
        w = _balanced_signs(y.shape, dims)
    else:
        std = y.std(dims)
        assert (std > case["std"] / 10).all() and (std < case["std"] * 10).all(), std
        w = _f32(torch.randn(y.shape, dtype=torch.float64))
    return layer, bn, x, w


def _grads(layer, bn_params):
    return [("weight", layer.weight.grad), ("bias", layer.bias.grad)] + [
        (name, p.grad) for name, p in bn_params
    ]


def _pair_params(bn):
    return [("bn_weight", bn.weight), ("bn_bias", bn.bias)]


def _fused_params(fused):
    return [("bn_weight", fused.bn_weight), ("bn_bias", fused.bn_bias)]


def _check(name, ours, pair, ref):
    """ours as accurate as the float32 pair, relative to the reference's
    largest magnitude (conftest's floor is relative to max(that, 1), which
    would pass any grad_input of ~1e-16 at a std of 1e16). The conv/linear
    bias grad is 0 in exact arithmetic (batch norm absorbs the bias): ours
    is exactly 0, the pairs' are rounding errors, compared as they are.
    Fair: ours must be finite only where the float32 pair is."""
    assert torch.isfinite(pair).all(), f"{name}: the float32 pair is not finite, so the case is unfair"
    assert torch.isfinite(ours).all(), f"{name}: not finite: {ours.flatten()[:8].tolist()}"
    scale = ref.abs().max().item() if name != "bias" else 0.0
    scale = scale if scale > 0 else 1.0
    assert_as_accurate_as_pair(ours.cpu().double() / scale, pair.cpu().double() / scale, ref / scale, F32, name)


def _check_all(ours, pair, ref):
    """_check of every result, reporting all that fail."""
    failures = []
    for name in ref:
        try:
            _check(name, ours[name], pair[name], ref[name])
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, "\n".join(failures)


def _run_pair(layer, bn, x, w, device, dtype):
    """One training step of the nn pair (a copy) in dtype on device: what it
    returns and every gradient, and its running statistics."""
    layer = copy.deepcopy(layer).to(device, dtype)
    bn = copy.deepcopy(bn).to(device, dtype)
    x = x.to(device, dtype, copy=True).requires_grad_()
    y = layer(x)
    if y.dim() == 2:
        # nn.BatchNorm1d sees the linear output as a contiguous (1, C, N):
        # the same N values per channel, statistics and gradients as on
        # (N, C), but ATen's CPU kernel then sums in double, where on (N, C)
        # (one value per plane, which it walks as channels_last) it sums in
        # the data's dtype: a constant 1e30 channel's mean is then an ulp
        # off, and its variance ~(1e23)^2 = inf in float32 (ATen's own
        # float32 nn.BatchNorm1d has the bug fixed here in convbn).
        y = bn(y.t().unsqueeze(0).contiguous()).squeeze(0).t()
    else:
        y = bn(y)
    (w.to(device, dtype) * y).sum().backward()
    return {
        "output": y.detach(), "grad_input": x.grad, **dict(_grads(layer, _pair_params(bn))),
        "running_mean": bn.running_mean, "running_var": bn.running_var,
    }


def _reference(layer, bn, x, w, case_name):
    """The float64 pair's step. For a constant input, checked exact (a batch
    variance of 0, a weight grad of 0), and with the exact output: beta, as
    (y - mean) * invstd = 0. The pair's own output is not: ATen normalizes
    as y * alpha + (beta - mean * alpha), alpha = gamma * invstd, and beta
    is lost in the rounding of mean * alpha ~ 1e31 (here the float64 pair
    returns 0, the float32 pair rounding errors of ~1e24)."""
    ref = _run_pair(layer, bn, x, w, "cpu", torch.float64)
    if "constant" in CASES[case_name]:
        torch.testing.assert_close(ref["running_var"], (1 - bn.momentum) * bn.running_var, rtol=1e-12, atol=0)
        assert (ref["weight"] == 0).all(), ref["weight"]
        shape = [1, -1] + [1] * (ref["output"].dim() - 2)
        ref["output"] = bn.bias.detach().view(shape).expand_as(ref["output"])
    return ref


@pytest.mark.parametrize("memory_efficient", [True, False], ids=["memory_efficient", "save_output"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "linear"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_float32_extremes_match_the_pair(case_name, layout, memory_efficient, device):
    kind = "linear" if layout == "linear" else "conv"
    layer, bn, x, w = make_case(kind, case_name)
    ref = _reference(layer, bn, x, w, case_name)
    pair = _run_pair(layer, bn, x, w, device, F32)

    module_type = LinearBN1d if kind == "linear" else ConvBN2d
    fused = module_type.from_modules(copy.deepcopy(layer), copy.deepcopy(bn), memory_efficient=memory_efficient)
    fused = fused.to(device, F32)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x_ours = x.to(device, F32, copy=True)
    if kind == "conv":
        x_ours = x_ours.contiguous(memory_format=memory_format)
    x_ours.requires_grad_()
    y = fused(x_ours)
    grad = w.to(device, F32)
    if kind == "conv":
        grad = grad.contiguous(memory_format=memory_format)
    y.backward(grad)
    ours = {
        "output": y.detach(), "grad_input": x_ours.grad, **dict(_grads(fused, _fused_params(fused))),
        "running_mean": fused.running_mean, "running_var": fused.running_var,
    }
    _check_all(ours, pair, ref)
    assert fused.num_batches_tracked.item() == 1


# ---------------------------------------------------------------------------
# The synchronized modules: two processes (gloo), each with its slice of the
# batch, against the pairs on the whole batch.

SYNC_SIZES = {"conv": [3, 5], "linear": [11, 13]}
SYNC_CONFIGS = [
    {"kind": kind, "case": case_name, "memory_efficient": memory_efficient,
     "channels_last": kind == "conv" and not memory_efficient}
    for kind in ("conv", "linear") for case_name in CASES for memory_efficient in (True, False)
]


@pytest.fixture(scope="module")
def sync_records():
    torch.manual_seed(0)
    configs = []
    for config in SYNC_CONFIGS:
        sizes = SYNC_SIZES[config["kind"]]
        layer, bn, x, w = make_case(config["kind"], config["case"], sum(sizes))
        configs.append(dict(config, layer=layer, bn=bn, x=x, w=w, sizes=sizes))
    return configs, launch(2, "float32_slices", configs)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this PyTorch build has no torch.distributed")
@pytest.mark.parametrize("index", range(len(SYNC_CONFIGS)),
                         ids=[f"{c['kind']}-{c['case']}-me={c['memory_efficient']}" for c in SYNC_CONFIGS])
def test_sync_float32_extremes_match_the_pair(sync_records, index):
    configs, records = sync_records
    config = configs[index]
    ranks = [records[rank][index] for rank in range(2)]
    for record in ranks:
        assert "error" not in record, record.get("error")
    layer, bn, x, w = config["layer"], config["bn"], config["x"], config["w"]
    ref = _reference(layer, bn, x, w, config["case"])
    pair = _run_pair(layer, bn, x, w, "cpu", F32)
    ours = {
        "output": torch.cat([r["output"] for r in ranks]),
        "grad_input": torch.cat([r["grad_input"] for r in ranks]),
        # Each rank's parameter grads are of its own slice's loss (no DDP).
        **{name: sum(r["grads"][name] for r in ranks)
           for name in ("weight", "bias", "bn_weight", "bn_bias")},
        "running_mean": ranks[0]["running_mean"], "running_var": ranks[0]["running_var"],
    }
    _check_all(ours, pair, ref)
    assert torch.equal(ranks[1]["running_var"], ranks[0]["running_var"])
