// Autocast for linear_bn_train, sync_linear_bn_train and linear_bn_eval
// (CUDA and CPU autocast keys), with conv_bn_autocast.cpp's rule: input, weight and the linear bias
// are cast to the autocast dtype, bn_weight/bn_bias and the running
// statistics are not. (linear_bn_eval needs its own entry: its argument
// checks run before at::linear would cast, and the fold must see the float32
// parameters.)
#include "autocast_cast.h"

#include "../convbn.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace convbn {
namespace {

template <c10::DispatchKey AutocastKey, c10::DeviceType Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_bn_train_autocast(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    bool memory_efficient) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  const AutocastCast<Device> cast;
  return linear_bn_train(
      cast(input), cast(weight), cast(bias), bn_weight, bn_bias, eps,
      memory_efficient);
}

template <c10::DispatchKey AutocastKey, c10::DeviceType Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_linear_bn_train_autocast(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    std::string group_name,
    int64_t group_size,
    bool memory_efficient) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  const AutocastCast<Device> cast;
  return sync_linear_bn_train(
      cast(input), cast(weight), cast(bias), bn_weight, bn_bias, eps,
      std::move(group_name), group_size, memory_efficient);
}

template <c10::DispatchKey AutocastKey, c10::DeviceType Device>
at::Tensor linear_bn_eval_autocast(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  const AutocastCast<Device> cast;
  return linear_bn_eval(
      cast(input), cast(weight), cast(bias), bn_weight, bn_bias, running_mean,
      running_var, eps);
}

} // namespace

TORCH_LIBRARY_IMPL(convbn, AutocastCUDA, m) {
  constexpr auto key = c10::DispatchKey::AutocastCUDA;
  m.impl(
      "linear_bn_train", &linear_bn_train_autocast<key, c10::DeviceType::CUDA>);
  m.impl(
      "sync_linear_bn_train",
      &sync_linear_bn_train_autocast<key, c10::DeviceType::CUDA>);
  m.impl(
      "linear_bn_eval", &linear_bn_eval_autocast<key, c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(convbn, AutocastCPU, m) {
  constexpr auto key = c10::DispatchKey::AutocastCPU;
  m.impl(
      "linear_bn_train", &linear_bn_train_autocast<key, c10::DeviceType::CPU>);
  m.impl(
      "sync_linear_bn_train",
      &sync_linear_bn_train_autocast<key, c10::DeviceType::CPU>);
  m.impl("linear_bn_eval", &linear_bn_eval_autocast<key, c10::DeviceType::CPU>);
}

} // namespace convbn
