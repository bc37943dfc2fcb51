"""ConvBN2d as a module: round trip with the pair, state_dict, padding forms
and modes, the functional form, and convbn.fuse on whole models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convbn
from convbn import ConvBN2d


def _randomize(bn):
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        if bn.track_running_stats:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 1.5)
            bn.num_batches_tracked.fill_(5)
    return bn


def _assert_train_and_eval_match(model, reference, x, steps=2):
    model, reference = copy.deepcopy(model), copy.deepcopy(reference)
    for step in range(steps):
        model.train(), reference.train()
        xa = (x + step).clone().requires_grad_()
        xb = (x + step).clone().requires_grad_()
        out, ref = model(xa), reference(xb)
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(ref)
        out.backward(g), ref.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad)
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    return model, reference


@pytest.mark.parametrize("affine,track,bias", [(True, True, True), (False, False, False), (True, False, True), (False, True, False)])
def test_from_modules_to_modules_round_trip(affine, track, bias):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=bias)
    bn = _randomize(nn.BatchNorm2d(6, eps=1e-3, momentum=None, affine=affine, track_running_stats=track))
    conv.eval(), bn.eval()
    fused = ConvBN2d.from_modules(conv, bn)
    assert not fused.training
    conv2, bn2 = fused.to_modules()
    for a, b in ((conv, conv2), (bn, bn2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype, k
        assert a.training == b.training
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(conv, attr) == getattr(conv2, attr), attr
    for attr in ("eps", "momentum", "affine", "track_running_stats"):
        assert getattr(bn, attr) == getattr(bn2, attr), attr


def test_state_dict_holds_the_pairs_tensors_under_clear_names():
    conv, bn = nn.Conv2d(3, 5, 3, bias=True), _randomize(nn.BatchNorm2d(5))
    fused = ConvBN2d.from_modules(conv, bn)
    sd = fused.state_dict()
    assert list(sd) == ["weight", "bias", "bn_weight", "bn_bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = {"weight": conv.weight, "bias": conv.bias, "bn_weight": bn.weight, "bn_bias": bn.bias,
                "running_mean": bn.running_mean, "running_var": bn.running_var,
                "num_batches_tracked": bn.num_batches_tracked}
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k
    fresh = ConvBN2d(3, 5, 3, bias=True)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.running_var, bn.running_var)
    assert list(ConvBN2d(3, 5, 3, affine=False, track_running_stats=False).state_dict()) == ["weight"]


@pytest.mark.parametrize("padding,padding_mode,kernel,dilation", [
    ("same", "zeros", 4, 1),      # even kernel: nn.Conv2d pads one more at bottom/right
    ("same", "zeros", 3, 2),
    ("same", "reflect", 4, 1),
    ("valid", "zeros", 3, 1),
    ((1, 2), "circular", 3, 1),
    (2, "replicate", 3, 1),
    (1, "reflect", (3, 5), (1, 2)),
])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_padding_forms_and_modes_match_the_pair(padding, padding_mode, kernel, dilation, memory_efficient):
    conv = nn.Conv2d(3, 4, kernel, padding=padding, dilation=dilation, padding_mode=padding_mode, dtype=torch.float64)
    bn = _randomize(nn.BatchNorm2d(4, dtype=torch.float64))
    fused = ConvBN2d.from_modules(conv, bn, memory_efficient)
    assert fused.padding == conv.padding
    _assert_train_and_eval_match(fused, nn.Sequential(conv, bn), torch.randn(2, 3, 9, 8, dtype=torch.float64))


def test_constructor_matches_the_pair_constructors():
    torch.manual_seed(1)
    fused = ConvBN2d(3, 8, 3, padding=1, bias=True)
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
    for (name, p), ref in zip(fused.named_parameters(), [conv.weight, conv.bias, bn.weight, bn.bias]):
        assert torch.equal(p, ref), name
    assert "kernel_size=(3, 3)" in repr(fused)


def test_eval_without_tracked_stats_uses_batch_statistics():
    conv, bn = nn.Conv2d(3, 4, 3, dtype=torch.float64), nn.BatchNorm2d(4, track_running_stats=False, dtype=torch.float64)
    fused = ConvBN2d.from_modules(conv, bn).eval()
    bn.eval()
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(fused(x), bn(conv(x)))


def test_functional_form_matches_conv2d_then_batch_norm():
    x, w, b = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(6, 4, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    g, beta = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    rm, rv = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out = convbn.functional.conv_bn(x, w, b, g, beta, rm, rv, training=True, momentum=0.3, stride=2, padding=1)
    ref = F.batch_norm(F.conv2d(x, w, b, 2, 1), rm_ref, rv_ref, g, beta, True, 0.3)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(rm, rm_ref)
    torch.testing.assert_close(rv, rv_ref)
    out = convbn.functional.conv_bn(x, w, b, g, beta, rm, rv, training=False, padding="same")
    torch.testing.assert_close(out, F.batch_norm(F.conv2d(x, w, b, padding="same"), rm_ref, rv_ref, g, beta, False))


class _Sequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)),
        )

    def forward(self, x):
        return self.features(x)


class _Residual(nn.Module):
    """Pairs outside any Sequential, a residual branch, and a conv whose
    output is used twice (which must not be fused)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.shared, self.bn_shared = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)) + self.down(x)
        s = self.shared(y)
        return self.bn_shared(s) + s


@pytest.mark.parametrize("model_cls,expected_fused", [(_Sequential, 3), (_Residual, 3)])
def test_fuse_replaces_pairs_and_keeps_outputs(model_cls, expected_fused):
    torch.manual_seed(0)
    model = model_cls().double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomize(m)
    fused = convbn.fuse(model)
    convbns = [m for m in fused.modules() if isinstance(m, ConvBN2d)]
    assert len(convbns) == expected_fused
    assert not any(isinstance(m, ConvBN2d) for m in model.modules()), "fuse() must not change its argument"
    remaining_bn = sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert remaining_bn == (1 if model_cls is _Residual else 0)  # the shared conv's bn stays
    _assert_train_and_eval_match(fused, model, torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_fuse_keeps_running_statistics_in_step_with_the_pair():
    torch.manual_seed(0)
    model = _Residual().double()
    fused = convbn.fuse(model)
    fused_model, reference = _assert_train_and_eval_match(fused, model, torch.randn(2, 3, 8, 8, dtype=torch.float64), steps=3)
    ref_modules = dict(reference.named_modules())
    for name, m in fused_model.named_modules():
        if isinstance(m, ConvBN2d):
            bn_name = {"conv1": "bn1", "conv2": "bn2", "down.0": "down.1"}[name]
            bn = ref_modules[bn_name]
            torch.testing.assert_close(m.running_mean, bn.running_mean)
            torch.testing.assert_close(m.running_var, bn.running_var)
            assert m.num_batches_tracked.item() == bn.num_batches_tracked.item() == 3


def test_eval_follows_every_change_with_and_without_grad():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64), _randomize(nn.BatchNorm2d(4, dtype=torch.float64))
    fused = ConvBN2d.from_modules(conv, bn).eval()
    pair = nn.Sequential(conv, bn).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(fused(x), pair(x))
        # Grad mode takes the differentiable path, which must agree too.
        torch.testing.assert_close(fused(x), pair(x))

    check()
    with torch.no_grad():  # in-place change of a parameter
        fused.weight.mul_(2), conv.weight.mul_(2)
    check()
    fused.bn_bias = nn.Parameter(bn.bias.detach().clone() + 1)  # a replaced parameter
    with torch.no_grad():
        bn.bias.add_(1)
    check()
    fused.train(), pair.train()  # a training step moves the running statistics
    fused(x + 1), pair(x + 1)
    fused.eval(), pair.eval()
    check()
    fused.load_state_dict(ConvBN2d.from_modules(conv, bn).state_dict())
    check()


def test_fold_op_folds_batch_norm_into_the_conv():
    conv, bn = nn.Conv2d(3, 4, 3, dtype=torch.float64), _randomize(nn.BatchNorm2d(4, dtype=torch.float64)).eval()
    w, b = torch.ops.convbn.fold_conv_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(x, w, b), bn(conv(x)))
