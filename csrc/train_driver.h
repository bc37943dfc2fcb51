// The device-generic training forward and backward of conv+BN and
// linear+BN (see the .cpp file), and the templates a device registers at
// its dispatch key with its own kernel table.
#pragma once

#include "kernel_table.h"

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace convbn {

// conv_bn_train with the given device kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train_forward(
    const KernelTable& kernels,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    double eps,
    bool memory_efficient,
    bool transposed,
    at::IntArrayRef output_padding,
    c10::string_view activation,
    double negative_slope);

// conv_bn_train_backward with the given device kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_train_backward_impl(
    const KernelTable& kernels,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& conv_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    double eps,
    std::array<bool, 5> output_mask,
    bool transposed,
    at::IntArrayRef output_padding,
    const std::optional<at::Tensor>& bn_bias,
    c10::string_view activation,
    double negative_slope);

// sync_conv_bn_train with the given device kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_conv_bn_train_forward(
    const KernelTable& kernels,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    double eps,
    const std::string& group_name,
    int64_t group_size,
    bool memory_efficient,
    bool transposed,
    at::IntArrayRef output_padding,
    c10::string_view activation,
    double negative_slope);

// sync_conv_bn_train_backward with the given device kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_conv_bn_train_backward_impl(
    const KernelTable& kernels,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& conv_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    double eps,
    const std::string& group_name,
    int64_t group_size,
    const at::Tensor& count,
    std::array<bool, 5> output_mask,
    bool transposed,
    at::IntArrayRef output_padding,
    const std::optional<at::Tensor>& bn_bias,
    c10::string_view activation,
    double negative_slope);

// linear_bn_train with the given device kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_bn_train_forward(
    const KernelTable& kernels,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    bool memory_efficient);

// linear_bn_train_backward with the given device kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_bn_train_backward_impl(
    const KernelTable& kernels,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& linear_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    double eps,
    std::array<bool, 5> output_mask);

// sync_linear_bn_train with the given device kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_linear_bn_train_forward(
    const KernelTable& kernels,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    const std::string& group_name,
    int64_t group_size,
    bool memory_efficient);

// sync_linear_bn_train_backward with the given device kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_linear_bn_train_backward_impl(
    const KernelTable& kernels,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& linear_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    double eps,
    const std::string& group_name,
    int64_t group_size,
    const at::Tensor& count,
    std::array<bool, 5> output_mask);

// What a device registers at its dispatch key (`&conv_bn_train_kernel<table>`
// and so on): the driver with that device's kernel table, under a guard for
// input's device. The guard accepts any device, so an input on another device
// than the weights reaches the driver's clear device-mismatch error.
template <const KernelTable& (*Table)()>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train_kernel(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    double eps,
    bool memory_efficient,
    bool transposed,
    at::IntArrayRef output_padding,
    c10::string_view activation,
    double negative_slope) {
  const at::OptionalDeviceGuard device_guard(at::device_of(input));
  return conv_bn_train_forward(
      Table(), input, weight, bias, bn_weight, bn_bias, stride, padding,
      dilation, groups, eps, memory_efficient, transposed, output_padding,
      activation, negative_slope);
}

template <const KernelTable& (*Table)()>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_train_backward_kernel(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& conv_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    double eps,
    std::array<bool, 5> output_mask,
    bool transposed,
    at::IntArrayRef output_padding,
    const std::optional<at::Tensor>& bn_bias,
    c10::string_view activation,
    double negative_slope) {
  const at::OptionalDeviceGuard device_guard(at::device_of(input));
  return conv_bn_train_backward_impl(
      Table(), grad_output, input, weight, bias, bn_weight, conv_output,
      save_mean, save_invstd, stride, padding, dilation, groups, eps,
      output_mask, transposed, output_padding, bn_bias, activation,
      negative_slope);
}

template <const KernelTable& (*Table)()>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_conv_bn_train_kernel(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    double eps,
    std::string group_name,
    int64_t group_size,
    bool memory_efficient,
    bool transposed,
    at::IntArrayRef output_padding,
    c10::string_view activation,
    double negative_slope) {
  const at::OptionalDeviceGuard device_guard(at::device_of(input));
  return sync_conv_bn_train_forward(
      Table(), input, weight, bias, bn_weight, bn_bias, stride, padding,
      dilation, groups, eps, group_name, group_size, memory_efficient,
      transposed, output_padding, activation, negative_slope);
}

template <const KernelTable& (*Table)()>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_conv_bn_train_backward_kernel(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& conv_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    double eps,
    std::string group_name,
    int64_t group_size,
    const at::Tensor& count,
    std::array<bool, 5> output_mask,
    bool transposed,
    at::IntArrayRef output_padding,
    const std::optional<at::Tensor>& bn_bias,
    c10::string_view activation,
    double negative_slope) {
  const at::OptionalDeviceGuard device_guard(at::device_of(input));
  return sync_conv_bn_train_backward_impl(
      Table(), grad_output, input, weight, bias, bn_weight, conv_output,
      save_mean, save_invstd, stride, padding, dilation, groups, eps,
      group_name, group_size, count, output_mask, transposed, output_padding,
      bn_bias, activation, negative_slope);
}

template <const KernelTable& (*Table)()>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_bn_train_kernel(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    bool memory_efficient) {
  const at::OptionalDeviceGuard device_guard(at::device_of(input));
  return linear_bn_train_forward(
      Table(), input, weight, bias, bn_weight, bn_bias, eps, memory_efficient);
}

template <const KernelTable& (*Table)()>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_bn_train_backward_kernel(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& linear_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    double eps,
    std::array<bool, 5> output_mask) {
  const at::OptionalDeviceGuard device_guard(at::device_of(input));
  return linear_bn_train_backward_impl(
      Table(), grad_output, input, weight, bias, bn_weight, linear_output,
      save_mean, save_invstd, eps, output_mask);
}

template <const KernelTable& (*Table)()>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_linear_bn_train_kernel(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    std::string group_name,
    int64_t group_size,
    bool memory_efficient) {
  const at::OptionalDeviceGuard device_guard(at::device_of(input));
  return sync_linear_bn_train_forward(
      Table(), input, weight, bias, bn_weight, bn_bias, eps, group_name,
      group_size, memory_efficient);
}

template <const KernelTable& (*Table)()>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_linear_bn_train_backward_kernel(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& linear_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    double eps,
    std::string group_name,
    int64_t group_size,
    const at::Tensor& count,
    std::array<bool, 5> output_mask) {
  const at::OptionalDeviceGuard device_guard(at::device_of(input));
  return sync_linear_bn_train_backward_impl(
      Table(), grad_output, input, weight, bias, bn_weight, linear_output,
      save_mean, save_invstd, eps, group_name, group_size, count, output_mask);
}

} // namespace convbn
