// The eval operators' composite kernels (fold_and_eval.cpp), for their
// autograd kernels (autograd/eval_autograd.cpp), which differentiate them as
// written where their own node cannot (forward-mode AD).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace convbn {

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
    double eps);

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
