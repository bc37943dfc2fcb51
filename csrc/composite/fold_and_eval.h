// The eval operators' composite kernels (fold_and_eval.cpp) and the pieces
// of their fold, for their autograd kernels (autograd/eval_autograd.cpp):
// the node refolds in backward exactly as the forward folded, and runs the
// composites where it does not apply.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace convbn {

// The dtype the fold computes in: float32 (the statistics' dtype of
// reduced-precision data), or float64 for float64 data or statistics.
at::ScalarType fold_dtype(const at::Tensor& weight, const at::Tensor& running_var);

// 1 / sqrt(running_var + eps), in `dtype`.
at::Tensor fold_inv_std(const at::Tensor& running_var, at::ScalarType dtype, double eps);

// Where a weight keeps its output channels: dimension 0 of a conv or linear
// weight (out_channels, in_channels / groups, k...); for a transposed
// conv's weight (in_channels, out_channels / groups, k...), dimension 1
// within each of the `groups` blocks of dimension 0.
struct OutputChannels {
  bool transposed = false;
  int64_t groups = 1;
};

// b - running_mean (-running_mean without a bias), in `dtype`.
at::Tensor centered_bias(
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    at::ScalarType dtype);

// The folded bias (b - running_mean) * scale + beta, in scale's dtype (the
// fold's; the caller casts it).
at::Tensor fold_bias(
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& scale,
    const std::optional<at::Tensor>& bn_bias);

// W * scale per output channel (scale in the fold's dtype), in W's dtype.
at::Tensor scale_output_channels(
    const at::Tensor& weight,
    const at::Tensor& scale,
    OutputChannels where = {});

// sum(t) per output channel of a weight-shaped t: the gradient of a
// per-output-channel scale.
at::Tensor sum_per_output_channel(const at::Tensor& t, OutputChannels where = {});

at::Tensor conv_bn_eval_composite(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    double eps,
    bool transposed,
    at::IntArrayRef output_padding,
    c10::string_view activation,
    double negative_slope);

at::Tensor linear_bn_eval_composite(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps);

} // namespace convbn
