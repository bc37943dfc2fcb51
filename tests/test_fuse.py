"""convbn.fuse never changes what a model computes: one test per way it
used to (each failed on the fx-GraphModule fuse, the eval fold cache or the
old module code), and the report that says what was fused and what was left
alone. References are the unfused model itself, in float64."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convbn
from convbn import ConvBN2d, FusedBatchNormSlot, LinearBN1d
from convbn.fuse import FusedPair
from conftest import assert_same_as_unfused, randomize_batch_norms

F64 = torch.float64


def randomized(model):
    """model in float64, with non-trivial batch norms."""
    return randomize_batch_norms(model.double(), bias_std=0.3)


def fused_count(model):
    return sum(isinstance(m, (ConvBN2d, LinearBN1d)) for m in model.modules())


def block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


# --- torch.fx: training branches, autograd Functions, names, pickling ------

class DropPathNet(nn.Module):
    """Stochastic depth and dropout that depend on self.training."""

    def __init__(self):
        super().__init__()
        self.stem = block(3, 8)
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn(self.conv(x))
        if self.training:  # drop the whole branch for some samples
            keep = (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype) > 0.5).to(x.dtype)
            y = y * keep / 0.5
        x = F.relu(x + y)
        x = F.dropout(x.mean((2, 3)), 0.5, training=self.training)
        return self.fc(x)


def test_training_branches_follow_the_mode_after_fusing_in_train_mode():
    original = randomized(DropPathNet()).train()
    # torch.rand with a traced size does not trace: fx sees no pair whole.
    fused, report = convbn.fuse(original, report=True)
    assert fused_count(fused) == 0 and all("example_inputs" in p.reason for p in report.left_alone)
    fused, report = convbn.fuse(original, report=True, example_inputs=(torch.randn(2, 3, 8, 8, dtype=F64),))
    assert type(fused) is DropPathNet and fused_count(fused) == 2
    assert {p.found_in for p in report.fused} == {"a run on example_inputs"}
    # Fused in train mode, evaluated in eval mode: no dropout left (the old
    # fuse froze the traced train-mode branches into a GraphModule).
    original.eval(), fused.eval()
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    torch.testing.assert_close(fused(x), original(x))
    assert_same_as_unfused(fused, original, x)


class ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 3 * g  # a custom backward: gradients differ from the traced ops'


class WithAutogradFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = block(3, 6), block(6, 6)

    def forward(self, x):
        return self.b(ScaleGrad.apply(self.a(x)))


def test_custom_autograd_functions_keep_their_backward():
    original = randomized(WithAutogradFunction())
    fused = convbn.fuse(original)
    assert fused_count(fused) == 2
    assert_same_as_unfused(fused, copy.deepcopy(original), torch.randn(2, 3, 6, 6, dtype=F64))


class SharedAndUnused(nn.Module):
    """A module registered under two names and an auxiliary head the forward
    does not call."""

    def __init__(self):
        super().__init__()
        self.features = block(3, 8)
        self.alias = self.features  # the same Sequential, a second name
        self.aux_head = block(8, 8)  # registered, never called in forward
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.alias(x).mean((2, 3)))


def test_aliases_and_unused_modules_keep_their_names_and_checkpoints_load_both_ways():
    original = randomized(SharedAndUnused())
    fused, report = convbn.fuse(original, report=True)
    assert fused.alias is fused.features and isinstance(fused.features[0], ConvBN2d)
    assert isinstance(fused.aux_head[0], nn.Conv2d)  # not called: nothing shows it is a pair
    assert list(fused.state_dict()) == list(original.state_dict())
    fused.load_state_dict(original.state_dict())
    fresh = randomized(SharedAndUnused())
    fresh.load_state_dict(fused.state_dict())
    for name, value in original.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    restored = convbn.unfuse(fused)
    assert type(restored.features[0]) is nn.Conv2d and restored.alias is restored.features
    assert list(restored.state_dict()) == list(original.state_dict())
    assert_same_as_unfused(fused, copy.deepcopy(original), torch.randn(2, 3, 6, 6, dtype=F64))


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_fused_models_survive_saving_and_still_load_the_original_checkpoint(how):
    original = randomized(convbn.models.resnet18(num_classes=5))
    fused = convbn.fuse(original)
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        fused = torch.load(buffer, weights_only=False)
    elif how == "pickle":
        fused = pickle.loads(pickle.dumps(fused))
    else:
        fused = copy.deepcopy(fused)
    assert isinstance(fused.layer1[0].bn1, FusedBatchNormSlot) and fused.layer1[0].bn1.fused is fused.layer1[0].conv1
    other = randomized(convbn.models.resnet18(num_classes=5))
    fused.load_state_dict(other.state_dict())
    assert torch.equal(fused.layer1[0].conv1.bn_weight, other.layer1[0].bn1.weight)
    assert torch.equal(fused.layer1[0].conv1.running_var, other.layer1[0].bn1.running_var)
    original.load_state_dict(fused.state_dict())
    assert_same_as_unfused(fused, original, torch.randn(2, 3, 32, 32, dtype=F64), steps=1)


class DataDependentGate(nn.Module):
    """A forward fx cannot trace (control flow on a value)."""

    def __init__(self):
        super().__init__()
        self.proj = block(8, 8)

    def forward(self, x):
        if x.mean() > 100:
            return x
        return self.proj(x)


class PartlyTraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.gate = block(3, 8), DataDependentGate()
        self.conv, self.bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(self.gate(self.stem(x))))


class Untraceable(nn.Module):
    """fx cannot trace this forward itself (int() of a traced value, a loop
    over a tensor), and it calls a block's batch norm directly."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([block(3, 8), block(8, 8, 2)])

    def forward(self, x):
        repeats = int(x.abs().sum() > -1)  # data-dependent for fx
        for stage in self.stages:
            x = stage(x)
        rows = [r for r in x]  # iterating a tensor
        return self.stages[1][1](torch.stack(rows) * repeats)  # a batch norm, on another tensor


def test_untraceable_forwards_are_kept_as_single_calls_and_what_they_hold_is_left_alone():
    original = randomized(PartlyTraceable())
    fused, report = convbn.fuse(original, report=True)
    # The gate's forward does not trace: the model's graph keeps it as one
    # call, so every other pair is still seen whole and fused.
    assert isinstance(fused.stem[0], ConvBN2d) and isinstance(fused.conv, ConvBN2d)
    assert [p.found_in for p in report.fused] == ["the model's forward"] * 2
    # Inside the gate, code fx could not see may use the block's modules.
    assert type(fused.gate.proj[0]) is nn.Conv2d
    (left,) = report.left_alone
    assert left.layer == "gate.proj.0" and "gate's forward" in left.reason
    assert [name for name, _ in report.untraced] == ["gate"]
    assert_same_as_unfused(fused, copy.deepcopy(original), torch.randn(2, 3, 6, 6, dtype=F64))

    # A model whose own forward does not trace: its blocks trace, but the
    # forward uses their modules directly (stages[1][1] on another tensor),
    # so nothing is fused.
    original = randomized(Untraceable())
    fused, report = convbn.fuse(original, report=True)
    assert fused_count(fused) == 0 and len(report.left_alone) == 2
    assert all("the model's forward" in p.reason for p in report.left_alone)
    assert_same_as_unfused(fused, copy.deepcopy(original), torch.randn(2, 3, 8, 8, dtype=F64))


# --- the Sequential cases: subclasses, sharing, direct use, hooks, eps=0 ---

class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a batch norm subclass with its own forward."""

    def forward(self, x):
        return F.relu(super().forward(x))


class FrozenBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def test_batch_norm_subclasses_are_left_alone_with_the_reason():
    original = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4), nn.Conv2d(4, 4, 3), FrozenBatchNorm(4),
                                        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    fused, report = convbn.fuse(original, report=True)
    assert [type(m).__name__ for m in fused] == ["Conv2d", "BatchNormAct", "Conv2d", "FrozenBatchNorm",
                                                 "ConvBN2d", "FusedBatchNormSlot"]
    reasons = {p.bn: p.reason for p in report.left_alone}
    assert "BatchNormAct" in reasons["1"] and "own forward" in reasons["1"]
    assert "FrozenBatchNorm" in reasons["3"]
    assert_same_as_unfused(fused, copy.deepcopy(original), torch.randn(2, 3, 9, 9, dtype=F64))


class Siamese(nn.Module):
    """The same conv -> bn applied to two inputs (fusable: every call is the
    pair), and one conv registered in two Sequentials with different batch
    norms (not fusable)."""

    def __init__(self):
        super().__init__()
        self.tower = block(3, 6)
        conv = nn.Conv2d(6, 6, 1)
        self.left = nn.Sequential(conv, nn.BatchNorm2d(6))
        self.right = nn.Sequential(conv, nn.BatchNorm2d(6))

    def forward(self, x):
        a, b = self.tower(x), self.tower(x.flip(-1))
        return self.left(a) + self.right(b)


def test_shared_modules_stay_shared():
    original = randomized(Siamese())
    fused, report = convbn.fuse(original, report=True)
    assert isinstance(fused.tower[0], ConvBN2d)  # called twice, each time conv -> bn
    assert fused.left[0] is fused.right[0] and type(fused.left[0]) is nn.Conv2d
    assert any(p.layer == "left.0" and "other inputs" not in p.reason for p in report.left_alone)
    assert_same_as_unfused(fused, copy.deepcopy(original), torch.randn(2, 3, 6, 6, dtype=F64))


class KeepsFeatures(nn.Module):
    """Uses a Sequential's children directly: iterating to keep every
    intermediate, indexing, and slicing."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        features = []
        y = x
        for m in self.a:
            y = m(y)
            features.append(y.mean())
        z = self.b[0](x)  # the conv's output, used raw below
        w = self.c[1:](self.c[0](x))
        return y + self.b[1:](z) + z + w + sum(features)


def test_sequential_children_used_directly_are_left_alone():
    original = randomized(KeepsFeatures())
    fused, report = convbn.fuse(original, report=True)
    assert type(fused.a[0]) is nn.Conv2d and type(fused.b[0]) is nn.Conv2d
    assert isinstance(fused.c[0], ConvBN2d)  # c[1:] after c[0]: still conv -> bn
    assert {p.layer for p in report.left_alone} == {"a.0", "b.0"}
    assert_same_as_unfused(fused, copy.deepcopy(original), torch.randn(2, 3, 5, 5, dtype=F64))


def test_modules_with_hooks_are_left_alone_and_their_hooks_still_run():
    original = randomized(nn.Sequential(block(3, 4), block(4, 4)))
    calls = []
    original[0][0].register_forward_hook(lambda m, i, o: calls.append("conv"))
    original[1][1].register_forward_pre_hook(lambda m, i: calls.append("bn"))
    fused, report = convbn.fuse(original, report=True)
    assert fused_count(fused) == 0
    assert all("hooks" in p.reason for p in report.left_alone) and len(report.left_alone) == 2
    fused(torch.randn(2, 3, 6, 6, dtype=F64))
    assert calls == ["conv", "bn"]


def test_eps_zero_is_skipped_not_an_error():
    original = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.0), nn.Conv2d(4, 4, 1),
                                        nn.BatchNorm2d(4)))
    fused, report = convbn.fuse(original.eval(), report=True)
    assert type(fused[0]) is nn.Conv2d and isinstance(fused[2], ConvBN2d)
    assert "eps=0.0" in report.left_alone[0].reason
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    torch.testing.assert_close(fused(x), original(x))


# --- eval mode: no stale fold, tracing, inference-mode parameters -----------

def pair_and_fused():
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, dtype=F64), nn.BatchNorm2d(4, dtype=F64)
    randomized(nn.Sequential(bn))
    original = nn.Sequential(conv, bn).eval()
    return original, convbn.fuse(original)


@pytest.mark.parametrize("change", ["clamp through .data", "vector_to_parameters", "running_var.data.fill_",
                                    "weight.data = ..."])
def test_eval_follows_changes_made_behind_autograd(change):
    original, fused = pair_and_fused()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    with torch.no_grad():
        fused(x)  # the old module cached its fold here
    for model in (original, fused):
        if change == "clamp through .data":
            for p in model.parameters():
                p.data.clamp_(-0.05, 0.05)
        elif change == "vector_to_parameters":
            vector = torch.nn.utils.parameters_to_vector(model.parameters())
            torch.nn.utils.vector_to_parameters(torch.linspace(-1, 1, vector.numel(), dtype=F64), model.parameters())
        elif change == "running_var.data.fill_":
            model.state_dict(keep_vars=True)["1.running_var"].data.fill_(7.0)
        else:
            model[0].weight.data = torch.ones_like(model[0].weight)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x))


def test_tracing_under_no_grad_records_the_fold_not_its_result():
    original, fused = pair_and_fused()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    with torch.no_grad():
        fused(x)
        traced = torch.jit.trace(fused, x)  # checks the trace against eager: failed before
    torch.testing.assert_close(traced(x), original(x))
    with torch.no_grad():  # the traced module reads its parameters, not constants
        fused[0].bn_weight.mul_(3), original[1].weight.mul_(3)
    torch.testing.assert_close(traced(x), original(x))


def test_parameters_made_in_inference_mode():
    with torch.inference_mode():
        original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        layer = ConvBN2d(3, 4, 3).eval()
    fused = convbn.fuse(original)
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), original(x))
        torch.testing.assert_close(layer(x), nn.Sequential(*layer.to_modules())(x))


# --- the smaller ones ----------------------------------------------------------

def test_checkpoints_without_num_batches_tracked_load():
    original = randomized(nn.Sequential(block(3, 4)))
    old = {k: v for k, v in original.state_dict().items() if not k.endswith("num_batches_tracked")}
    fused = convbn.fuse(original)
    fused.load_state_dict(old)  # a plain dict: no version metadata, as nn.BatchNorm accepts
    layer = ConvBN2d(3, 4, 3)
    state = {k: v for k, v in layer.state_dict().items() if k != "num_batches_tracked"}
    layer.load_state_dict(state)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        layer.load_state_dict(_with_version(state, 2))  # a version-2 checkpoint must have it


def _with_version(state, version):
    from collections import OrderedDict

    state = OrderedDict(state)
    state._metadata = {"": {"version": version}}
    return state


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ConvBN2d(3, 4, 3)
        self.fc = LinearBN1d(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_fx_symbolic_trace_of_models_holding_fused_modules():
    model = Head().double()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 3, 6, 6, dtype=F64)
    reference = copy.deepcopy(model)
    torch.testing.assert_close(traced(x), reference(x))  # train mode: updates the same statistics
    torch.testing.assert_close(model.conv.running_mean, reference.conv.running_mean)
    fused = convbn.fuse(randomized(nn.Sequential(block(3, 4), nn.Flatten(), nn.Linear(64, 2))))
    traced = torch.fx.symbolic_trace(fused.eval())
    y = torch.randn(2, 3, 4, 4, dtype=F64)
    torch.testing.assert_close(traced(y), fused(y))


def test_torch_func_differentiation_says_what_to_do():
    layer = ConvBN2d(3, 4, 3, track_running_stats=False).double()
    params = dict(layer.named_parameters())
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    with pytest.raises(RuntimeError, match="torch.autograd.grad"):
        torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)
    layer.eval()
    torch.testing.assert_close(torch.func.vmap(layer)(x.unsqueeze(0))[0], layer(x))


def test_functional_forms_script():
    conv_bn = torch.jit.script(convbn.functional.conv_bn)
    x, w = torch.randn(2, 3, 7, 7, dtype=F64), torch.randn(4, 3, 2, 2, dtype=F64)
    for stride, padding in [(1, "same"), ((2, 1), (1, 0)), (1, "valid")]:
        got = conv_bn(x, w, None, None, None, None, None, None, True, 0.1, 1e-5, stride, padding)
        torch.testing.assert_close(got, F.batch_norm(F.conv2d(x, w, None, stride, padding), None, None, training=True))
    linear_bn = torch.jit.script(convbn.functional.linear_bn)
    x, w = torch.randn(5, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(linear_bn(x, w), F.batch_norm(F.linear(x, w), None, None, training=True))


def test_fused_linear_takes_three_dimensional_input_as_the_pair_does():
    original = randomized(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(3)))  # BN1d over dim 1 of (N, 3, 4)
    bad, report = convbn.fuse(original, report=True)
    assert "output channels" in report.left_alone[0].reason
    original = randomized(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)))
    fused = convbn.fuse(original)
    assert isinstance(fused[0], LinearBN1d)
    assert_same_as_unfused(fused, copy.deepcopy(original), torch.randn(6, 5, dtype=F64))
    # (N, C, L) input: the linear layer maps L, the batch norm normalizes C
    # over N and L. The fused module computes exactly that.
    three = randomized(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    fused3 = convbn.fuse(three)
    assert isinstance(fused3[0], LinearBN1d)
    assert_same_as_unfused(fused3, copy.deepcopy(three), torch.randn(3, 4, 4, dtype=F64))


# --- the report and unfuse ----------------------------------------------------

def test_report_lists_every_pair_and_is_logged(caplog):
    original = randomized(convbn.models.resnet18(num_classes=5))
    with caplog.at_level("INFO", logger="convbn.fuse"):
        fused, report = convbn.fuse(original, report=True)
    assert len(report.fused) == 20 and not report.left_alone and not report.untraced
    # The stem's ReLU is its own module: fused with its pair. The blocks
    # share one ReLU for several places: left as it is.
    assert report.fused[0] == FusedPair("conv1", "bn1", "ConvBN2d", "the model's forward", "relu", "relu")
    assert all(p.fused_activation is None for p in report.fused[1:])
    assert "fused 20 pair(s), left 0 alone" in caplog.text
    assert "left alone" in str(convbn.fuse(_Residual(), report=True)[1])


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_slot_stands_in_for_the_batch_norm():
    original = randomized(nn.Sequential(block(3, 4)))
    fused = convbn.fuse(original)
    slot, layer = fused[0][1], fused[0][0]
    assert slot.weight is layer.bn_weight and slot.running_var is layer.running_var
    slot.eval()  # freezing "batch norms" by their place still freezes them
    assert not layer.training
    slot.momentum = 0.5
    assert layer.momentum == 0.5
    slot.weight = nn.Parameter(torch.full((4,), 2.0, dtype=F64))
    assert torch.equal(layer.bn_weight, slot.weight) and "weight" not in slot._parameters
    fused.load_state_dict(original.state_dict(), assign=True)
    assert layer.bn_weight is not None and torch.equal(layer.bn_weight, original[0][1].weight)
    assert layer.running_mean.data_ptr() == original[0][1].running_mean.data_ptr()
    # convert_sync_batchnorm swaps the fused module: the slot follows.
    synced = convbn.convert_sync_batchnorm(fused)
    assert synced[0][1].fused is synced[0][0] and isinstance(synced[0][0], convbn.SyncConvBN2d)
    assert list(synced.state_dict()) == list(original.state_dict())


def test_inplace_fuse_keeps_the_tensors_optimizers_hold():
    model = randomized(nn.Sequential(block(3, 4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = [p for p in model.parameters()]
    same = convbn.fuse(model, inplace=True)
    assert same is model and isinstance(model[0][0], ConvBN2d)
    assert {id(p) for p in model.parameters()} == {id(p) for p in weights}
    model(torch.randn(2, 3, 5, 5, dtype=F64)).sum().backward()
    optimizer.step()
    assert all(p.grad is not None for p in weights)


# --- what a hostile review found: every one changed results or crashed ------

class Counting(nn.Module):
    """forward keeps Python state: a call counter, the last features."""

    def __init__(self):
        super().__init__()
        self.body = block(3, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = self.body(x)
        self.last = y.detach()
        return y * (1.0 if self.calls > 1 else 0.5)


def test_fuse_leaves_forwards_python_state_as_it_was():
    original = randomized(Counting())
    fused = convbn.fuse(original)
    assert fused.calls == 0 and not hasattr(fused, "last")  # tracing ran forward: counter and Proxy put back
    pickle.dumps(fused)
    assert_same_as_unfused(fused, original, torch.randn(2, 3, 5, 5, dtype=F64))


class Sneaky(nn.Module):
    """Conv outputs that reach more than the batch norm without an op fx shows."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.wrapped = nn.Sequential(nn.Conv2d(3, 4, 1))
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        if self.kind == "no_grad conv":
            with torch.no_grad():
                c = self.conv(x)
        else:
            c = self.conv(x)
        if self.kind == "stored":
            self.features = c
        y = self.bn(c)
        if self.kind == "direct forward":  # the conv alone, bypassing __call__
            y = y + self.conv.forward(x)
        if self.kind == "functional bn":
            y = y + F.batch_norm(x.mean(1, keepdim=True).expand(-1, 4, -1, -1), self.bn.running_mean,
                                 self.bn.running_var, training=False)
        return y + self.bn2(self.wrapped(x))  # self.features is read by the caller after forward


@pytest.mark.parametrize("kind,reason", [
    ("no_grad conv", "grad or autocast"),
    ("stored", "attribute features"),
    ("direct forward", "reads the layer's tensors directly"),
    ("functional bn", "reads the batch norm's tensors directly"),
])
def test_uses_fx_does_not_draw_are_seen(kind, reason):
    original = randomized(Sneaky(kind))
    captured = []
    original.wrapped.register_forward_hook(lambda m, i, out: captured.append(out))  # sees the conv's output
    fused, report = convbn.fuse(original, report=True)
    left = {p.layer: p.reason for p in report.left_alone}
    assert reason in left["conv"] and "hooks of Sequential" in left["wrapped.0"]
    assert fused_count(fused) == 0
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    torch.testing.assert_close(fused(x), original(x))


class BatchNormFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv.register_buffer("mask", torch.ones(4, 3, 3, 3))
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn(self.conv(x))))


def test_pairs_that_would_reorder_parameters_or_drop_extra_state_are_left_alone():
    original = randomized(BatchNormFirst())
    fused, report = convbn.fuse(original, report=True)
    assert fused_count(fused) == 1 and isinstance(fused.conv2, ConvBN2d)
    assert "more than its standard tensors (mask)" in report.left_alone[0].reason
    original.conv.mask = None
    del original.conv._buffers["mask"]
    fused, report = convbn.fuse(original, report=True)
    assert "reorder" in report.left_alone[0].reason
    assert [id(p) for p in fused.parameters()] != [] and list(fused.state_dict()) == list(original.state_dict())


def test_keyword_calls_and_python_random_drop_paths():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = block(3, 4), block(4, 4)
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            import random
            x = self.a(x)
            if self.training and random.random() < 0.5:  # drop the block
                return x + self.bn(input=self.conv(x))
            return self.b(x) + self.bn(input=self.conv(x))

    original = randomized(Model())
    fused, report = convbn.fuse(original, report=True)
    assert [p.layer for p in report.left_alone] == ["conv"] and "more than the layer's output" in report.left_alone[0].reason
    import random
    state = random.getstate()
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    for _ in range(4):
        random.setstate(state)
        a = original(x)
        random.setstate(state)
        torch.testing.assert_close(fused(x), a)
        state = random.getstate()


def test_slot_forwards_batch_norm_methods_and_empty_batches_train():
    original = randomized(nn.Sequential(block(3, 4)))
    fused = convbn.fuse(original)
    slot, layer = fused[0][1], fused[0][0]
    slot.requires_grad_(False)
    assert not layer.bn_weight.requires_grad and layer.weight.requires_grad
    slot.reset_running_stats()
    assert layer.num_batches_tracked.item() == 0 and torch.equal(layer.running_var, torch.ones(4, dtype=F64))
    # An empty batch in training (a detection head with no boxes): as nn.
    reference = copy.deepcopy(original)
    reference[0][1].reset_running_stats()
    x = torch.randn(0, 3, 5, 5, dtype=F64, requires_grad=True)
    out, ref = fused(x), reference(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(layer.running_mean, reference[0][1].running_mean)
    assert layer.num_batches_tracked.item() == reference[0][1].num_batches_tracked.item() == 1


def test_an_uncopyable_model_says_to_fuse_in_place():
    model = nn.Sequential(block(3, 4))
    model.generator = (i for i in range(3))  # generators cannot be deep-copied
    with pytest.raises(RuntimeError, match="inplace=True"):
        convbn.fuse(model)
    assert isinstance(convbn.fuse(model, inplace=True)[0][0], ConvBN2d)
