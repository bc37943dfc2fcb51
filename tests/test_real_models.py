"""convbn.fuse on real third-party networks: pytorchcv's ImageNet and CIFAR
models and MONAI's 2-D and 3-D networks, as their authors wrote them, in
float64.

For each model: the conv -> batch norm pairs are counted by running it
(forward hooks: a BatchNorm1d/2d/3d whose input is the very tensor a
Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear just returned), independently
of fuse's analysis; each fused pair must become the fused module of its conv's
kind (Conv3d -> ConvBN3d, ConvTranspose3d -> ConvTransposeBN3d, ...). fuse (with an example input, so
forwards fx cannot trace are decided by a run) must fuse every one of them
except those the architecture itself makes unfusable (listed below with the
reason), and report each pair it left alone. Then the fused model must train
and evaluate exactly as the original: two SGD steps (outputs, every
gradient, every state_dict entry), eval with grad and under no_grad, and
checkpoints load both ways.

pytorchcv is installed with --no-deps (it declares torchvision, which has no
CPU build here); its model modules are imported directly."""

import copy
import importlib

import pytest
import torch
from torch import nn

import convbn
from conftest import randomize_batch_norms

pytest.importorskip("pytorchcv", reason="pip install --no-deps pytorchcv (scripts/install_deps.sh does)")
pytest.importorskip("monai", reason="pip install --no-deps monai (scripts/install_deps.sh does)")

F64 = torch.float64

# (name, module, constructor, kwargs, input shape, pairs the architecture
# makes unfusable, a word every such pair's reason contains, or a tuple of
# words one of which each reason contains)
CV = "pytorchcv.models."
MODELS = [
    ("resnet20_cifar10", CV + "resnet_cifar", "resnet20_cifar10", {}, (2, 3, 32, 32), 0, None),
    ("resnext20_16x4d_cifar10", CV + "resnext_cifar", "resnext20_16x4d_cifar10", {}, (2, 3, 32, 32), 0, None),
    ("seresnet20_cifar10", CV + "seresnet_cifar", "seresnet20_cifar10", {}, (2, 3, 32, 32), 0, None),
    # The init block's conv output also feeds the first unit's identity add.
    ("preresnet20_cifar10", CV + "preresnet_cifar", "preresnet20_cifar10", {}, (2, 3, 32, 32), 1, "also used"),
    ("mobilenet_wd4", CV + "mobilenet", "mobilenet_wd4", {}, (2, 3, 224, 224), 0, None),
    ("mobilenetv2_wd4", CV + "mobilenetv2", "mobilenetv2_wd4", {}, (2, 3, 224, 224), 0, None),
    ("mobilenetv3_small_w7d20", CV + "mobilenetv3", "mobilenetv3_small_w7d20", {}, (2, 3, 224, 224), 0, None),
    # TF-style 'same' padding computed from the input size: fx cannot trace it.
    ("efficientnet_b0b", CV + "efficientnet", "efficientnet_b0b", {}, (2, 3, 64, 64), 0, None),
    ("mixnet_s", CV + "mixnet", "mixnet_s", {}, (2, 3, 224, 224), 0, None),
    ("shufflenet_g3_wd4", CV + "shufflenet", "shufflenet_g3_wd4", {}, (2, 3, 224, 224), 0, None),
    ("shufflenetv2_wd2", CV + "shufflenetv2", "shufflenetv2_wd2", {}, (2, 3, 224, 224), 0, None),
    # The init conv's output is also concatenated into the dense features.
    ("densenet40_k12_bc_cifar10", CV + "densenet_cifar", "densenet40_k12_bc_cifar10", {}, (2, 3, 32, 32), 1,
     "also used"),
    ("dla46c", CV + "dla", "dla46c", {}, (2, 3, 224, 224), 0, None),
    ("hrnet_w18_small_v1", CV + "hrnet", "hrnet_w18_small_v1", {}, (2, 3, 224, 224), 0, None),
    ("regnetx002", CV + "regnet", "regnetx002", {}, (2, 3, 64, 64), 0, None),
    # Stochastic depth and shake-shake/shake-drop: random in training only.
    ("resdropresnet20_cifar10", CV + "resdropresnet_cifar", "resdropresnet20_cifar10", {}, (2, 3, 32, 32), 0, None),
    ("shakeshakeresnet20_2x16d_cifar10", CV + "shakeshakeresnet_cifar", "shakeshakeresnet20_2x16d_cifar10", {},
     (2, 3, 32, 32), 0, None),
    ("shakedropresnet20_cifar10", CV + "shakedropresnet_cifar", "shakedropresnet20_cifar10", {}, (2, 3, 32, 32), 0,
     None),
    # DIA-Net shares one attention LSTM across a stage's units.
    ("diaresnet20_cifar10", CV + "diaresnet_cifar", "diaresnet20_cifar10", {}, (2, 3, 32, 32), 0, None),
    ("diapreresnet20_cifar10", CV + "diapreresnet_cifar", "diapreresnet20_cifar10", {}, (2, 3, 32, 32), 1,
     "also used"),
    # ShaResNet shares a 3x3 conv between units, each with its own batch norm.
    ("sharesnet18", CV + "sharesnet", "sharesnet18", {}, (2, 3, 224, 224), 8, "not this batch norm"),
    ("lednet_cityscapes", CV + "lednet", "lednet_cityscapes", {"in_size": (64, 64)}, (2, 3, 64, 64), 0, None),
    ("fastscnn_cityscapes_aux", CV + "fastscnn", "fastscnn_cityscapes", {"in_size": (64, 64), "aux": True},
     (2, 3, 64, 64), 0, None),
    ("msdnet22_cifar10", CV + "msdnet_cifar10", "msdnet22_cifar10", {}, (2, 3, 32, 32), 0, None),
    ("monai_UNet", "monai.networks.nets", "UNet",
     {"spatial_dims": 2, "in_channels": 3, "out_channels": 2, "channels": (8, 16, 32), "strides": (2, 2),
      "num_res_units": 1, "norm": "batch"}, (2, 3, 32, 32), 0, None),
    ("monai_BasicUNet", "monai.networks.nets", "BasicUNet",
     {"spatial_dims": 2, "in_channels": 3, "out_channels": 2, "features": (4, 4, 8, 8, 16, 4),
      "norm": ("batch", {"affine": True})}, (2, 3, 32, 32), 0, None),
    ("monai_AttentionUnet", "monai.networks.nets", "AttentionUnet",
     {"spatial_dims": 2, "in_channels": 3, "out_channels": 2, "channels": (8, 16, 32), "strides": (2, 2)},
     (2, 3, 32, 32), 0, None),
    # DynUNet's and RegUNet's residual blocks register conv1, conv2, norm1,
    # norm2: fusing would reorder model.parameters() (optimizer state).
    ("monai_DynUNet", "monai.networks.nets", "DynUNet",
     {"spatial_dims": 2, "in_channels": 3, "out_channels": 2, "kernel_size": [3, 3, 3], "strides": [1, 2, 2],
      "upsample_kernel_size": [2, 2], "norm_name": "batch", "filters": [8, 16, 32]}, (2, 3, 32, 32), 10, "reorder"),
    ("monai_SENet_small", "monai.networks.nets", "SENet",
     {"spatial_dims": 2, "in_channels": 3, "block": "se_resnet_bottleneck", "layers": (1, 1, 1, 1), "groups": 1,
      "reduction": 4, "inplanes": 8, "downsample_kernel_size": 1, "input_3x3": False, "num_classes": 3},
     (2, 3, 64, 64), 0, None),
    ("monai_DenseNet_small", "monai.networks.nets", "DenseNet",
     {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "init_features": 8, "growth_rate": 4,
      "block_config": (2, 2), "bn_size": 2}, (2, 3, 64, 64), 0, None),
    ("monai_EfficientNetBN_b0", "monai.networks.nets", "EfficientNetBN",
     {"model_name": "efficientnet-b0", "pretrained": False, "spatial_dims": 2, "in_channels": 3,
      "num_classes": 3}, (2, 3, 64, 64), 0, None),
    # Three convs and two ConvTranspose2d (the upsampling deconvs) whose
    # outputs also feed a residual add.
    ("monai_SegResNetDS", "monai.networks.nets", "SegResNetDS",
     {"spatial_dims": 2, "in_channels": 3, "out_channels": 2, "init_filters": 8, "blocks_down": (1, 1, 1),
      "norm": "batch"}, (2, 3, 32, 32), 5, "also used"),
    ("monai_RegUNet", "monai.networks.nets", "RegUNet",
     {"spatial_dims": 2, "in_channels": 3, "num_channel_initial": 4, "depth": 2, "out_channels": 2},
     (2, 3, 32, 32), 6, "reorder"),
    # MONAI's 3-D networks (spatial_dims=3): Conv3d -> BatchNorm3d and
    # ConvTranspose3d -> BatchNorm3d pairs.
    ("monai_UNet_3d", "monai.networks.nets", "UNet",
     {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": (4, 8, 16), "strides": (2, 2),
      "num_res_units": 1, "norm": "batch"}, (2, 1, 16, 16, 16), 0, None),
    ("monai_UNet_3d_no_res_units", "monai.networks.nets", "UNet",
     {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": (4, 8, 16), "strides": (2, 2),
      "num_res_units": 0, "norm": "batch"}, (2, 1, 16, 16, 16), 0, None),
    ("monai_BasicUNet_3d", "monai.networks.nets", "BasicUNet",
     {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "features": (4, 4, 8, 8, 16, 4),
      "norm": ("batch", {"affine": True})}, (2, 1, 16, 16, 16), 0, None),
    ("monai_AttentionUnet_3d", "monai.networks.nets", "AttentionUnet",
     {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": (4, 8, 16), "strides": (2, 2)},
     (2, 1, 16, 16, 16), 0, None),
    # Pre-activation dense layers: only the transitions' and the stem's
    # batch norms follow a conv.
    ("monai_DenseNet_3d_small", "monai.networks.nets", "DenseNet",
     {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "init_features": 8, "growth_rate": 4,
      "block_config": (2, 2), "bn_size": 2}, (2, 1, 16, 16, 16), 0, None),
    ("monai_ResNet_3d", "monai.networks.nets", "ResNet",
     {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 16, 32], "spatial_dims": 3,
      "n_input_channels": 1, "num_classes": 3}, (2, 1, 16, 16, 16), 0, None),
    ("monai_SENet_3d_small", "monai.networks.nets", "SENet",
     {"spatial_dims": 3, "in_channels": 1, "block": "se_resnet_bottleneck", "layers": (1, 1, 1, 1), "groups": 1,
      "reduction": 4, "inplanes": 8, "downsample_kernel_size": 1, "input_3x3": False, "num_classes": 3,
      "dropout_prob": None}, (2, 1, 16, 16, 16), 0, None),
    ("monai_HighResNet_3d", "monai.networks.nets", "HighResNet",
     {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "layer_params": (
         {"name": "conv_0", "n_features": 4, "kernel_size": 3},
         {"name": "res_1", "n_features": 4, "kernels": (3, 3), "repeat": 1},
         {"name": "res_2", "n_features": 8, "kernels": (3, 3), "repeat": 1},
         {"name": "conv_1", "n_features": 8, "kernel_size": 1}, {"name": "conv_2", "kernel_size": 1})},
     (2, 1, 16, 16, 16), 0, None),
    # SegResNet with batch norm: pre-activation residual blocks that register
    # norm1, norm2 before conv1, conv2 (fusing would reorder parameters), and
    # the stem's and the downsampling convs' outputs also feed the residual add.
    ("monai_SegResNet_3d", "monai.networks.nets", "SegResNet",
     {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 8, "norm": "batch",
      "blocks_down": (1, 1, 1), "blocks_up": (1, 1)}, (2, 1, 16, 16, 16), 9, ("also used", "reorder")),
    # The stem's, the downsampling convs' and the deconvs' (ConvTranspose3d)
    # outputs also feed a residual add.
    ("monai_SegResNetDS_3d", "monai.networks.nets", "SegResNetDS",
     {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 8, "blocks_down": (1, 1, 1),
      "norm": "batch"}, (2, 1, 16, 16, 16), 5, "also used"),
    ("monai_DynUNet_3d", "monai.networks.nets", "DynUNet",
     {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "kernel_size": [3, 3, 3], "strides": [1, 2, 2],
      "upsample_kernel_size": [2, 2], "norm_name": "batch", "filters": [4, 8, 16]}, (2, 1, 16, 16, 16), 10,
     "reorder"),
    # (VNet is left out: its fixed 16..256 channels and 5x5x5 kernels make
    # one float64 forward and backward at the smallest input, 16^3, take
    # seconds.)
]

# The layers that form pairs with a batch norm, the batch norms, and the
# fused module each (layer type, batch norm type) becomes.
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
               nn.Linear)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FUSED_TYPES = (convbn.modules._ConvBNNd, convbn.LinearBN1d)
FUSED_KIND = {
    (nn.Conv1d, nn.BatchNorm1d): "ConvBN1d", (nn.Conv2d, nn.BatchNorm2d): "ConvBN2d",
    (nn.Conv3d, nn.BatchNorm3d): "ConvBN3d", (nn.ConvTranspose1d, nn.BatchNorm1d): "ConvTransposeBN1d",
    (nn.ConvTranspose2d, nn.BatchNorm2d): "ConvTransposeBN2d", (nn.ConvTranspose3d, nn.BatchNorm3d): "ConvTransposeBN3d",
    (nn.Linear, nn.BatchNorm1d): "LinearBN1d",
}


def build(spec):
    name, module, ctor, kwargs, shape, _, _ = spec
    torch.manual_seed(0)
    return randomize_batch_norms(getattr(importlib.import_module(module), ctor)(**kwargs).double(), mean_std=0.2)


def pairs_by_running(model, x):
    """{(conv name, bn name)}: a BatchNorm1d/2d/3d called on the very tensor
    a conv (of any rank, transposed or not) or Linear call returned, in one
    training-mode forward of a copy."""
    model = copy.deepcopy(model).train()
    names = {id(m): n for n, m in model.named_modules()}
    produced, pairs = {}, set()
    for m in model.modules():
        if type(m) in LAYER_TYPES:
            m.register_forward_hook(lambda mod, i, out: produced.__setitem__(id(out), (mod, out)))
        if type(m) in BN_TYPES:
            def pre(mod, inputs):
                hit = produced.get(id(inputs[0]))
                if hit is not None and hit[1] is inputs[0]:
                    pairs.add((names[id(hit[0])], names[id(mod)]))
            m.register_forward_pre_hook(pre)
    with torch.random.fork_rng():
        model(x)
    return pairs


def flat(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    return [t for o in output for t in flat(o)]


def assert_close_as_the_pair(got, want, pair, name):
    """got (fused) against want (original), allowing 10x the difference
    between want and `pair` (the original run again in channels_last: other
    conv algorithms, so the same math in another rounding order; for 3-D
    networks also on the batch in reverse order, see assert_same_training)
    plus 1e-9 of the scale. Deep nets at batch 2 amplify float64 rounding through every
    batch norm, so a fixed tolerance would be unfair; a real defect is off
    by far more than the pair's own spread."""
    for i, (g, w, r) in enumerate(zip(flat(got), flat(want), flat(pair))):
        scale = max(w.abs().max().item(), 1.0) if w.numel() else 1.0
        spread = (r.double() - w.double()).abs().max().item() if w.numel() else 0.0
        torch.testing.assert_close(g, w, rtol=0, atol=10 * spread + 1e-9 * scale,
                                   msg=lambda m: f"{name} [{i}] (pair spread {spread:.3g}): {m}")


def assert_same_training(original, fused, x, steps=2):
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    pair = copy.deepcopy(original).to(memory_format=layout) if layout is not None else copy.deepcopy(original)
    x_cl = x.contiguous(memory_format=layout) if layout is not None else x
    # CPU float64 3-D convolutions compute a channels_last_3d input exactly
    # as a contiguous one (no spread at all, while the fused model sums in
    # another order): the 3-D pair also runs on the batch in reverse order
    # (the same math: batch norm's and the weight gradients' sums over the
    # batch in another order), its outputs flipped back. (The 3-D networks
    # here have no dropout, whose draws would then land on other samples.)
    flip = x.dim() == 5
    if flip:
        x_cl = x_cl.flip(0)

    def run(model, inputs):
        outputs = flat(model(inputs))
        return [o.flip(0) for o in outputs] if flip and model is pair else outputs
    models = (original, pair, fused)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in models]
    for m in models:
        m.train()
    for step in range(steps):
        outputs = []
        for model, inputs in zip(models, (x, x_cl, x)):
            torch.manual_seed(100 + step)  # the same dropout / drop-path draws
            outputs.append(run(model, inputs))
        assert_close_as_the_pair(outputs[2], outputs[0], outputs[1], f"train output, step {step}")
        torch.manual_seed(7)
        weights = [torch.randn_like(o) for o in outputs[0]]
        for outs in outputs:
            sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        variables = [m.state_dict(keep_vars=True) for m in models]
        for name, p in variables[0].items():
            if isinstance(p, nn.Parameter):
                got = variables[2][name].grad
                assert (got is None) == (p.grad is None), name
                if p.grad is not None:
                    assert_close_as_the_pair(got, p.grad, variables[1][name].grad, f"grad {name}, step {step}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    states = [m.state_dict() for m in models]
    for name, value in states[0].items():
        assert_close_as_the_pair(states[2][name], value, states[1][name], name)
    for m in models:
        m.eval()
    outs = [run(m, inputs) for m, inputs in zip(models, (x, x_cl, x))]
    assert_close_as_the_pair(outs[2], outs[0], outs[1], "eval")
    with torch.no_grad():
        outs = [run(m, inputs) for m, inputs in zip(models, (x, x_cl, x))]
    assert_close_as_the_pair(outs[2], outs[0], outs[1], "eval, no_grad")


@pytest.mark.parametrize("spec", MODELS, ids=[m[0] for m in MODELS])
def test_fuse_real_model(spec):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    _, _, _, _, shape, unfusable, reason_word = spec
    original = build(spec)
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=F64)
    pairs = pairs_by_running(original, x)
    assert pairs, "the sample should hold conv -> batch norm pairs"

    fused, report = convbn.fuse(original, report=True, example_inputs=(x,))
    assert type(fused) is type(original)
    fused_pairs = {(p.layer, p.bn) for p in report.fused}
    left = {(p.layer, p.bn): p.reason for p in report.left_alone}
    # Every pair the run shows is either fused or reported with its reason.
    assert pairs <= fused_pairs | set(left), sorted(pairs - fused_pairs - set(left))
    assert len(fused_pairs & pairs) == len(pairs) - unfusable, {p: left.get(p) for p in pairs - fused_pairs}
    words = reason_word if isinstance(reason_word, tuple) else (reason_word,)
    for pair in pairs - fused_pairs:
        assert any(word in left[pair] for word in words), (pair, left[pair])
    # Each fused pair became the fused module of its kind, at the layer's place.
    modules = dict(original.named_modules())
    fused_modules = dict(fused.named_modules())
    for p in report.fused:
        kind = FUSED_KIND[type(modules[p.layer]), type(modules[p.bn])]
        assert p.kind == kind and type(fused_modules[p.layer]).__name__ == kind, (p, type(fused_modules[p.layer]))
        assert isinstance(fused_modules[p.bn], convbn.FusedBatchNormSlot), p
    assert sum(isinstance(m, FUSED_TYPES) for m in fused.modules()) == len(report.fused)
    if len(shape) == 5:  # every 3-D pair is a Conv3d or ConvTranspose3d -> BatchNorm3d one
        assert {type(modules[c]) for c, _ in pairs} <= {nn.Conv3d, nn.ConvTranspose3d}
        assert {type(modules[b]) for _, b in pairs} == {nn.BatchNorm3d}

    assert_same_training(copy.deepcopy(original), fused, x)

    # Checkpoints, both ways, key for key.
    fresh = copy.deepcopy(fused)
    fresh.load_state_dict(original.state_dict())
    for name, value in original.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    back = build(spec)
    back.load_state_dict(fused.state_dict())
    for name, value in fused.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    restored = convbn.unfuse(fused)
    assert not any(isinstance(m, (*FUSED_TYPES, convbn.FusedBatchNormSlot)) for m in restored.modules())
    assert [type(m) for m in restored.modules()] == [type(m) for m in original.modules()]
    assert list(restored.state_dict()) == list(original.state_dict())
