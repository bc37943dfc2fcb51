// Autocast for conv_bn_train, sync_conv_bn_train and conv_bn_eval (CUDA and
// CPU autocast keys):
// the input, the conv weight and the conv bias are cast to the autocast
// dtype (the conv runs in it), while bn_weight/bn_bias and the running
// statistics stay as they are (float32 is accepted with float16/bfloat16
// data; statistics come back in float32), so running statistics are never
// cast away. The casts are autograd-visible, so grads reach the float32
// parameters. (conv_bn_eval needs its own entry: it decomposes into
// at::convolution, which is not on every autocast list.)
#include "autocast_cast.h"

#include "../convbn.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace convbn {
namespace {

template <c10::DispatchKey AutocastKey, c10::DeviceType Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_train_autocast(
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
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  const AutocastCast<Device> cast;
  return conv_bn_train(
      cast(input), cast(weight), cast(bias), bn_weight, bn_bias, stride,
      padding, dilation, groups, eps, memory_efficient, transposed,
      output_padding, activation, negative_slope);
}

template <c10::DispatchKey AutocastKey, c10::DeviceType Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_conv_bn_train_autocast(
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
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  const AutocastCast<Device> cast;
  return sync_conv_bn_train(
      cast(input), cast(weight), cast(bias), bn_weight, bn_bias, stride,
      padding, dilation, groups, eps, std::move(group_name), group_size,
      memory_efficient, transposed, output_padding, activation,
      negative_slope);
}

template <c10::DispatchKey AutocastKey, c10::DeviceType Device>
at::Tensor conv_bn_eval_autocast(
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
    double negative_slope) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  const AutocastCast<Device> cast;
  return conv_bn_eval(
      cast(input), cast(weight), cast(bias), bn_weight, bn_bias, running_mean,
      running_var, stride, padding, dilation, groups, eps, transposed,
      output_padding, activation, negative_slope);
}

} // namespace

TORCH_LIBRARY_IMPL(convbn, AutocastCUDA, m) {
  constexpr auto key = c10::DispatchKey::AutocastCUDA;
  m.impl("conv_bn_train", &conv_bn_train_autocast<key, c10::DeviceType::CUDA>);
  m.impl(
      "sync_conv_bn_train",
      &sync_conv_bn_train_autocast<key, c10::DeviceType::CUDA>);
  m.impl("conv_bn_eval", &conv_bn_eval_autocast<key, c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(convbn, AutocastCPU, m) {
  constexpr auto key = c10::DispatchKey::AutocastCPU;
  m.impl("conv_bn_train", &conv_bn_train_autocast<key, c10::DeviceType::CPU>);
  m.impl(
      "sync_conv_bn_train",
      &sync_conv_bn_train_autocast<key, c10::DeviceType::CPU>);
  m.impl("conv_bn_eval", &conv_bn_eval_autocast<key, c10::DeviceType::CPU>);
}

} // namespace convbn
