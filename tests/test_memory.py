"""What is kept for backward, measured with saved_tensors_hooks: the
memory-efficient mode keeps no tensor of the conv output's size."""

import pytest
import torch
from torch import nn

from convbn import ConvBN2d


def saved_tensors(fn, x):
    """(output, [saved tensors]) of fn(x), each storage counted once."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    unique = {}
    for t in saved:
        if t.numel():
            unique[t.untyped_storage().data_ptr()] = t
    return out, list(unique.values())


def nbytes(tensors):
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride,in_ch,out_ch", [(1, 8, 8), (2, 8, 16), (1, 16, 32)])
def test_memory_efficient_mode_saves_no_conv_output(stride, in_ch, out_ch, channels_last, device):
    conv, bn = nn.Conv2d(in_ch, out_ch, 3, stride, 1, device=device), nn.BatchNorm2d(out_ch, device=device)
    x = torch.randn(4, in_ch, 16, 16, device=device, requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    pair_out, pair_saved = saved_tensors(lambda t: bn(conv(t)), x)

    fused = ConvBN2d.from_modules(conv, bn, memory_efficient=True)
    out, fused_saved = saved_tensors(fused, x)
    allowed = {t.untyped_storage().data_ptr() for t in [x, *fused.parameters()]}
    for t in fused_saved:
        # Only the input, the parameters, and per-channel statistics.
        assert t.untyped_storage().data_ptr() in allowed or t.numel() == out_ch, t.shape
    assert nbytes(fused_saved) < nbytes(pair_saved)
    # The pair keeps the conv output for BatchNorm's backward.
    assert nbytes(pair_saved) - nbytes(fused_saved) >= out.numel() * out.element_size()

    keep_output = ConvBN2d.from_modules(conv, bn, memory_efficient=False)
    _, kept = saved_tensors(keep_output, x)
    assert any(t.shape == out.shape for t in kept)
