"""Fake (meta) kernels: the shapes, dtypes and memory formats of every op's
results, computed without data, for torch.compile, torch.export and
FakeTensor. They use symbolic sizes as they come, so a varying batch size
needs no recompilation. conv_bn_eval and linear_bn_eval are
CompositeImplicitAutograd and need none. Argument errors are raised by the real kernels (csrc/checks.cpp)."""

import math

import torch
from torch._prims_common import suggest_memory_format

from .activation import ACTIVATIONS


def _stats_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_same_device(op, input, **tensors):
    for name, t in tensors.items():
        if t is not None:
            torch._check(
                t.device == input.device,
                lambda: f"{op}: `{name}` is on {t.device} but `input` is on {input.device}; "
                "move them to the same device",
            )


def _conv_output_size(input, weight, stride, padding, dilation, groups, transposed, output_padding):
    """aten::convolution's output size, for 1 to 3 spatial dimensions."""
    n = input.dim() - 2
    torch._check(1 <= n <= 3, lambda: f"convbn: expected a 3-, 4- or 5-D input, got {input.dim()}-D")
    torch._check(weight.dim() == input.dim(), lambda: f"convbn: expected a {input.dim()}-D weight, got {weight.dim()}-D")
    output_padding = list(output_padding) or [0] * n
    if transposed:
        spatial = [
            (input.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1)
            + output_padding[i] + 1
            for i in range(n)
        ]
        return (input.shape[0], weight.shape[1] * groups, *spatial)
    spatial = [
        (input.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(n)
    ]
    return (input.shape[0], weight.shape[0], *spatial)


def _check_activation(op, activation, negative_slope):
    """The kernels' check (csrc/activation.cpp), so that fake tensors raise
    the same ValueError."""
    if not math.isfinite(negative_slope):
        raise ValueError(f"{op}: `negative_slope` must be a finite number, got {negative_slope}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{op}: unknown `activation` '{activation}'; expected one of "
            + ", ".join(f"'{a}'" for a in ACTIVATIONS) + " (nn.GELU() with approximate='none')")


@torch.library.register_fake("convbn::conv_bn_train")
def _conv_bn_train_fake(
    input, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, eps, memory_efficient=True,
    transposed=False, output_padding=(), activation="identity", negative_slope=0.01,
):
    _check_same_device("convbn.conv_bn_train", input, weight=weight, bias=bias,
                       bn_weight=bn_weight, bn_bias=bn_bias)
    _check_activation("convbn.conv_bn_train", activation, negative_slope)
    size = _conv_output_size(input, weight, stride, padding, dilation, groups, transposed, output_padding)
    fmt = suggest_memory_format(input)
    output = torch.empty(size, dtype=input.dtype, device=input.device, memory_format=fmt)
    stats = input.new_empty((size[1],), dtype=_stats_dtype(input.dtype))
    conv_output = input.new_empty((0,)) if memory_efficient else torch.empty_like(output)
    return output, stats, torch.empty_like(stats), conv_output


@torch.library.register_fake("convbn::conv_bn_train_backward")
def _conv_bn_train_backward_fake(
    grad_output, input, weight, bias, bn_weight, conv_output, save_mean, save_invstd,
    stride, padding, dilation, groups, eps, output_mask, transposed=False, output_padding=(),
    bn_bias=None, activation="identity", negative_slope=0.01,
):
    _check_same_device("convbn.conv_bn_train_backward", input, grad_output=grad_output,
                       weight=weight, bias=bias, bn_weight=bn_weight, conv_output=conv_output,
                       save_mean=save_mean, save_invstd=save_invstd, bn_bias=bn_bias)
    _check_activation("convbn.conv_bn_train_backward", activation, negative_slope)
    return _train_backward_fake(input, weight, bias, bn_weight, output_mask, save_mean.shape[0])


@torch.library.register_fake("convbn::sync_conv_bn_train")
def _sync_conv_bn_train_fake(
    input, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, eps,
    group_name, group_size, memory_efficient=True, transposed=False, output_padding=(),
    activation="identity", negative_slope=0.01,
):
    results = _conv_bn_train_fake(
        input, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, eps, memory_efficient,
        transposed, output_padding, activation, negative_slope,
    )
    # count: the group's values per channel, a host-side 0-dim int64 tensor.
    return (*results, torch.empty((), dtype=torch.long, device="cpu"))


@torch.library.register_fake("convbn::sync_conv_bn_train_backward")
def _sync_conv_bn_train_backward_fake(
    grad_output, input, weight, bias, bn_weight, conv_output, save_mean, save_invstd,
    stride, padding, dilation, groups, eps, group_name, group_size, count, output_mask, transposed=False,
    output_padding=(), bn_bias=None, activation="identity", negative_slope=0.01,
):
    _check_same_device("convbn.sync_conv_bn_train_backward", input, grad_output=grad_output,
                       weight=weight, bias=bias, bn_weight=bn_weight, conv_output=conv_output,
                       save_mean=save_mean, save_invstd=save_invstd, bn_bias=bn_bias)
    _check_activation("convbn.sync_conv_bn_train_backward", activation, negative_slope)
    return _train_backward_fake(input, weight, bias, bn_weight, output_mask, save_mean.shape[0])


@torch.library.register_fake("convbn::linear_bn_train")
def _linear_bn_train_fake(input, weight, bias, bn_weight, bn_bias, eps, memory_efficient=True):
    _check_same_device("convbn.linear_bn_train", input, weight=weight, bias=bias,
                       bn_weight=bn_weight, bn_bias=bn_bias)
    torch._check(input.dim() == 2, lambda: f"convbn: expected a 2-D input, got {input.dim()}-D")
    torch._check(weight.dim() == 2, lambda: f"convbn: expected a 2-D weight, got {weight.dim()}-D")
    output = input.new_empty((input.shape[0], weight.shape[0]))
    stats = input.new_empty((weight.shape[0],), dtype=_stats_dtype(input.dtype))
    linear_output = input.new_empty((0,)) if memory_efficient else torch.empty_like(output)
    return output, stats, torch.empty_like(stats), linear_output


@torch.library.register_fake("convbn::linear_bn_train_backward")
def _linear_bn_train_backward_fake(
    grad_output, input, weight, bias, bn_weight, linear_output, save_mean, save_invstd, eps, output_mask,
):
    _check_same_device("convbn.linear_bn_train_backward", input, grad_output=grad_output,
                       weight=weight, bias=bias, bn_weight=bn_weight, linear_output=linear_output,
                       save_mean=save_mean, save_invstd=save_invstd)
    return _train_backward_fake(input, weight, bias, bn_weight, output_mask, weight.shape[0])


@torch.library.register_fake("convbn::sync_linear_bn_train")
def _sync_linear_bn_train_fake(
    input, weight, bias, bn_weight, bn_bias, eps, group_name, group_size, memory_efficient=True
):
    results = _linear_bn_train_fake(input, weight, bias, bn_weight, bn_bias, eps, memory_efficient)
    return (*results, torch.empty((), dtype=torch.long, device="cpu"))


@torch.library.register_fake("convbn::sync_linear_bn_train_backward")
def _sync_linear_bn_train_backward_fake(
    grad_output, input, weight, bias, bn_weight, linear_output, save_mean, save_invstd, eps,
    group_name, group_size, count, output_mask,
):
    _check_same_device("convbn.sync_linear_bn_train_backward", input, grad_output=grad_output,
                       weight=weight, bias=bias, bn_weight=bn_weight, linear_output=linear_output,
                       save_mean=save_mean, save_invstd=save_invstd)
    return _train_backward_fake(input, weight, bias, bn_weight, output_mask, weight.shape[0])


def _train_backward_fake(input, weight, bias, bn_weight, output_mask, channels):
    """The five gradients of a training backward, as its output_mask asks;
    channels is the number of output channels."""
    param_dtype = bn_weight.dtype if bn_weight is not None else input.dtype
    grad_input = (
        torch.empty(input.shape, dtype=input.dtype, device=input.device,
                    memory_format=suggest_memory_format(input))
        if output_mask[0] else None
    )
    grad_weight = (
        torch.empty(weight.shape, dtype=weight.dtype, device=weight.device,
                    memory_format=suggest_memory_format(weight))
        if output_mask[1] else None
    )
    grad_bias = torch.empty_like(bias) if output_mask[2] and bias is not None else None
    grad_bn_weight = (
        input.new_empty((channels,), dtype=param_dtype)
        if output_mask[3] and bn_weight is not None else None
    )
    grad_bn_bias = input.new_empty((channels,), dtype=param_dtype) if output_mask[4] else None
    return grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias


@torch.library.register_fake("convbn::update_running_stats")
def _update_running_stats_fake(
    running_mean, running_var, num_batches_tracked, save_mean, save_invstd, eps, momentum, count
):
    _check_same_device("convbn.update_running_stats", save_mean, running_mean=running_mean,
                       running_var=running_var, num_batches_tracked=num_batches_tracked,
                       save_invstd=save_invstd)
    return None
