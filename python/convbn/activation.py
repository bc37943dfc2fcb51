"""The activations a conv + batch norm operator can apply in its
normalization pass (the `activation` argument of convbn.functional.conv_bn
and of the ConvBN modules), and their nn modules."""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Each name, as the operators take it (csrc/activation.h), computes what
# this nn module computes.
ACTIVATIONS = ("identity", "relu", "relu6", "leaky_relu", "silu", "hardswish", "sigmoid", "gelu")
_MODULE_OF = {
    "identity": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU, "hardswish": nn.Hardswish, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
}
DEFAULT_NEGATIVE_SLOPE = 0.01  # nn.LeakyReLU's


def check_activation(activation: str, negative_slope: float) -> None:
    """ValueError naming the argument, as the operators raise it. It is
    TorchScript-compatible (functional.conv_bn calls it)."""
    # ACTIVATIONS spelled out: TorchScript reads no global tuple.
    if activation not in ["identity", "relu", "relu6", "leaky_relu", "silu", "hardswish", "sigmoid", "gelu"]:
        raise ValueError(
            "convbn: unknown activation '" + activation + "'; expected one of 'identity', 'relu', 'relu6', "
            "'leaky_relu', 'silu', 'hardswish', 'sigmoid', 'gelu' (nn.GELU() with approximate='none'); "
            "apply any other activation after the module"
        )
    if not math.isfinite(negative_slope):
        raise ValueError("convbn: negative_slope must be a finite number, got " + str(negative_slope))


def apply_activation(x: Tensor, activation: str, negative_slope: float) -> Tensor:
    """The activation with nn's functional forms: the paths that do not run
    the fused operators (ONNX export, an empty batch) apply it this way. It
    is TorchScript-compatible."""
    if activation == "relu":
        return F.relu(x)
    if activation == "relu6":
        return F.relu6(x)
    if activation == "leaky_relu":
        return F.leaky_relu(x, negative_slope)
    if activation == "silu":
        return F.silu(x)
    if activation == "hardswish":
        return F.hardswish(x)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation != "identity":
        raise ValueError("convbn: unknown activation '" + activation + "'")
    return x


def activation_of(module: Optional[nn.Module]) -> Optional[Tuple[str, float]]:
    """(activation, negative_slope) computing what `module` computes, or None
    when no fused activation does (a subclass, GELU(approximate='tanh'), a
    Hardtanh other than ReLU6's range, ...). None -> identity."""
    if module is None:
        return ("identity", DEFAULT_NEGATIVE_SLOPE)
    kind = type(module)
    if kind is nn.LeakyReLU:
        return ("leaky_relu", float(module.negative_slope))
    if kind is nn.GELU:
        return ("gelu", DEFAULT_NEGATIVE_SLOPE) if module.approximate == "none" else None
    if kind is nn.Hardtanh and float(module.min_val) == 0.0 and float(module.max_val) == 6.0:
        return ("relu6", DEFAULT_NEGATIVE_SLOPE)
    for name, module_type in _MODULE_OF.items():
        if kind is module_type and name != "gelu":
            return (name, DEFAULT_NEGATIVE_SLOPE)
    return None


def activation_module(activation: str, negative_slope: float) -> nn.Module:
    """The nn module computing `activation` (nn.Identity for identity)."""
    check_activation(activation, negative_slope)
    if activation == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    return _MODULE_OF[activation]()


def activation_repr(activation: str, negative_slope: float) -> str:
    """The modules' extra_repr part: empty for identity."""
    if activation == "identity":
        return ""
    if activation == "leaky_relu":
        return f", activation='leaky_relu', negative_slope={negative_slope}"
    return f", activation={activation!r}"
