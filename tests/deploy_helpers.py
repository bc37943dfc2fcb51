"""What the deployment tests (TorchScript, torch.compile, torch.export)
share: a small network using ConvBN2d in its variants, its nn.Conv2d +
nn.BatchNorm2d twin (the independent reference), one training step, and
comparisons."""

import copy

import torch
from torch import nn

import convbn
from conftest import assert_close_to_reference

# Float64 rounding, relative to a tensor's scale: the bound where Inductor
# generates its own code for ATen ops around the convbn operators.
EXACT_TO = 1e-12


def convbn_net(memory_efficient=True, dtype=torch.float64):
    """ConvBN2d with ints, stride, groups, bias, cumulative momentum, an odd
    'same' padding with reflect mode and dilation, no affine and no running
    statistics (batch statistics in eval too); ReLUs between."""
    torch.manual_seed(0)
    net = nn.Sequential(
        convbn.ConvBN2d(3, 8, 3, padding=1, memory_efficient=memory_efficient),
        nn.ReLU(),
        convbn.ConvBN2d(8, 8, 3, stride=2, padding=1, groups=2, bias=True, momentum=None,
                        memory_efficient=memory_efficient),
        nn.ReLU(),
        convbn.ConvBN2d(8, 6, (4, 3), padding="same", dilation=(1, 2), padding_mode="reflect",
                        eps=1e-3, momentum=0.3, memory_efficient=memory_efficient),
        convbn.ConvBN2d(6, 4, 1, affine=False, track_running_stats=False,
                        memory_efficient=memory_efficient),
    ).to(dtype)
    with torch.no_grad():  # gamma and beta away from their initial 1 and 0
        for layer in net.modules():
            if isinstance(layer, convbn.ConvBN2d) and layer.affine:
                layer.bn_weight.uniform_(0.5, 1.5)
                layer.bn_bias.uniform_(-1, 1)
    return net


def convbn_net_with_statistics(dtype=torch.float64):
    """convbn_net after two training steps (running statistics away from
    their initial 0 and 1), grads cleared, still in train mode."""
    net = convbn_net(dtype=dtype)
    for n in (4, 5):
        train_step(net, *batch(n, dtype=dtype))
    zero_grads(net)
    return net


def pair_twin(net):
    """A copy of net with every ConvBN2d replaced by nn.Sequential(nn.Conv2d,
    nn.BatchNorm2d) holding copies of its tensors."""
    twin = copy.deepcopy(net)
    for i, layer in enumerate(twin):
        if isinstance(layer, convbn.ConvBN2d):
            twin[i] = nn.Sequential(*layer.to_modules())
    return twin


def batch(n, dtype=torch.float64, seed=None):
    """An input of n samples and a gradient for the network's output."""
    generator = torch.Generator().manual_seed(n if seed is None else seed)
    x = torch.randn(n, 3, 12, 12, generator=generator, dtype=dtype) * 2 + 0.5
    grad = torch.randn(n, 4, 6, 6, generator=generator, dtype=dtype)
    return x, grad


def train_step(net, x, grad):
    """Forward and backward once; returns (output, input grad)."""
    x = x.clone().requires_grad_()
    y = net(x)
    y.backward(grad)
    return y.detach(), x.grad


def _state(net):
    """Parameter grads and buffers by the ConvBN2d naming, for eager and
    scripted ConvBN2d layers; a pair twin's (conv, bn) tensors are renamed to
    match."""
    named = {}
    for name, module in net.named_modules():
        if isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[1], nn.BatchNorm2d):
            conv, bn = module
            tensors = {"weight": conv.weight, "bias": conv.bias, "bn_weight": bn.weight, "bn_bias": bn.bias,
                       "running_mean": bn.running_mean, "running_var": bn.running_var,
                       "num_batches_tracked": bn.num_batches_tracked}
        elif isinstance(module, convbn.ConvBN2d) or getattr(module, "original_name", None) == "ConvBN2d":
            tensors = {k: getattr(module, k) for k in (
                "weight", "bias", "bn_weight", "bn_bias", "running_mean", "running_var", "num_batches_tracked")}
        else:
            continue
        for key, t in tensors.items():
            if t is None:
                continue
            if isinstance(t, nn.Parameter) or t.requires_grad:
                named[f"{name}.{key}.grad"] = t.grad
            else:
                named[f"{name}.{key}"] = t
    return named


def assert_same_state(net, other, grad_tol=0.0):
    """Bit-identical buffers (running statistics, num_batches_tracked), and
    parameter grads bit-identical or, with grad_tol, within grad_tol relative
    to their scale."""
    ours, theirs = _state(net), _state(other)
    assert ours.keys() == theirs.keys()
    for key in ours:
        if key.endswith(".grad") and grad_tol:
            assert_within(ours[key], theirs[key], grad_tol, key)
        else:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


def assert_within(actual, expected, tol, name=""):
    """|actual - expected| <= tol * max(1, max |expected|), elementwise."""
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def assert_state_close_to_pair(net, twin):
    """Parameter grads and buffers against the float64 pair twin."""
    ours, theirs = _state(net), _state(twin)
    assert ours.keys() == theirs.keys()
    for key in ours:
        if key.endswith(".bias.grad") and ".bn_bias" not in key:
            # The conv bias's training gradient is exactly 0 (batch norm
            # subtracts it again); the pair returns rounding noise.
            torch.testing.assert_close(ours[key], torch.zeros_like(ours[key]))
            assert theirs[key].abs().max() < 1e-9
            continue
        assert_close_to_reference(ours[key], theirs[key], torch.float64, key)


def zero_grads(*nets):
    for net in nets:
        for p in net.parameters():
            p.grad = None


def assert_matches_eval_net(y, x, net):
    """y, what a deployed copy of the eval-mode float32 net computed for x:
    within 1e-6 (relative to scale) of the net in Python, and as close to the
    float64 pair twin as float32 allows."""
    assert y.dtype == torch.float32
    with torch.no_grad():
        expected = net(x)
        y_pair = pair_twin(net).double()(x.double())
    assert_within(y, expected, 1e-6, "deployed output against Python's")
    assert_close_to_reference(y, y_pair, torch.float32, "deployed output against the float64 pair")
