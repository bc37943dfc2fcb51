"""ONNX export of convbn's layers with both exporters of the installed torch:
the default dynamo-based one and the TorchScript-based one (dynamo=False),
and of a torch.export ExportedProgram holding convbn's operators (the
dynamo-based exporter with convbn.onnx_translation_table()).

An eval-mode layer must export as a standard ONNX graph (default domain,
the exporter's default opset, no convbn op): one Conv (Gemm for LinearBN1d)
whose weight and bias initializers are the fold, checked against a float64
fold computed here from nn's formulas; onnxruntime must compute what eager
convbn computes, within float32 rounding, and what the float64 nn.Conv2d +
nn.BatchNorm2d pair computes. Training mode must fail with convbn's message
saying to call .eval().

onnx, onnxruntime and onnxscript come from PyPI (scripts/install_deps.sh,
which CI runs): where one is missing the module is skipped."""

import contextlib
import copy
import io
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

_INSTALL = "the ONNX export tests need onnx, onnxruntime and onnxscript: run scripts/install_deps.sh"
onnx = pytest.importorskip("onnx", reason=_INSTALL)
onnxruntime = pytest.importorskip("onnxruntime", reason=_INSTALL)
pytest.importorskip("onnxscript", reason=_INSTALL)  # what the dynamo-based exporter writes the graph with

import onnx.numpy_helper  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import convbn  # noqa: E402
from conftest import assert_close_to_reference, randomize_batch_norms  # noqa: E402
from deploy_helpers import assert_within  # noqa: E402

HAS_TORCHSCRIPT_EXPORTER = hasattr(torch.onnx, "register_custom_op_symbolic")
NO_TORCHSCRIPT_EXPORTER = pytest.mark.skipif(
    not HAS_TORCHSCRIPT_EXPORTER, reason="this torch has no TorchScript-based ONNX exporter")
# How a model reaches ONNX: torch.onnx.export of the model with the default
# (dynamo-based) exporter or the TorchScript-based one, or torch.export
# first and torch.onnx.export of its ExportedProgram with convbn's
# translation table.
DYNAMO, TORCHSCRIPT, EXPORTED_PROGRAM = "dynamo", "torchscript", "exported-program"
ROUTES = [
    pytest.param(DYNAMO, id=DYNAMO),
    pytest.param(TORCHSCRIPT, id=TORCHSCRIPT, marks=NO_TORCHSCRIPT_EXPORTER),
    pytest.param(EXPORTED_PROGRAM, id=EXPORTED_PROGRAM),
]
MODULE_ROUTES = ROUTES[:2]
# Both exporters' default opset (torch's constant; 20 in torch 2.13).
DEFAULT_OPSET = torch.onnx._constants.ONNX_DEFAULT_OPSET
# ORT's kernels sum in another order than eager's: float32 rounding of a
# few layers, relative to the output's scale. A wrong fold is off by O(1).
ORT_TOLERANCE = 1e-5

# Deprecations torch emits about its own exporters (the TorchScript-based
# one is deprecated, and calls its own deprecated helpers): not convbn's.
TORCH_DEPRECATIONS = (
    "You are using the legacy TorchScript-based ONNX export",
    "The feature will be removed",
    "`isinstance(treespec, LeafSpec)` is deprecated",
)
CONVBN_DIR = os.path.dirname(os.path.abspath(convbn.__file__))


@contextlib.contextmanager
def no_convbn_warnings(tracer_warnings=False):
    """No warning raised from convbn's code (but TracerWarnings where
    tracer_warnings says they are expected), and no deprecation but torch's
    own about its exporters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if tracer_warnings and issubclass(w.category, torch.jit.TracerWarning):
            continue
        assert not os.path.abspath(w.filename).startswith(CONVBN_DIR), f"convbn warned: {w.message}"
        if issubclass(w.category, (DeprecationWarning, FutureWarning)):
            assert str(w.message).startswith(TORCH_DEPRECATIONS), f"unexpected deprecation: {w.message}"


def export(model, x, route, dynamic_batch=False, tracer_warnings=False, **options) -> onnx.ModelProto:
    """model exported for input x by route as a user does it (default opset,
    default options unless given), loaded back."""
    names = {"input_names": ["input"], "output_names": ["output"]}
    with no_convbn_warnings(tracer_warnings):
        dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        if route == EXPORTED_PROGRAM:
            exported = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
            program = torch.onnx.export(exported, verbose=False, **names,
                                        custom_translation_table=convbn.onnx_translation_table(), **options)
            return program.model_proto
        if route == DYNAMO:
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes,
                                        **names, **options)
            return program.model_proto
        dynamic_axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, dynamic_axes=dynamic_axes, **names, **options)
        return onnx.load_from_string(buffer.getvalue())


def assert_standard_graph(proto: onnx.ModelProto) -> None:
    """Passes onnx.checker; only the standard domain, at the exporter's
    default opset; no convbn op, no local functions."""
    onnx.checker.check_model(proto, full_check=True)
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    assert opsets == {"ai.onnx": DEFAULT_OPSET}, opsets
    assert not proto.functions
    for node in proto.graph.node:
        assert node.domain in ("", "ai.onnx") and "convbn" not in node.op_type.lower(), node


def nodes(proto: onnx.ModelProto, op_type: str) -> list:
    return [n for n in proto.graph.node if n.op_type == op_type]


def initializer(proto: onnx.ModelProto, name: str) -> torch.Tensor:
    """The initializer called name: what a node input must be when the
    exporter has folded what feeds it."""
    found = [i for i in proto.graph.initializer if i.name == name]
    assert found, f"{name} is computed in the graph, not an initializer"
    return torch.from_numpy(onnx.numpy_helper.to_array(found[0]).copy())


def run_onnxruntime(proto: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def fold_float64(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm):
    """nn's batch norm in eval, folded into layer's weight and bias in
    float64: W * gamma / sqrt(var + eps), (b - mean) * gamma / sqrt(var + eps) + beta."""
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.affine:
        scale = scale * bn.weight.double()
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    folded_bias = (bias - bn.running_mean.double()) * scale
    if bn.affine:
        folded_bias = folded_bias + bn.bias.double()
    weight = layer.weight.double()
    return weight * scale.view(-1, *[1] * (weight.dim() - 1)), folded_bias


def pair(layer: nn.Module, bn: nn.Module) -> nn.Sequential:
    """nn's pair with random batch norm statistics, gamma and beta, in eval."""
    return randomize_batch_norms(nn.Sequential(layer, bn), bias_std=0.5).eval()


def assert_matches(y, x, model, reference, name):
    """onnxruntime's y for x: what eager model computes (float32 rounding
    apart) and what the float64 reference computes (float32's tolerance)."""
    with torch.no_grad():
        eager = model(x)
        expected = copy.deepcopy(reference).double()(x.double())
    assert y.shape == eager.shape
    assert_within(y, eager, ORT_TOLERANCE, f"{name}: onnxruntime against eager")
    assert_close_to_reference(y, expected, torch.float32, f"{name}: onnxruntime against the float64 nn pair")


CONV_CONFIGS = {
    "plain": dict(in_channels=3, out_channels=8, kernel_size=3, padding=1),
    "bias-stride-groups": dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1, groups=2, bias=True),
    "depthwise": dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),
    "rectangular-dilated": dict(in_channels=3, out_channels=6, kernel_size=(3, 5), stride=(2, 1), padding=(2, 1),
                                dilation=(2, 1)),
    "valid": dict(in_channels=3, out_channels=5, kernel_size=2, padding="valid", bias=True),
    "no-affine": dict(in_channels=3, out_channels=8, kernel_size=3, padding=1, affine=False),
    "reflect": dict(in_channels=3, out_channels=8, kernel_size=3, padding=(1, 2), padding_mode="reflect"),
    "replicate": dict(in_channels=3, out_channels=8, kernel_size=3, padding=1, padding_mode="replicate"),
    "circular": dict(in_channels=3, out_channels=8, kernel_size=3, padding=(2, 1), padding_mode="circular"),
    # Even kernel and dilation: 'same' pads one more row at the bottom, in Python.
    "odd-same": dict(in_channels=3, out_channels=6, kernel_size=(4, 3), padding="same", dilation=(1, 2)),
    "odd-same-reflect": dict(in_channels=3, out_channels=6, kernel_size=(4, 3), padding="same", dilation=(1, 2),
                             padding_mode="reflect", bias=True),
}
BN_ARGS = ("affine", "eps")
LAYER_KINDS = ["ConvBN2d", "SyncConvBN2d"]


def conv_pair(config):
    conv_args = {k: v for k, v in config.items() if k not in BN_ARGS}
    conv_args.setdefault("bias", False)
    bn_args = {k: v for k, v in config.items() if k in BN_ARGS}
    return pair(nn.Conv2d(**conv_args), nn.BatchNorm2d(config["out_channels"], **bn_args))


def fused_conv(conv, bn, kind):
    layer = convbn.ConvBN2d.from_modules(conv, bn).eval()
    return convbn.SyncConvBN2d.from_conv_bn(layer) if kind == "SyncConvBN2d" else layer


def kinds_and_routes(kinds):
    """(kind, route) for each kind and route, but the Sync kinds by the
    module routes only: in eval a Sync layer calls the operator the plain
    one calls, so its ExportedProgram is the same."""
    return [
        pytest.param(kind, route.values[0], id=f"{kind}-{route.id}", marks=route.marks)
        for kind in kinds for route in ROUTES
        if not (kind.startswith("Sync") and route.values[0] == EXPORTED_PROGRAM)
    ]


@pytest.mark.parametrize("kind, route", kinds_and_routes(LAYER_KINDS))
@pytest.mark.parametrize("config", CONV_CONFIGS.values(), ids=CONV_CONFIGS.keys())
def test_conv_bn_exports_one_conv_with_the_fold(config, kind, route):
    """One Conv (after a Pad where the input is padded in Python) taking the
    folded weight and bias as initializers, and no batch norm left."""
    reference = conv_pair(config)
    conv, bn = reference
    layer = fused_conv(conv, bn, kind)
    x = torch.randn(2, conv.in_channels, 9, 10)
    proto = export(layer, x, route)

    assert_standard_graph(proto)
    [conv_node] = nodes(proto, "Conv")
    assert not nodes(proto, "BatchNormalization")
    folded_weight, folded_bias = fold_float64(conv, bn)
    assert_close_to_reference(initializer(proto, conv_node.input[1]), folded_weight, torch.float32, "weight")
    assert_close_to_reference(initializer(proto, conv_node.input[2]), folded_bias, torch.float32, "bias")
    assert_matches(run_onnxruntime(proto, x), x, layer, reference, kind)


ND_CONFIGS = {
    "conv1d-same": (nn.Conv1d, nn.BatchNorm1d, dict(in_channels=3, out_channels=6, kernel_size=4, padding="same",
                                                     bias=True), (2, 3, 11)),
    "conv3d": (nn.Conv3d, nn.BatchNorm3d, dict(in_channels=2, out_channels=4, kernel_size=3, stride=(1, 2, 1),
                                                padding=1), (2, 2, 5, 6, 4)),
    "conv-transpose1d": (nn.ConvTranspose1d, nn.BatchNorm1d, dict(in_channels=4, out_channels=6, kernel_size=3,
                                                                   stride=2, groups=2), (2, 4, 7)),
    "conv-transpose2d": (nn.ConvTranspose2d, nn.BatchNorm2d, dict(in_channels=4, out_channels=6, kernel_size=3,
                                                                   stride=2, padding=1, output_padding=1, groups=2,
                                                                   bias=True), (2, 4, 5, 6)),
    "conv-transpose3d": (nn.ConvTranspose3d, nn.BatchNorm3d, dict(in_channels=2, out_channels=4, kernel_size=2,
                                                                   stride=2), (2, 2, 3, 4, 3)),
}


def fold_float64_transposed(conv, bn):
    """fold_float64 for a transposed conv: its weight (in, out / groups, k...)
    scaled along each group's output channels."""
    scale = (bn.running_var.double() + bn.eps).rsqrt() * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    folded_bias = (bias - bn.running_mean.double()) * scale + bn.bias.double()
    w = conv.weight.double()
    g = conv.groups
    grouped = w.reshape(g, w.shape[0] // g, w.shape[1], -1) * scale.view(g, 1, w.shape[1], 1)
    return grouped.reshape(w.shape), folded_bias


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("config", ND_CONFIGS.values(), ids=ND_CONFIGS.keys())
def test_1d_3d_and_transposed_layers_export_one_conv_with_the_fold(config, route):
    """ConvBN1d/3d and ConvTransposeBN1d/2d/3d: one Conv (ConvTranspose) on
    the folded weight and bias, as for ConvBN2d."""
    conv_type, bn_type, conv_args, shape = config
    reference = pair(conv_type(**{"bias": False, **conv_args}), bn_type(conv_args["out_channels"]))
    conv, bn = reference
    layer = convbn.modules.CONV_BN_TYPES[(conv_type, bn_type)].from_modules(conv, bn).eval()
    x = torch.randn(shape)
    proto = export(layer, x, route)

    assert_standard_graph(proto)
    [conv_node] = nodes(proto, "ConvTranspose" if conv.transposed else "Conv")
    assert not nodes(proto, "BatchNormalization")
    folded_weight, folded_bias = (fold_float64_transposed if conv.transposed else fold_float64)(conv, bn)
    assert_close_to_reference(initializer(proto, conv_node.input[1]), folded_weight, torch.float32, "weight")
    assert_close_to_reference(initializer(proto, conv_node.input[2]), folded_bias, torch.float32, "bias")
    assert_matches(run_onnxruntime(proto, x), x, layer, reference, type(layer).__name__)


# Each fused activation, its nn module, and the ONNX ops it may export as
# (the exporters write some as a composition).
ACTIVATION_EXPORTS = {
    "relu": (nn.ReLU(), {"Relu"}),
    "relu6": (nn.ReLU6(), {"Clip", "HardSigmoid", "Mul", "Min", "Max", "Relu"}),
    "leaky_relu": (nn.LeakyReLU(-0.3), {"LeakyRelu"}),
    "silu": (nn.SiLU(), {"Sigmoid", "Mul"}),
    "hardswish": (nn.Hardswish(), {"HardSwish", "HardSigmoid", "Mul"}),
    "sigmoid": (nn.Sigmoid(), {"Sigmoid"}),
    "gelu": (nn.GELU(), {"Gelu", "Erf", "Mul", "Add", "Div"}),
}


@pytest.mark.parametrize("route", ROUTES + [pytest.param("scripted", id="scripted", marks=NO_TORCHSCRIPT_EXPORTER)])
@pytest.mark.parametrize("activation", ACTIVATION_EXPORTS.keys())
@pytest.mark.filterwarnings(r"ignore::DeprecationWarning:torch\.jit")
def test_fused_activation_exports_after_one_conv(activation, route):
    """A ConvBN2d with a fused activation: one Conv with the fold, then the
    activation's ONNX ops, computing what nn's conv -> bn -> activation
    computes. "scripted": a torch.jit.script'ed layer through the
    TorchScript-based exporter, which reaches conv_bn_eval's symbolic."""
    module, allowed = ACTIVATION_EXPORTS[activation]
    conv, bn = conv_pair(CONV_CONFIGS["bias-stride-groups"])
    layer = convbn.ConvBN2d.from_modules(conv, bn, activation=module).eval()
    assert layer.activation == activation
    reference = nn.Sequential(conv, bn, copy.deepcopy(module)).eval()
    x = torch.randn(2, 4, 9, 9) * 2
    if route == "scripted":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own
            proto = export(torch.jit.script(layer), x, TORCHSCRIPT)
    else:
        proto = export(layer, x, route)

    assert_standard_graph(proto)
    assert len(nodes(proto, "Conv")) == 1 and not nodes(proto, "BatchNormalization")
    others = {n.op_type for n in proto.graph.node} - {"Conv", "Constant"}
    assert others and others <= allowed, others
    assert_matches(run_onnxruntime(proto, x), x, layer, reference, activation)


LINEAR_CONFIGS = {
    "plain": dict(bias=False),
    "bias": dict(bias=True),
    "no-affine": dict(bias=True, affine=False, eps=1e-3),
}


@pytest.mark.parametrize("kind, route", kinds_and_routes(["LinearBN1d", "SyncLinearBN1d"]))
@pytest.mark.parametrize("config", LINEAR_CONFIGS.values(), ids=LINEAR_CONFIGS.keys())
def test_linear_bn_exports_one_gemm_with_the_fold(config, kind, route):
    bn_args = {k: v for k, v in config.items() if k in BN_ARGS}
    reference = pair(nn.Linear(12, 7, bias=config["bias"]), nn.BatchNorm1d(7, **bn_args))
    linear, bn = reference
    layer = convbn.LinearBN1d.from_modules(linear, bn).eval()
    if kind == "SyncLinearBN1d":
        layer = convbn.SyncLinearBN1d.from_linear_bn(layer)
    x = torch.randn(4, 12)
    proto = export(layer, x, route)

    assert_standard_graph(proto)
    [gemm] = nodes(proto, "Gemm")
    assert not nodes(proto, "BatchNormalization")
    weight = initializer(proto, gemm.input[1])
    transposed = {a.name: a.i for a in gemm.attribute}.get("transB", 0)
    folded_weight, folded_bias = fold_float64(linear, bn)
    assert_close_to_reference(weight if transposed else weight.T, folded_weight, torch.float32, "weight")
    assert_close_to_reference(initializer(proto, gemm.input[2]), folded_bias, torch.float32, "bias")
    assert_matches(run_onnxruntime(proto, x), x, layer, reference, kind)


class OddSamePadding(nn.Module):
    """convbn.functional.conv_bn with an odd 'same' padding, which it pads in
    Python before the operator."""

    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        c, b = self.conv, self.bn
        return convbn.functional.conv_bn(
            x, c.weight, c.bias, b.weight, b.bias, b.running_mean, b.running_var, training=False, eps=b.eps,
            padding="same", dilation=c.dilation)


@pytest.mark.parametrize("route", ROUTES)
def test_functional_conv_bn_with_odd_same_padding_exports(route):
    reference = conv_pair(CONV_CONFIGS["odd-same"])
    model = OddSamePadding(*reference).eval()
    x = torch.randn(2, 3, 9, 10)
    # conv_bn computes the extra padding from weight.shape, whose sizes
    # torch.jit.trace (the TorchScript-based exporter) hands out as tensors:
    # it warns that they become constants, which a weight's shape is.
    proto = export(model, x, route, tracer_warnings=route == TORCHSCRIPT)
    assert_standard_graph(proto)
    assert len(nodes(proto, "Conv")) == 1 and not nodes(proto, "BatchNormalization")
    assert_matches(run_onnxruntime(proto, x), x, model, reference, "functional conv_bn")


@pytest.mark.parametrize("route", MODULE_ROUTES)
def test_layers_without_running_statistics_export_batch_statistics(route):
    """track_running_stats=False: batch statistics in eval too. They export
    as nn's pair exports them (F.conv2d / F.linear, then F.batch_norm), in
    eval and, as nothing would be updated, in training mode too."""
    torch.manual_seed(0)
    reference = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2, groups=2), nn.BatchNorm2d(4, affine=False, track_running_stats=False),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6, track_running_stats=False),
    )
    randomize_batch_norms(reference, bias_std=0.5)
    model = convbn.fuse(reference).eval()
    assert sum(isinstance(m, (convbn.ConvBN2d, convbn.LinearBN1d)) for m in model.modules()) == 3
    reference.eval()
    x = torch.randn(5, 3, 10, 10) * 2 + 0.5
    for training in (False, True):
        model.train(training)
        # The TorchScript-based exporter exports in eval mode unless told to preserve the mode.
        options = {"training": torch.onnx.TrainingMode.PRESERVE} if route == TORCHSCRIPT else {}
        proto = export(model, x, route, **options)
        assert_standard_graph(proto)
        assert len(nodes(proto, "Conv")) == 2
        assert_matches(run_onnxruntime(proto, x), x, model, reference, f"training={training}")


@pytest.mark.parametrize("route", ROUTES)
def test_fused_resnet18_exports_with_a_dynamic_batch(route):
    """convbn.fuse(ResNet-18): 20 Convs with folded initializers (weights up
    to 512x512x3x3, far over the dynamo-based exporter's constant-folding
    limit), no batch norm; exported at batch 2, run at batch 3 and 5."""
    torch.manual_seed(0)
    reference = randomize_batch_norms(convbn.models.resnet18(num_classes=10)).eval()
    model = convbn.fuse(reference)
    assert sum(isinstance(m, convbn.ConvBN2d) for m in model.modules()) == 20
    proto = export(model, torch.randn(2, 3, 32, 32), route, dynamic_batch=True)

    assert_standard_graph(proto)
    convs = nodes(proto, "Conv")
    assert len(convs) == 20 and not nodes(proto, "BatchNormalization")
    initializer_names = {i.name for i in proto.graph.initializer}
    # The fold is done in the file, not computed at run time.
    assert all(set(conv_node.input[1:3]) <= initializer_names for conv_node in convs)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for batch in (3, 5):
        x = torch.randn(batch, 3, 32, 32)
        assert_matches(run_onnxruntime(proto, x), x, model, reference, f"batch {batch}")


class ConvThenLinear(nn.Module):
    """conv, ReLU, global average pooling repeated to linear's input size,
    then linear."""

    def __init__(self, conv, linear):
        super().__init__()
        self.conv, self.linear = conv, linear

    def forward(self, x):
        return self.linear(torch.relu(self.conv(x)).mean((2, 3)).repeat(1, 4))


@pytest.mark.parametrize("route", ROUTES)
def test_large_layers_export_one_conv_and_one_gemm_with_the_fold(route):
    """The graph is the layers' Conv and Gemm with the folded initializers
    and the ops between, nothing more, whatever the size of the weights."""
    torch.manual_seed(0)
    # Weights of 36864 and 24576 elements, over the dynamo-based exporter's
    # constant-folding limit (8192): a fold left to its constant folding
    # would stay in the graph as a Mul.
    conv, bn = conv_pair(dict(in_channels=64, out_channels=64, kernel_size=3, padding=1))
    linear, linear_bn = pair(nn.Linear(256, 96, bias=True), nn.BatchNorm1d(96))
    reference = ConvThenLinear(nn.Sequential(conv, bn), nn.Sequential(linear, linear_bn)).eval()
    model = ConvThenLinear(convbn.ConvBN2d.from_modules(conv, bn), convbn.LinearBN1d.from_modules(linear, linear_bn))
    model = copy.deepcopy(model).eval()  # its own tensors
    x = torch.randn(2, 64, 6, 6)
    proto = export(model, x, route)
    assert_standard_graph(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops[0] == "Conv" and ops.count("Conv") == 1 and ops.count("Gemm") == 1, ops
    assert not {"Mul", "Div", "Sqrt", "BatchNormalization"} & set(ops), ops
    [conv_node], [gemm] = nodes(proto, "Conv"), nodes(proto, "Gemm")
    folded_weight, folded_bias = fold_float64(conv, bn)
    assert_close_to_reference(initializer(proto, conv_node.input[1]), folded_weight, torch.float32, "conv weight")
    assert_close_to_reference(initializer(proto, conv_node.input[2]), folded_bias, torch.float32, "conv bias")
    weight = initializer(proto, gemm.input[1])
    transposed = {a.name: a.i for a in gemm.attribute}.get("transB", 0)
    folded_weight, folded_bias = fold_float64(linear, linear_bn)
    assert_close_to_reference(weight if transposed else weight.T, folded_weight, torch.float32, "linear weight")
    assert_close_to_reference(initializer(proto, gemm.input[2]), folded_bias, torch.float32, "linear bias")
    assert_matches(run_onnxruntime(proto, x), x, model, reference, "large layers")
    if route == DYNAMO:
        # The table is for ExportedPrograms; a model exports the same with it.
        with_table = export(model, x, route, custom_translation_table=convbn.onnx_translation_table())
        assert [n.op_type for n in with_table.graph.node] == ops


TRAINING_MODE_ERROR = "convbn: cannot export {} to ONNX in training mode"


def training_layers():
    """{case: (model in training mode, input, the layer the error names)}."""
    torch.manual_seed(0)
    return {
        "ConvBN2d": (nn.Sequential(convbn.ConvBN2d(3, 8, 3), nn.ReLU()), torch.randn(2, 3, 8, 8), "ConvBN2d"),
        "LinearBN1d": (nn.Sequential(convbn.LinearBN1d(6, 4)), torch.randn(3, 6), "LinearBN1d"),
        "SyncConvBN2d": (nn.Sequential(convbn.SyncConvBN2d(3, 8, 3)), torch.randn(2, 3, 8, 8), "SyncConvBN2d"),
        "SyncLinearBN1d": (nn.Sequential(convbn.SyncLinearBN1d(6, 4)), torch.randn(3, 6), "SyncLinearBN1d"),
        # A LinearBN1d made by fuse computes nn's pair on (N, C, L) input.
        "fused-LinearBN1d-3d": (convbn.fuse(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))),
                                torch.randn(3, 4, 4), "LinearBN1d"),
    }


@pytest.mark.parametrize("case", training_layers().keys())
@pytest.mark.parametrize("route", MODULE_ROUTES)
def test_training_mode_export_says_to_call_eval(route, case):
    """Running statistics to update: convbn's error, naming the layer's
    class, from either exporter, and the model's state as it was."""
    model, x, layer = training_layers()[case]
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # The TorchScript-based exporter switches the model to eval (its default
    # training=TrainingMode.EVAL) unless told to keep the mode.
    options = {"training": torch.onnx.TrainingMode.PRESERVE} if route == TORCHSCRIPT else {}
    with pytest.raises(Exception) as raised:
        export(model, x, route, **options)
    # The dynamo-based exporter wraps it in its TorchExportError, whose
    # message quotes convbn's.
    message = str(raised.value)
    assert TRAINING_MODE_ERROR.format(layer) in message
    assert "Call model.eval() before torch.onnx.export" in message
    for key, value in model.state_dict().items():  # nothing was updated
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


class SyncOperator(nn.Module):
    """Calls a synchronized training operator as a SyncConvBN2d or
    SyncLinearBN1d does in a process group of two (without one here:
    torch.export traces with the operators' fake kernels)."""

    def __init__(self, operator, *weight_shape):
        super().__init__()
        self.operator = operator
        self.weight = nn.Parameter(torch.randn(weight_shape))
        self.bn_weight = nn.Parameter(torch.ones(weight_shape[0]))
        self.bn_bias = nn.Parameter(torch.zeros(weight_shape[0]))

    def forward(self, x):
        op = getattr(torch.ops.convbn, self.operator)
        if self.operator == "sync_conv_bn_train":
            return op(x, self.weight, None, self.bn_weight, self.bn_bias, [1, 1], [0, 0], [1, 1], 1, 1e-5,
                      "group", 2)[0]
        return op(x, self.weight, None, self.bn_weight, self.bn_bias, 1e-5, "group", 2)[0]


def exported_training_programs():
    """{case: (model, input, the layer the error names, the operator the
    program holds)}: models torch.export traces in training mode, or with
    batch statistics in eval (track_running_stats=False)."""
    torch.manual_seed(0)
    return {
        "ConvBN2d": (nn.Sequential(convbn.ConvBN2d(3, 8, 3), nn.ReLU()).train(), torch.randn(2, 3, 8, 8),
                     "ConvBN2d", "conv_bn_train"),
        "LinearBN1d": (nn.Sequential(convbn.LinearBN1d(6, 4)).train(), torch.randn(3, 6), "LinearBN1d",
                       "linear_bn_train"),
        "sync_conv_bn_train": (SyncOperator("sync_conv_bn_train", 8, 3, 3, 3), torch.randn(2, 3, 8, 8),
                               "SyncConvBN2d", "sync_conv_bn_train"),
        "sync_linear_bn_train": (SyncOperator("sync_linear_bn_train", 4, 6), torch.randn(3, 6), "SyncLinearBN1d",
                                 "sync_linear_bn_train"),
        "no-running-stats-eval": (convbn.ConvBN2d(3, 8, 3, track_running_stats=False).eval(),
                                  torch.randn(2, 3, 8, 8), "ConvBN2d", "conv_bn_train"),
    }


@pytest.mark.parametrize("case", exported_training_programs().keys())
def test_exported_program_in_training_mode_says_to_export_in_eval_mode(case):
    """An ExportedProgram holding a training operator: convbn's error
    (quoted by the exporter's), naming the layer and the operator, saying
    to call .eval() before torch.export.export; the model as it was."""
    model, x, layer, operator = exported_training_programs()[case]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception) as raised:
        export(model, x, EXPORTED_PROGRAM)
    message = str(raised.value)
    assert TRAINING_MODE_ERROR.format(layer) in message
    assert f"This ExportedProgram holds convbn.{operator}" in message
    assert "Call model.eval() before torch.export.export" in message
    assert "track_running_stats=False" in message  # what to do where eval uses batch statistics
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_translation_table_holds_the_eval_and_training_operators():
    """The table translates convbn's eval and training operators, and
    nothing else (fold_conv_bn keeps its decomposition)."""
    ops = torch.ops.convbn
    table = convbn.onnx_translation_table()
    assert set(table) == {
        ops.conv_bn_eval.default, ops.linear_bn_eval.default, ops.conv_bn_train.default,
        ops.sync_conv_bn_train.default, ops.linear_bn_train.default, ops.sync_linear_bn_train.default,
    }
    assert all(callable(translation) for translation in table.values())


@NO_TORCHSCRIPT_EXPORTER
def test_torchscript_exporter_exports_a_training_model_in_eval_mode_by_default():
    """Its default training=TrainingMode.EVAL: the eval graph, and the model
    back in training mode afterwards."""
    model, x, _ = training_layers()["ConvBN2d"]
    with torch.no_grad():  # running statistics away from 0 and 1
        model[0].running_mean.normal_()
        model[0].running_var.uniform_(0.5, 2)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proto = export(model, x, TORCHSCRIPT)
    assert model.training and model[0].training
    for key, value in model.state_dict().items():  # nothing was updated
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert_standard_graph(proto)
    assert len(nodes(proto, "Conv")) == 1
    reference = nn.Sequential(nn.Sequential(*model[0].to_modules()), nn.ReLU())
    assert_matches(run_onnxruntime(proto, x), x, model.eval(), reference.eval(), "eval graph")


@NO_TORCHSCRIPT_EXPORTER
@pytest.mark.filterwarnings(r"ignore::DeprecationWarning:torch\.jit")
def test_torchscript_exporter_exports_scripted_models():
    """A scripted model reaches the operators without convbn's Python: the
    symbolics fold in eval, and refuse the training operators."""
    reference = conv_pair(CONV_CONFIGS["bias-stride-groups"])
    model = nn.Sequential(convbn.ConvBN2d.from_modules(*reference), nn.ReLU()).eval()
    reference = nn.Sequential(reference, nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own
        scripted = torch.jit.script(model)
    x = torch.randn(2, 4, 9, 9)
    proto = export(scripted, x, TORCHSCRIPT)
    assert_standard_graph(proto)
    assert [n.op_type for n in proto.graph.node] == ["Conv", "Relu"]
    assert_matches(run_onnxruntime(proto, x), x, model, reference, "scripted")

    scripted.train()
    with pytest.raises(RuntimeError, match=TRAINING_MODE_ERROR.format("ConvBN2d")):
        export(scripted, x, TORCHSCRIPT, training=torch.onnx.TrainingMode.PRESERVE)


def test_import_convbn_registers_the_symbolics_without_importing_onnx():
    """`import convbn` alone lets the TorchScript-based exporter export a
    layer, warns nothing, and imports neither onnx nor onnxscript; nor does
    building the translation table."""
    code = textwrap.dedent("""
        import io, sys
        import torch, convbn
        assert "onnx" not in sys.modules and "onnxscript" not in sys.modules, "import convbn imported onnx"
        convbn.onnx_translation_table()
        assert "onnx" not in sys.modules and "onnxscript" not in sys.modules, "the table imported onnx"
        if hasattr(torch.onnx, "register_custom_op_symbolic"):
            import warnings
            warnings.simplefilter("ignore", DeprecationWarning)  # torch's, about its legacy exporter
            layer = convbn.ConvBN2d(3, 4, 3).eval()
            torch.onnx.export(layer, (torch.randn(1, 3, 5, 5),), io.BytesIO(), dynamo=False)
    """)
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_convbn_without_the_torchscript_based_exporter():
    """A torch whose TorchScript-based exporter is gone (no
    torch.onnx.register_custom_op_symbolic, no torch._C.Value): import convbn
    registers no symbolic and works, and so does the translation table."""
    code = textwrap.dedent("""
        import torch, torch.onnx
        del torch.onnx.register_custom_op_symbolic
        del torch._C.Value
        import convbn
        assert convbn._onnx.register_custom_op_symbolic is None
        assert len(convbn.onnx_translation_table()) == 6
        layer = convbn.ConvBN2d(3, 4, 3).eval()
        pair = torch.nn.Sequential(*layer.to_modules()).eval()
        x = torch.randn(1, 3, 5, 5)
        torch.testing.assert_close(layer(x), pair(x))
    """)
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_training_step_during_another_threads_export_computes_as_usual(monkeypatch):
    """Both exporters' flags are process-global: with them set, as while
    another thread exports, an eager training step in this thread (not
    tracing) updates its running statistics as without them."""
    # The private flag convbn reads: a rename in torch shows here.
    from torch.onnx._internal.exporter import _flags

    assert convbn.functional._onnx_exporter_flags is _flags and isinstance(_flags._is_onnx_exporting, bool)
    assert convbn.functional._detect_fake_mode is not None
    torch.manual_seed(0)
    model = nn.Sequential(convbn.ConvBN2d(3, 8, 3), nn.Flatten(), convbn.LinearBN1d(8 * 6 * 6, 4)).train()
    expected_model = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    expected = expected_model(x)
    monkeypatch.setattr(_flags, "_is_onnx_exporting", True)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    output = model(x)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    for (key, value), expected_value in zip(model.state_dict().items(), expected_model.state_dict().values()):
        torch.testing.assert_close(value, expected_value, rtol=0, atol=0, msg=key)
    assert model[0].num_batches_tracked.item() == 1
