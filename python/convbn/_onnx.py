"""ONNX export of convbn's operators.

The default, dynamo-based exporter (torch.onnx.export(..., dynamo=True))
needs nothing registered to export a model: under it convbn's layers compute
as nn's pair (F.conv2d or F.linear, then F.batch_norm; see
functional._conv_bn_prepared), which the exporter folds into one Conv (Gemm)
with the folded weight and bias, and a training-mode layer raises the error
saying to call .eval().

An ExportedProgram (torch.onnx.export(torch.export.export(model), ...))
holds convbn's operators themselves, recorded without convbn's Python.
Without translations the exporter decomposes the CompositeImplicitAutograd
eval operators into the fold computed by ONNX ops, which its optimizer
leaves as a Mul before the Conv on weights over its constant-folding limit
(8192 elements), and fails on the training operators with a bare
ConversionError. onnx_translation_table() returns translations for its
custom_translation_table argument, the exporter's public way to translate a
custom operator (torchvision exposes its operators' translations the same
way; torch has no global registry for them): conv_bn_eval and
linear_bn_eval become Conv (Gemm) followed by an inference
BatchNormalization, which the optimizer folds into one Conv (Gemm) with the
folded weight and bias initializers at any size, as it does nn's pair; the
training operators raise the error saying to call .eval() before
torch.export.export. (fold_conv_bn, whose outputs are tensors for any use,
keeps its decomposition: the fold as ONNX ops, float32 as the kernel.)

The TorchScript-based exporter (dynamo=False) records convbn's operators as
they are and needs a symbolic for each; those registered here write the fold
as ONNX ops on the operator's inputs. With the exporter's defaults
(training=TrainingMode.EVAL, do_constant_folding=True) the inputs are
initializers and the fold is folded: one Conv (Gemm for linear_bn_eval) with
the folded weight and bias, in the standard domain. The training operators'
symbolics raise the error saying to call .eval(): a scripted model
(torch.jit.script) reaches them without running convbn's Python, which
raises it for a traced one.

Importing this module, or calling onnx_translation_table(), imports
torch.onnx, not the onnx or onnxscript packages: the translations import
onnxscript when the exporter calls them."""

from __future__ import annotations  # _C.Value in annotations: gone with the TorchScript-based exporter

from typing import Callable, Dict, Optional

import torch
import torch.onnx
from torch import _C

from .functional import onnx_training_mode_message

try:
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    parse_args = symbolic_helper.parse_args
except ImportError:  # a torch without the TorchScript-based exporter: nothing to register
    register_custom_op_symbolic = None

    def parse_args(*descriptors):
        return lambda symbolic: symbolic

# The symbolics are registered for this opset and up: the exporter takes the
# newest registration at or below the opset it exports to. Everything they
# write (Conv, Gemm, Reshape with a shape input, Cast, Sqrt, Div) exists in
# opset 7, the exporter's minimum (its default is 20); it constant-folds
# from opset 9 on, so below that the fold stays in the graph.
_FIRST_OPSET = 7


def _dtype(value: _C.Value) -> Optional[torch.dtype]:
    """The dtype the exporter recorded for value, if it recorded one."""
    value_type = value.type()
    return value_type.dtype() if isinstance(value_type, _C.TensorType) else None


def _fold(g, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps: float,
          transposed: bool = False, groups: int = 1):
    """ONNX ops computing fold_conv_bn as the C++ kernel does: in float32
    (float64 when the weight or the running variance is float64), cast back
    to the weight's dtype.
        W' = W * bn_weight / sqrt(running_var + eps)     per output channel
        b' = (bias - running_mean) * bn_weight / sqrt(running_var + eps) + bn_bias
    Returns (W', b') as graph values."""
    weight_dtype = _dtype(weight) or torch.float32
    fold_dtype = torch.float64 if torch.float64 in (weight_dtype, _dtype(running_var)) else torch.float32
    onnx_fold_type = _onnx_type(fold_dtype)

    def in_fold_dtype(value):
        return g.op("Cast", value, to_i=onnx_fold_type)

    def present(value) -> bool:
        return value is not None and not value.node().mustBeNone()

    # Div, not Reciprocal: the exporter's constant folding evaluates Div and
    # leaves Reciprocal in the graph.
    eps_constant = g.op("Constant", value_t=torch.tensor(eps, dtype=fold_dtype))
    one = g.op("Constant", value_t=torch.tensor(1.0, dtype=fold_dtype))
    scale = g.op("Div", one, g.op("Sqrt", g.op("Add", in_fold_dtype(running_var), eps_constant)))
    if present(bn_weight):
        scale = g.op("Mul", scale, in_fold_dtype(bn_weight))
    centered_bias = g.op("Neg", in_fold_dtype(running_mean))
    if present(bias):
        centered_bias = g.op("Sub", in_fold_dtype(bias), in_fold_dtype(running_mean))
    folded_bias = g.op("Mul", centered_bias, scale)
    if present(bn_bias):
        folded_bias = g.op("Add", folded_bias, in_fold_dtype(bn_bias))

    def shape_constant(shape):
        return g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64))

    if transposed:
        # A transposed conv's weight (C_in, C_out / groups, k...) as
        # (groups, C_in / groups, C_out / groups, k), scaled along its third
        # dimension, the output channels of each group.
        sizes = weight.type().sizes() if isinstance(weight.type(), _C.TensorType) else None
        if sizes is None or any(d is None for d in sizes):
            raise RuntimeError(
                "convbn: exporting a transposed conv + batch norm in eval mode needs the weight's shape; "
                "export with torch.onnx.export(..., dynamo=True) (the default) instead"
            )
        grouped = g.op("Reshape", in_fold_dtype(weight),
                       shape_constant([groups, sizes[0] // groups, sizes[1], -1]))
        scaled = g.op("Mul", grouped, g.op("Reshape", scale, shape_constant([groups, 1, sizes[1], 1])))
        folded_weight = g.op("Reshape", scaled, shape_constant(list(sizes)))
    else:
        # scale as (C, 1, 1, 1) for a conv weight, (C, 1) for a linear one.
        weight_rank = weight.type().dim() if isinstance(weight.type(), _C.TensorType) else None
        per_output_channel = [-1] + [1] * ((weight_rank or 4) - 1)
        folded_weight = g.op("Mul", in_fold_dtype(weight), g.op("Reshape", scale, shape_constant(per_output_channel)))
    onnx_weight_type = _onnx_type(weight_dtype)
    return g.op("Cast", folded_weight, to_i=onnx_weight_type), g.op("Cast", folded_bias, to_i=onnx_weight_type)


def _onnx_type(dtype: torch.dtype) -> int:
    return torch.onnx.JitScalarType.from_dtype(dtype).onnx_type()


@parse_args("v", "v", "v", "v", "v", "v", "f", "b", "i")
def fold_conv_bn_symbolic(g, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
                          transposed=False, groups=1):
    return _fold(g, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, transposed, groups)


_SQRT1_2 = 0.7071067811865476


def _activation_symbolic(g, x, dtype: Optional[torch.dtype], activation: str, negative_slope: float):
    """The fused activation as ONNX nodes after the folded Conv; constants in
    dtype (the conv's). Every node exists from opset 9 (Erf)."""
    if activation == "identity":
        return x

    def const(value: float):
        return g.op("Constant", value_t=torch.tensor(value, dtype=dtype or torch.float32))

    if activation == "relu":
        return g.op("Relu", x)
    if activation == "relu6":  # exact, where 6 * HardSigmoid(x / 6) rounds
        return g.op("Min", g.op("Relu", x), const(6.0))
    if activation == "leaky_relu":
        return g.op("LeakyRelu", x, alpha_f=negative_slope)
    if activation == "silu":
        return g.op("Mul", x, g.op("Sigmoid", x))
    if activation == "hardswish":  # x * clip(x / 6 + 1/2, 0, 1)
        return g.op("Mul", x, g.op("HardSigmoid", x, alpha_f=1.0 / 6.0, beta_f=0.5))
    if activation == "sigmoid":
        return g.op("Sigmoid", x)
    if activation == "gelu":  # x / 2 * (1 + erf(x / sqrt(2)))
        half_x = g.op("Mul", x, const(0.5))
        return g.op("Mul", half_x, g.op("Add", const(1.0), g.op("Erf", g.op("Mul", x, const(_SQRT1_2)))))
    raise RuntimeError(f"convbn: no ONNX form for the activation {activation!r}")


@parse_args("v", "v", "v", "v", "v", "v", "v", "is", "is", "is", "i", "f", "b", "is", "s", "f")
def conv_bn_eval_symbolic(g, input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                          stride, padding, dilation, groups, eps, transposed=False, output_padding=None,
                          activation="identity", negative_slope=0.01):
    folded_weight, folded_bias = _fold(
        g, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, transposed, groups)
    attributes = {"strides_i": stride, "pads_i": padding + padding, "dilations_i": dilation, "group_i": groups}
    weight_sizes = weight.type().sizes() if isinstance(weight.type(), _C.TensorType) else None
    if weight_sizes is not None:
        attributes["kernel_shape_i"] = weight_sizes[2:]
    if transposed:
        if output_padding and any(output_padding):
            attributes["output_padding_i"] = output_padding
        output = g.op("ConvTranspose", input, folded_weight, folded_bias, **attributes)
    else:
        output = g.op("Conv", input, folded_weight, folded_bias, **attributes)
    return _activation_symbolic(g, output, _dtype(input) or _dtype(weight), activation, negative_slope)


@parse_args("v", "v", "v", "v", "v", "v", "v", "f")
def linear_bn_eval_symbolic(g, input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    folded_weight, folded_bias = _fold(g, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
    # input is (N, in_features), as the operator requires.
    return g.op("Gemm", input, folded_weight, folded_bias, transB_i=1)


# The training operators, the layer each belongs to, and that layer's
# functional form: none has an ONNX form.
_TRAINING_OPERATORS = (
    ("conv_bn_train", "ConvBN2d", "conv_bn"), ("sync_conv_bn_train", "SyncConvBN2d", "conv_bn"),
    ("linear_bn_train", "LinearBN1d", "linear_bn"), ("sync_linear_bn_train", "SyncLinearBN1d", "linear_bn"),
)


def _training_symbolic(layer: str, function: str):
    def refuse(g, *args):
        raise RuntimeError(onnx_training_mode_message(layer, function))

    return refuse


def register() -> None:
    """Registers the TorchScript-based exporter's symbolics for convbn's
    operators. Does nothing where torch has no such exporter any more."""
    if register_custom_op_symbolic is None:
        return
    register_custom_op_symbolic("convbn::fold_conv_bn", fold_conv_bn_symbolic, _FIRST_OPSET)
    register_custom_op_symbolic("convbn::conv_bn_eval", conv_bn_eval_symbolic, _FIRST_OPSET)
    register_custom_op_symbolic("convbn::linear_bn_eval", linear_bn_eval_symbolic, _FIRST_OPSET)
    # A scripted model records the training operators without running
    # convbn's Python, which raises this error for a traced one.
    for op, layer, function in _TRAINING_OPERATORS:
        register_custom_op_symbolic(f"convbn::{op}", _training_symbolic(layer, function), _FIRST_OPSET)


register()


# The dynamo-based exporter's translations, for an ExportedProgram. The
# exporter calls each with the operator's arguments: graph values
# (onnxscript tensors, None for an absent optional tensor) and Python
# values for the rest; the onnxscript ops they call record nodes in its graph.

def _onnxscript_opset():
    import onnxscript  # the exporter needs it already; imported only when it translates

    return onnxscript.opset18


def _present(*values):
    """The ONNX inputs up to the last one given (an optional input left out)."""
    return [v for v in values if v is not None]


def _batch_norm_inference(op, output, weight, bn_weight, bn_bias, running_mean, running_var, eps: float):
    """BatchNormalization (inference) of the Conv or Gemm output, with
    nn's defaults for an absent gamma (ones) and beta (zeros), every
    parameter in the weight's dtype. The exporter's optimizer folds it into
    the Conv/Gemm when all of them are initializers: the parameters and
    buffers are, and constant folding makes the defaults initializers too."""

    def per_channel(value, default: float):
        if value is None:
            return op.Expand(op.CastLike(op.Constant(value_float=default), weight), op.Shape(running_var))
        return value if value.dtype == weight.dtype else op.CastLike(value, weight)

    return op.BatchNormalization(
        output, per_channel(bn_weight, 1.0), per_channel(bn_bias, 0.0), per_channel(running_mean, 0.0),
        per_channel(running_var, 1.0), epsilon=eps)


def _activation_translation(op, x, activation: str, negative_slope: float):
    """The fused activation as ONNX nodes (opset 18) after the Conv."""
    if activation == "identity":
        return x

    def const(value: float):
        return op.CastLike(op.Constant(value_float=value), x)

    if activation == "relu":
        return op.Relu(x)
    if activation == "relu6":
        return op.Clip(x, const(0.0), const(6.0))
    if activation == "leaky_relu":
        return op.LeakyRelu(x, alpha=negative_slope)
    if activation == "silu":
        return op.Mul(x, op.Sigmoid(x))
    if activation == "hardswish":
        return op.HardSwish(x)
    if activation == "sigmoid":
        return op.Sigmoid(x)
    if activation == "gelu":
        return op.Mul(op.Mul(x, const(0.5)), op.Add(const(1.0), op.Erf(op.Mul(x, const(_SQRT1_2)))))
    raise RuntimeError(f"convbn: no ONNX form for the activation {activation!r}")


def conv_bn_eval_translation(input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                             stride, padding, dilation, groups, eps, transposed=False, output_padding=(),
                             activation="identity", negative_slope=0.01):
    """convbn::conv_bn_eval as Conv (ConvTranspose) then BatchNormalization,
    then its activation: one Conv with the folded weight and bias once the
    exporter has optimized the graph."""
    op = _onnxscript_opset()
    if transposed:
        extra = {"output_padding": list(output_padding)} if any(output_padding) else {}
        output = op.ConvTranspose(*_present(input, weight, bias), strides=list(stride), pads=list(padding) * 2,
                                  dilations=list(dilation), group=groups, **extra)
    else:
        output = op.Conv(*_present(input, weight, bias), strides=list(stride), pads=list(padding) * 2,
                         dilations=list(dilation), group=groups)
    normalized = _batch_norm_inference(op, output, weight, bn_weight, bn_bias, running_mean, running_var, eps)
    return _activation_translation(op, normalized, activation, negative_slope)


def linear_bn_eval_translation(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    """convbn::linear_bn_eval (input (N, in_features)) as Gemm then
    BatchNormalization: one Gemm with the folded weight and bias once the
    exporter has optimized the graph."""
    op = _onnxscript_opset()
    output = op.Gemm(*_present(input, weight, bias), transB=1)
    return _batch_norm_inference(op, output, weight, bn_weight, bn_bias, running_mean, running_var, eps)


def _training_translation(operator: str, layer: str, function: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(onnx_training_mode_message(layer, function, exported_operator=f"convbn.{operator}"))

    refuse.__name__ = refuse.__qualname__ = f"{operator}_translation"
    return refuse


def onnx_translation_table() -> Dict[torch._ops.OpOverload, Callable]:
    """Translations of convbn's operators for the dynamo-based ONNX
    exporter, for exporting an ExportedProgram that holds them:

        exported = torch.export.export(model.eval(), (x,))
        torch.onnx.export(exported, f="model.onnx",
                          custom_translation_table=convbn.onnx_translation_table())

    Each eval layer becomes one Conv (Gemm) with the folded weight and bias
    initializers; the training operators (a program exported in training
    mode) raise an error saying to export the model in eval mode. Exporting
    the model itself (torch.onnx.export(model, ...)) needs no table; passing
    it there changes nothing."""
    ops = torch.ops.convbn
    table: Dict[torch._ops.OpOverload, Callable] = {
        ops.conv_bn_eval.default: conv_bn_eval_translation,
        ops.linear_bn_eval.default: linear_bn_eval_translation,
    }
    for operator, layer, function in _TRAINING_OPERATORS:
        table[getattr(ops, operator).default] = _training_translation(operator, layer, function)
    return table
