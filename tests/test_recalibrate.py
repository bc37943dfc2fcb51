"""convbn.recalibrate against statistics computed directly over the
concatenated data (float64): for a single layer of each kind, and for every
batch norm of a whole network, with uneven batch sizes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convbn
from conftest import assert_close_to_reference

F64 = torch.float64


def uneven_batches(shape, sizes=(5, 3, 8, 2)):
    return [torch.randn(n, *shape, dtype=F64) * 2 + 1 for n in sizes]


def direct_statistics(values, dims):
    """Mean and unbiased variance per channel over all values at once."""
    return values.mean(dims), values.var(dims, unbiased=True)


def assert_recalibrated(layer, mean, var):
    assert_close_to_reference(layer.running_mean, mean, F64, "running_mean")
    assert_close_to_reference(layer.running_var, var, F64, "running_var")


@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_layer(bias):
    layer = convbn.ConvBN2d(3, 6, 3, stride=2, padding=1, bias=bias, momentum=None, dtype=F64)
    batches = uneven_batches((3, 9, 9))
    recalibrated = convbn.recalibrate(layer, batches, progress=False)
    assert recalibrated is layer
    y = F.conv2d(torch.cat(batches), layer.weight, layer.bias, stride=2, padding=1)
    assert_recalibrated(layer, *direct_statistics(y, (0, 2, 3)))


def test_linear_bn_layer():
    layer = convbn.LinearBN1d(7, 4, bias=True, dtype=F64)
    batches = uneven_batches((7,))
    convbn.recalibrate(layer, batches, progress=False)
    y = F.linear(torch.cat(batches), layer.weight, layer.bias)
    assert_recalibrated(layer, *direct_statistics(y, (0,)))


@pytest.mark.parametrize("make,shape,dims", [
    (lambda: nn.BatchNorm1d(4, dtype=F64), (4,), (0,)),
    (lambda: nn.BatchNorm1d(4, dtype=F64), (4, 6), (0, 2)),
    (lambda: nn.BatchNorm2d(4, momentum=None, dtype=F64), (4, 5, 5), (0, 2, 3)),
    (lambda: nn.BatchNorm3d(4, dtype=F64), (4, 3, 3, 3), (0, 2, 3, 4)),
])
def test_plain_batch_norm_layers(make, shape, dims):
    layer = make()
    batches = uneven_batches(shape)
    convbn.recalibrate(layer, batches, progress=False)
    assert_recalibrated(layer, *direct_statistics(torch.cat(batches), dims))


def batch_norm_inputs(model, batches):
    """Each batch norm's input over all batches, concatenated: the reference,
    from forward hooks on the unfused model in training mode (each batch
    normalized with its own statistics, as recalibrate runs it)."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.setdefault(m, []).append(args[0].detach()))
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for hook in hooks:
        hook.remove()
    return {m: torch.cat(values) for m, values in seen.items()}


def test_whole_network_fused_and_unfused():
    torch.manual_seed(0)
    original = convbn.models.lenet_bn().double()
    batches = [torch.rand(n, 1, 28, 28, dtype=F64) for n in (16, 7, 12)]
    reference = copy.deepcopy(original)
    inputs = batch_norm_inputs(reference, batches)

    fused = convbn.fuse(original)
    unfused = copy.deepcopy(original)
    fused.eval()  # recalibrate must leave every module's mode as it was
    convbn.recalibrate(fused, batches, progress=False)
    convbn.recalibrate(unfused, batches, progress=False)
    assert not any(m.training for m in fused.modules())
    assert all(m.training for m in unfused.modules())

    bn_layers = [m for m in reference.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    fused_layers = [m for m in fused.modules() if isinstance(m, (convbn.ConvBN2d, convbn.LinearBN1d))]
    unfused_layers = [m for m in unfused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bn_layers) == len(fused_layers) == len(unfused_layers) == 4
    for bn, fused_layer, unfused_layer in zip(bn_layers, fused_layers, unfused_layers):
        dims = (0,) if inputs[bn].dim() == 2 else (0, 2, 3)
        mean, var = direct_statistics(inputs[bn], dims)
        assert_recalibrated(fused_layer, mean, var)
        assert_recalibrated(unfused_layer, mean, var)
        # Only the statistics change.
        assert fused_layer.num_batches_tracked.item() == 0 and fused_layer.momentum == 0.1
    for (name, p), q in zip(original.named_parameters(), unfused.parameters()):
        assert torch.equal(p, q), name


def test_failure_restores_statistics_and_settings():
    layer = convbn.ConvBN2d(2, 3, 1, dtype=F64)
    layer.running_mean.fill_(0.5)
    layer.num_batches_tracked.fill_(4)
    layer.eval()
    # A batch of one 1x1 image has one value per channel: training refuses it.
    batches = [torch.randn(4, 2, 1, 1, dtype=F64), torch.randn(1, 2, 1, 1, dtype=F64)]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        convbn.recalibrate(layer, batches, progress=False)
    assert layer.running_mean.eq(0.5).all() and layer.running_var.eq(1).all()
    assert layer.num_batches_tracked.item() == 4 and layer.momentum == 0.1 and not layer.training
    with pytest.raises(ValueError, match="yielded no batch"):
        convbn.recalibrate(layer, [], progress=False)
    assert layer.running_mean.eq(0.5).all()


def test_data_loader_batches_device_and_progress_bar(capsys):
    layer = nn.Sequential(nn.Flatten(), convbn.LinearBN1d(6, 3, dtype=F64))
    data = torch.randn(20, 2, 3, dtype=F64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.zeros(20)), batch_size=6)
    convbn.recalibrate(layer, loader, device="cpu")
    assert "recalibrate" in capsys.readouterr().err
    y = F.linear(data.flatten(1), layer[1].weight)
    assert_recalibrated(layer[1], *direct_statistics(y, (0,)))
