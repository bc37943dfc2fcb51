"""What is kept for backward, measured with saved_tensors_hooks: the
memory-efficient mode keeps no tensor of the conv output's size; in eval
mode with weights that train (frozen batch norm) only the input and the
layer's own tensors are kept."""

import pytest
import torch
from torch import nn

from conftest import nbytes, saved_tensors
from convbn import ConvBN2d, LinearBN1d


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride,in_ch,out_ch", [(1, 8, 8), (2, 8, 16), (1, 16, 32)])
def test_memory_efficient_mode_saves_no_conv_output(stride, in_ch, out_ch, channels_last, device):
    conv, bn = nn.Conv2d(in_ch, out_ch, 3, stride, 1, device=device), nn.BatchNorm2d(out_ch, device=device)
    x = torch.randn(4, in_ch, 16, 16, device=device, requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    pair_out, pair_saved = saved_tensors(lambda: bn(conv(x)))

    fused = ConvBN2d.from_modules(conv, bn, memory_efficient=True)
    out, fused_saved = saved_tensors(lambda: fused(x))
    allowed = {t.untyped_storage().data_ptr() for t in [x, *fused.parameters()]}
    for t in fused_saved:
        # Only the input, the parameters, and per-channel statistics.
        assert t.untyped_storage().data_ptr() in allowed or t.numel() == out_ch, t.shape
    assert nbytes(fused_saved) < nbytes(pair_saved)
    # The pair keeps the conv output for BatchNorm's backward.
    assert nbytes(pair_saved) - nbytes(fused_saved) >= out.numel() * out.element_size()

    keep_output = ConvBN2d.from_modules(conv, bn, memory_efficient=False)
    _, kept = saved_tensors(lambda: keep_output(x))
    assert any(t.shape == out.shape for t in kept)


def _frozen_batch_norm_pairs(device):
    """(fused layer, its nn pair, input) for a conv and a linear layer, in
    eval mode with trained-looking running statistics: batch norm frozen
    while the weights train."""
    torch.manual_seed(0)
    cases = []
    for fused, x in (
        (ConvBN2d(6, 8, 3, padding=1, groups=2, bias=True), torch.randn(4, 6, 12, 12)),
        (LinearBN1d(10, 7, bias=True), torch.randn(5, 10)),
    ):
        fused = fused.double().to(device)
        with torch.no_grad():
            fused.bn_weight.uniform_(0.5, 1.5)
            fused.bn_bias.uniform_(-1, 1)
            fused.running_mean.normal_(0, 0.5)
            fused.running_var.uniform_(0.5, 2.0)
        cases.append((fused.eval(), nn.Sequential(*fused.to_modules()).eval(), x.double().to(device)))
    return cases


def test_frozen_batch_norm_keeps_only_input_and_weights(device):
    """Eval mode with weights that train: the node keeps the input, the
    layer's own tensors and per-channel vectors, not a folded copy of the
    weight, nor (as the pair does) the conv output."""
    for fused, pair, x in _frozen_batch_norm_pairs(device):
        x.requires_grad_()
        out, saved = saved_tensors(lambda: fused(x))
        own = {t.untyped_storage().data_ptr() for t in [x, *fused.parameters(), *fused.buffers()]}
        channels = fused.running_mean.numel()
        # Beyond its own tensors, per-channel vectors only (what it needs of
        # the running statistics).
        extra = [t for t in saved if t.untyped_storage().data_ptr() not in own and t.shape != (channels,)]
        assert not extra, [tuple(t.shape) for t in extra]
        pair_out, pair_saved = saved_tensors(lambda: pair(x))
        assert nbytes(pair_saved) > nbytes(saved) + out.numel() * out.element_size() // 2


@pytest.mark.parametrize("create_graph", [False, True])
def test_frozen_batch_norm_gradients_match_the_pair(device, create_graph):
    """The gradients of the input and of every parameter (batch norm frozen
    at its running statistics) against nn's pair in float64, also through a
    second differentiation."""
    for fused, pair, x in _frozen_batch_norm_pairs(device):
        grads = []
        for model in (fused, pair):
            xi = x.clone().requires_grad_()
            out = model(xi)
            torch.manual_seed(1)
            weights = torch.rand(out.shape, dtype=out.dtype, device=out.device)
            params = [xi, *model.parameters()]
            first = torch.autograd.grad((out * weights).sum(), params, create_graph=create_graph)
            if create_graph:  # the gradient of the first gradients' squared norm
                # (allow_unused: nothing first-order depends on bn_bias.)
                second = torch.autograd.grad(sum((g * g).sum() for g in first), params, allow_unused=True)
                second = [torch.zeros_like(p) if g is None else g for p, g in zip(params, second)]
                grads.append([*first, *second])
            else:
                grads.append(list(first))
        for ours, theirs in zip(*grads):
            torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)
