"""convbn.functional: a convolution (F.conv1d/2d/3d or
F.conv_transpose1d/2d/3d) followed by F.batch_norm (conv_bn), and F.linear
followed by F.batch_norm (linear_bn), each as one operator."""

import math
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .activation import apply_activation, check_activation

try:  # torch >= 2.9 tells symbolic tracing apart from torch.export
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as is_fx_tracing
except ImportError:
    from torch.fx._symbolic_trace import is_fx_tracing
try:  # what torch.onnx.is_in_onnx_export reads for the dynamo-based exporter
    from torch.onnx._internal.exporter import _flags as _onnx_exporter_flags
except ImportError:
    _onnx_exporter_flags = None
try:  # the fake tensor mode tracing this thread (torch.export's non-strict tracing)
    from torch._guards import detect_fake_mode as _detect_fake_mode
except ImportError:
    _detect_fake_mode = None


# What conv_bn's stride, padding, dilation and output_padding take (ints,
# lists, and tuples of 1 to 3 ints); TorchScript needs each tuple size named.
_Ints = Union[int, List[int], Tuple[int], Tuple[int, int], Tuple[int, int, int]]


_DIMENSIONS = {1: "one int", 2: "a pair of ints", 3: "a triple of ints"}


def _ntuple(value: _Ints, n: int, name: str) -> List[int]:
    """An int, or a sequence of one or n ints, as nn.Conv1d/2d/3d take them:
    n values, one per spatial dimension."""
    if torch.jit.is_scripting():  # the types are checked when scripting
        if isinstance(value, int):
            return [value] * n
        elif isinstance(value, List[int]):
            values = value
        elif isinstance(value, Tuple[int]):
            values = [value[0]]
        elif isinstance(value, Tuple[int, int]):
            values = [value[0], value[1]]
        else:
            values = [value[0], value[1], value[2]]
        if len(values) == 1:
            return [values[0]] * n
        if len(values) != n:
            raise ValueError("convbn: `" + name + "` must be an int or " + str(n) + " ints")
        return values
    return _ntuple_of_anything(value, n, name)


@torch.jit.unused
def _ntuple_of_anything(value: Any, n: int, name: str) -> List[int]:
    if isinstance(value, int):
        return [value] * n
    values = list(value)
    if len(values) == 1:
        return [int(values[0])] * n
    if len(values) != n:
        raise ValueError(f"convbn: `{name}` must be an int or {_DIMENSIONS.get(n, f'{n} ints')}, got {value!r}")
    return [int(v) for v in values]


def same_padding(kernel_size: List[int], dilation: List[int]) -> Tuple[List[int], List[int]]:
    """padding='same' as nn.Conv1d/2d/3d do it: the total padding of each
    dimension is dilation * (kernel - 1); when it is odd the extra row/column
    goes to the end (bottom/right). Returns (symmetric padding for the conv,
    extra F.pad amounts for the odd remainder, last dimension first:
    (W_left, W_right, H_top, H_bottom, ...))."""
    n = len(kernel_size)
    symmetric, extra = [0] * n, [0] * (2 * n)
    for i in range(n):
        total = dilation[i] * (kernel_size[i] - 1)
        symmetric[i] = total // 2
        extra[2 * (n - 1 - i) + 1] = total - 2 * (total // 2)
    return symmetric, extra


def _convolution(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
    dilation: List[int], groups: int, transposed: bool, output_padding: List[int],
) -> Tensor:
    """The conv of the nn layer the operators stand for (F.conv2d, F.conv_transpose3d, ...): what
    the paths that compute nn's pair call (ONNX export, empty batches)."""
    if transposed:
        return torch.convolution(input, weight, bias, stride, padding, dilation, True, output_padding, groups)
    if weight.dim() == 3:
        return F.conv1d(input, weight, bias, stride, padding, dilation, groups)
    if weight.dim() == 5:
        return F.conv3d(input, weight, bias, stride, padding, dilation, groups)
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)


def _output_padding_list(output_padding: Optional[List[int]], n: int) -> List[int]:
    if output_padding is None:
        return [0] * n
    return output_padding


@torch.jit.unused
def _refuse_functorch_differentiation() -> None:
    """torch.func's grad, vjp, jacrev, jvp, jacfwd and hessian cannot go
    through a C++ torch::autograd::Function, which convbn's operators are:
    PyTorch refuses with a message that does not say what to do. Say it."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return  # no torch.func transform is running (the common case: one C++ call)
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    transforms = {i.key() for i in retrieve_all_functorch_interpreters()}
    if transforms & {torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp}:
        raise RuntimeError(
            "convbn: torch.func transforms that differentiate (grad, vjp, jacrev, jvp, jacfwd, hessian) "
            "cannot go through convbn's operators: they are C++ autograd Functions, which torch.func does "
            "not support. Differentiate with torch.autograd.grad or .backward(), or run torch.func on "
            "convbn.unfuse(model). (torch.func.vmap and functional_call without differentiation work.)"
        )


def check_momentum(momentum: Optional[float]) -> None:
    if momentum is not None and not math.isfinite(momentum):
        raise ValueError(
            f"convbn: `momentum` must be a finite number, or None for a cumulative "
            f"moving average, got {momentum}"
        )


def conv_bn(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
    training: bool = True,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    stride: _Ints = 1,
    padding: Union[_Ints, str] = 0,
    dilation: _Ints = 1,
    groups: int = 1,
    memory_efficient: bool = True,
    transposed: bool = False,
    output_padding: _Ints = 0,
    activation: str = "identity",
    negative_slope: float = 0.01,
) -> Tensor:
    """``F.batch_norm(F.conv2d(input, weight, bias, stride, padding, dilation,
    groups), running_mean, running_var, bn_weight, bn_bias, training,
    momentum, eps)``, computed as one operator, then the activation.

    The convolution is 1-, 2- or 3-D as weight is (3-, 4- or 5-D: conv1d,
    conv2d, conv3d), and transposed=True makes it F.conv_transpose1d/2d/3d
    with output_padding (weight (in_channels, out_channels / groups, k...)).

    training=True normalizes with the batch statistics and, when
    running_mean/running_var are given, updates them in place afterwards
    (only once the compute succeeded). momentum=None means a cumulative
    moving average, which needs num_batches_tracked; num_batches_tracked, when
    given, is incremented as nn.BatchNorm2d does. training=False uses the
    running statistics, folded into the convolution.

    memory_efficient=True keeps only the input, the weights and per-channel
    statistics for backward, and recomputes the convolution there;
    False keeps the conv output and skips the recompute.

    activation ('identity', 'relu', 'relu6', 'leaky_relu' with
    negative_slope, 'silu', 'hardswish', 'sigmoid', 'gelu') is applied to
    the normalized output in the same pass, and differentiated in the
    backward's passes: neither the batch norm's output nor the activation's
    is kept.
    """
    n = weight.dim() - 2
    if not 1 <= n <= 3:
        raise ValueError(
            f"convbn: `weight` must be a 3-, 4- or 5-D conv weight (a 1-, 2- or 3-D convolution), "
            f"got shape {list(weight.shape)}"
        )
    stride_ = _ntuple(stride, n, "stride")
    dilation_ = _ntuple(dilation, n, "dilation")
    output_padding_ = _ntuple(output_padding, n, "output_padding")
    if isinstance(padding, str):
        if padding == "valid":
            padding_ = [0] * n
        elif padding == "same":
            if transposed:
                raise ValueError("convbn: padding='same' is not supported for transposed convolutions")
            if stride_ != [1] * n:
                raise ValueError("convbn: padding='same' is not supported for strided convolutions")
            padding_, extra = same_padding(list(weight.shape[2:]), dilation_)
            if any(extra):
                input = F.pad(input, extra)
        else:
            raise ValueError("convbn: `padding` must be an int, a tuple, 'same' or 'valid', got '" + padding + "'")
    else:
        padding_ = _ntuple(padding, n, "padding")
    if not transposed and any(output_padding_):
        raise ValueError("convbn: output_padding applies to transposed convolutions only (transposed=True)")
    check_momentum(momentum)
    check_activation(activation, negative_slope)

    return _conv_bn_prepared(
        input, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
        training, momentum, eps, stride_, padding_, dilation_, groups, memory_efficient,
        transposed=transposed, output_padding=output_padding_, activation=activation,
        negative_slope=negative_slope,
    )


def _conv_bn_prepared(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    memory_efficient: bool,
    group_name: Optional[str] = None,
    group_size: int = 1,
    transposed: bool = False,
    output_padding: Optional[List[int]] = None,
    activation: str = "identity",
    negative_slope: float = 0.01,
) -> Tensor:
    """conv_bn with stride, padding, dilation and output_padding already as
    lists of one value per spatial dimension and any 'same' padding already
    applied: what the ConvBN modules' forward calls. It is
    TorchScript-compatible, so scripted models call the operators directly.

    With group_name (SyncConvBN2d), training uses the batch statistics of
    all group_size ranks of that process group, and the running statistics
    take the group's statistics and count, so they are the same on every
    rank."""
    if not torch.jit.is_scripting():
        _refuse_functorch_differentiation()
    output_padding_ = _output_padding_list(output_padding, len(stride))
    if not training:
        mean, var = _eval_statistics(running_mean, running_var)
        if not torch.jit.is_scripting() and _is_in_dynamo_onnx_export():
            # nn's pair: that exporter folds its BatchNormalization into the
            # Conv at any size, but leaves the decomposed fold of
            # conv_bn_eval as a Mul on weights over its optimizer's constant
            # folding limit (8192 elements).
            return apply_activation(F.batch_norm(
                _convolution(input, weight, bias, stride, padding, dilation, groups, transposed, output_padding_),
                mean, var, bn_weight, bn_bias, False, 0.0, eps), activation, negative_slope)
        if not torch.jit.is_scripting() and _is_in_onnx_export():
            # The exporter's own activation nodes after the folded Conv.
            return apply_activation(torch.ops.convbn.conv_bn_eval(
                input, weight, bias, bn_weight, bn_bias, mean, var,
                stride, padding, dilation, groups, eps, transposed, output_padding_,
            ), activation, negative_slope)
        return torch.ops.convbn.conv_bn_eval(
            input, weight, bias, bn_weight, bn_bias, mean, var,
            stride, padding, dilation, groups, eps, transposed, output_padding_, activation, negative_slope,
        )

    _check_statistics(running_mean, running_var, num_batches_tracked, momentum)
    if not torch.jit.is_scripting() and _is_in_onnx_export():
        # The training operators have no ONNX form: batch statistics alone
        # export as nn's pair computes them; updates and synchronization
        # cannot be exported.
        _refuse_onnx_export_of_updates("ConvBN2d", "conv_bn", running_mean, group_name)
        return apply_activation(F.batch_norm(
            _convolution(input, weight, bias, stride, padding, dilation, groups, transposed, output_padding_),
            None, None, bn_weight, bn_bias, True, 0.0, eps), activation, negative_slope)
    if group_name is None and _is_empty_batch(input):
        # nn's pair on an empty batch: an empty output, zero gradients, the
        # running statistics as they were, num_batches_tracked counted.
        return apply_activation(_empty_batch(
            _convolution(input, weight, bias, stride, padding, dilation, groups, transposed, output_padding_),
            running_mean, running_var, num_batches_tracked, bn_weight, bn_bias, eps), activation, negative_slope)
    if group_name is None:
        output, save_mean, save_invstd, _ = torch.ops.convbn.conv_bn_train(
            input, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, eps,
            memory_efficient, transposed, output_padding_, activation, negative_slope,
        )
        count = output.numel() // output.shape[1]  # values per channel
    else:
        output, save_mean, save_invstd, _, group_count = torch.ops.convbn.sync_conv_bn_train(
            input, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, eps,
            group_name, group_size, memory_efficient, transposed, output_padding_, activation, negative_slope,
        )
        count = int(group_count.item())
    _update_statistics(
        running_mean, running_var, num_batches_tracked, save_mean, save_invstd, eps, momentum, count,
    )
    return output


def linear_bn(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
    training: bool = True,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    memory_efficient: bool = True,
) -> Tensor:
    """``F.batch_norm(F.linear(input, weight, bias), running_mean,
    running_var, bn_weight, bn_bias, training, momentum, eps)`` on input of
    shape (N, in_features), computed as one operator, with conv_bn's rules
    for training, running statistics and memory_efficient. It is
    TorchScript-compatible."""
    check_momentum(momentum)
    return _linear_bn_prepared(
        input, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
        training, momentum, eps, memory_efficient,
    )


def _linear_bn_prepared(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    memory_efficient: bool,
    group_name: Optional[str] = None,
    group_size: int = 1,
) -> Tensor:
    """linear_bn with momentum checked: what LinearBN1d.forward calls. With
    group_name (SyncLinearBN1d), training uses the batch statistics of the
    process group, as in _conv_bn_prepared."""
    if not torch.jit.is_scripting():
        _refuse_functorch_differentiation()
    if not training:
        mean, var = _eval_statistics(running_mean, running_var)
        if not torch.jit.is_scripting() and _is_in_dynamo_onnx_export():
            # nn's pair, which that exporter folds into one Gemm (see _conv_bn_prepared).
            return F.batch_norm(F.linear(input, weight, bias), mean, var, bn_weight, bn_bias, False, 0.0, eps)
        return torch.ops.convbn.linear_bn_eval(
            input, weight, bias, bn_weight, bn_bias, mean, var, eps,
        )
    _check_statistics(running_mean, running_var, num_batches_tracked, momentum)
    if not torch.jit.is_scripting() and _is_in_onnx_export():
        _refuse_onnx_export_of_updates("LinearBN1d", "linear_bn", running_mean, group_name)
        return F.batch_norm(F.linear(input, weight, bias), None, None, bn_weight, bn_bias, True, 0.0, eps)
    if group_name is None and _is_empty_batch(input):
        return _empty_batch(F.linear(input, weight, bias), running_mean, running_var, num_batches_tracked,
                            bn_weight, bn_bias, eps)
    if group_name is None:
        output, save_mean, save_invstd, _ = torch.ops.convbn.linear_bn_train(
            input, weight, bias, bn_weight, bn_bias, eps, memory_efficient,
        )
        count = output.shape[0]
    else:
        output, save_mean, save_invstd, _, group_count = torch.ops.convbn.sync_linear_bn_train(
            input, weight, bias, bn_weight, bn_bias, eps, group_name, group_size, memory_efficient,
        )
        count = int(group_count.item())
    _update_statistics(
        running_mean, running_var, num_batches_tracked, save_mean, save_invstd, eps, momentum, count,
    )
    return output


@torch.jit.unused
def _is_in_onnx_export() -> bool:
    """Whether torch.onnx.export is tracing this call, with either exporter.
    Both exporters' flags are process-global, so each also needs this
    thread to be tracing: a call in another thread while an export runs
    (a training step) computes as usual. The TorchScript-based exporter
    traces with torch.jit.trace, whose state is per thread."""
    return (torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()) or _is_in_dynamo_onnx_export()


@torch.jit.unused
def _is_in_dynamo_onnx_export() -> bool:
    """Whether the dynamo-based torch.onnx.export (torch.export underneath)
    is tracing this call. It reads the flag torch.onnx.is_in_onnx_export()
    reads: where that exporter falls back to torch.export(strict=True),
    Dynamo answers is_in_onnx_export() with a constant False (so that
    torch.compile never takes an export path), and the flag still tells the
    truth. The flag is process-global; torch.export traces with Dynamo
    (strict) or under a fake tensor mode (non-strict), both per thread."""
    if not getattr(_onnx_exporter_flags, "_is_onnx_exporting", False):
        return False
    if torch.compiler.is_dynamo_compiling() or _detect_fake_mode is None:
        return True
    return _detect_fake_mode() is not None


@torch.jit.unused
def _refuse_onnx_export_of_updates(
    layer: str, function: str, running_mean: Optional[Tensor], group_name: Optional[str] = None,
) -> None:
    """Under torch.onnx.export: batch statistics without running statistics
    export as nn's pair computes them, but updating running statistics
    (training mode) or synchronizing statistics over a process group cannot
    be written as an ONNX graph. Say what to do, rather than let the
    exporter fail on the training operator."""
    if running_mean is None and group_name is None:
        return
    raise RuntimeError(onnx_training_mode_message(layer, function))


def onnx_training_mode_message(layer: str, function: str, exported_operator: Optional[str] = None) -> str:
    """The error for a training-mode ONNX export of layer (ConvBN2d, ...),
    whose functional form is convbn.functional.<function>. exported_operator
    names the training operator (convbn.conv_bn_train, ...) when what is
    exported is a torch.export ExportedProgram holding it: the advice is
    then to export the model again, in eval mode."""
    folded_into = "convolution" if function == "conv_bn" else "linear layer"
    reason = (
        f"convbn: cannot export {layer} to ONNX in training mode: training normalizes with the batch "
        "statistics and updates the running statistics in place, which an ONNX graph cannot do. "
    )
    if exported_operator is None:
        return reason + (
            "Call model.eval() before torch.onnx.export; the eval graph folds the batch norm into "
            f"the {folded_into}. (convbn.functional.{function}: pass training=False with the running statistics.)"
        )
    return reason + (
        f"This ExportedProgram holds {exported_operator}, which torch.export.export records for a layer in "
        "training mode. Call model.eval() before torch.export.export and export the new program; its eval "
        f"layers fold the batch norm into the {folded_into}. (A layer with track_running_stats=False records "
        "it in eval too, for its batch statistics: export the model itself, torch.onnx.export(model, ...), "
        "which writes them as nn's batch norm does.)"
    )


def _is_empty_batch(input: Tensor) -> bool:
    if not torch.jit.is_scripting() and _is_fx_tracing():
        return False  # a Proxy's size is not known; the graph takes the operator
    return input.size(0) == 0


@torch.jit.unused
def _is_fx_tracing() -> bool:
    """Whether torch.fx.symbolic_trace is running: shapes are Proxies then."""
    return is_fx_tracing()


def _empty_batch(
    output: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float,
) -> Tensor:
    if num_batches_tracked is not None and running_mean is not None:
        num_batches_tracked.add_(1)
    return F.batch_norm(output, running_mean, running_var, bn_weight, bn_bias, True, 0.0, eps)


def _eval_statistics(running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    if running_mean is None or running_var is None:
        raise ValueError(
            "convbn: training=False needs running_mean and running_var; "
            "pass them, or use training=True to normalize with batch statistics"
        )
    return running_mean, running_var


def _check_statistics(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError("convbn: pass both running_mean and running_var, or neither")
    if running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError("convbn: momentum=None (cumulative average) needs num_batches_tracked")


def _update_statistics(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    save_mean: Tensor,
    save_invstd: Tensor,
    eps: float,
    momentum: Optional[float],
    count: int,
) -> None:
    """After a successful training forward: blends the batch statistics of
    `count` values per channel into the running ones, when there are any."""
    if running_mean is not None and running_var is not None:
        if num_batches_tracked is None:
            num_batches_tracked = torch.zeros([], dtype=torch.long, device=running_mean.device)
        torch.ops.convbn.update_running_stats(
            running_mean, running_var, num_batches_tracked, save_mean, save_invstd, eps, momentum, count,
        )
