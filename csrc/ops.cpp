// The operator schemas, declared once, and the C++ API that calls them
// through the dispatcher. Kernels live in one file per dispatch key:
//   cpu/*_train_kernel.cpp              CPU
//   ../cuda/*_train_kernel.cu           CUDA (each registers itself)
//   autograd/*_train_autograd.cpp       Autograd
//   autocast/*_autocast.cpp             AutocastCPU, AutocastCUDA
//   composite/*.cpp                     device-generic ops built from ATen
//   ../python/convbn/_fake.py           Meta/fake (shapes for FakeTensor)
#include "convbn.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace convbn {

TORCH_LIBRARY(convbn, m) {
  m.def(
      "conv_bn_train(Tensor input, Tensor weight, Tensor? bias, "
      "Tensor? bn_weight, Tensor? bn_bias, int[] stride, int[] padding, "
      "int[] dilation, int groups, float eps, bool memory_efficient=True, "
      "bool transposed=False, int[] output_padding=[], "
      "str activation=\"identity\", float negative_slope=0.01) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd, "
      "Tensor conv_output)");
  m.def(
      "conv_bn_train_backward(Tensor grad_output, Tensor input, "
      "Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? conv_output, "
      "Tensor save_mean, Tensor save_invstd, int[] stride, int[] padding, "
      "int[] dilation, int groups, float eps, bool[5] output_mask, "
      "bool transposed=False, int[] output_padding=[], Tensor? bn_bias=None, "
      "str activation=\"identity\", float negative_slope=0.01) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_bn_weight, Tensor grad_bn_bias)");
  // conv_bn_train over the ranks of a torch.distributed process group (its
  // name and size, as torch.distributed's functional collectives take it);
  // count is the group's number of values per channel, for
  // update_running_stats and the backward.
  m.def(
      "sync_conv_bn_train(Tensor input, Tensor weight, Tensor? bias, "
      "Tensor? bn_weight, Tensor? bn_bias, int[] stride, int[] padding, "
      "int[] dilation, int groups, float eps, str group_name, "
      "int group_size, bool memory_efficient=True, bool transposed=False, "
      "int[] output_padding=[], str activation=\"identity\", "
      "float negative_slope=0.01) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd, "
      "Tensor conv_output, Tensor count)");
  m.def(
      "sync_conv_bn_train_backward(Tensor grad_output, Tensor input, "
      "Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? conv_output, "
      "Tensor save_mean, Tensor save_invstd, int[] stride, int[] padding, "
      "int[] dilation, int groups, float eps, str group_name, "
      "int group_size, Tensor count, bool[5] output_mask, "
      "bool transposed=False, int[] output_padding=[], Tensor? bn_bias=None, "
      "str activation=\"identity\", float negative_slope=0.01) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_bn_weight, Tensor grad_bn_bias)");
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!) num_batches_tracked, Tensor save_mean, Tensor save_invstd, "
      "float eps, float? momentum, SymInt count) -> ()");
  m.def(
      "fold_conv_bn(Tensor weight, Tensor? bias, Tensor? bn_weight, "
      "Tensor? bn_bias, Tensor running_mean, Tensor running_var, float eps, "
      "bool transposed=False, int groups=1) "
      "-> (Tensor folded_weight, Tensor folded_bias)");
  m.def(
      "conv_bn_eval(Tensor input, Tensor weight, Tensor? bias, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor running_mean, "
      "Tensor running_var, int[] stride, int[] padding, int[] dilation, "
      "int groups, float eps, bool transposed=False, "
      "int[] output_padding=[], str activation=\"identity\", "
      "float negative_slope=0.01) -> Tensor");
  m.def(
      "linear_bn_train(Tensor input, Tensor weight, Tensor? bias, "
      "Tensor? bn_weight, Tensor? bn_bias, float eps, "
      "bool memory_efficient=True) -> (Tensor output, Tensor save_mean, "
      "Tensor save_invstd, Tensor linear_output)");
  m.def(
      "linear_bn_train_backward(Tensor grad_output, Tensor input, "
      "Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? linear_output, "
      "Tensor save_mean, Tensor save_invstd, float eps, bool[5] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_bn_weight, Tensor grad_bn_bias)");
  // linear_bn_train over the ranks of a process group, as
  // sync_conv_bn_train.
  m.def(
      "sync_linear_bn_train(Tensor input, Tensor weight, Tensor? bias, "
      "Tensor? bn_weight, Tensor? bn_bias, float eps, str group_name, "
      "int group_size, bool memory_efficient=True) -> (Tensor output, "
      "Tensor save_mean, Tensor save_invstd, Tensor linear_output, "
      "Tensor count)");
  m.def(
      "sync_linear_bn_train_backward(Tensor grad_output, Tensor input, "
      "Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? linear_output, "
      "Tensor save_mean, Tensor save_invstd, float eps, str group_name, "
      "int group_size, Tensor count, bool[5] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_bn_weight, Tensor grad_bn_bias)");
  m.def(
      "linear_bn_eval(Tensor input, Tensor weight, Tensor? bias, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> Tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train(
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
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("convbn::conv_bn_train", "")
                       .typed<decltype(conv_bn_train)>();
  return op.call(
      input, weight, bias, bn_weight, bn_bias, stride, padding, dilation,
      groups, eps, memory_efficient, transposed, output_padding, activation,
      negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_train_backward(
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
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("convbn::conv_bn_train_backward", "")
                       .typed<decltype(conv_bn_train_backward)>();
  return op.call(
      grad_output, input, weight, bias, bn_weight, conv_output, save_mean,
      save_invstd, stride, padding, dilation, groups, eps, output_mask,
      transposed, output_padding, bn_bias, activation, negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_conv_bn_train(
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
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("convbn::sync_conv_bn_train", "")
                       .typed<decltype(sync_conv_bn_train)>();
  return op.call(
      input, weight, bias, bn_weight, bn_bias, stride, padding, dilation,
      groups, eps, std::move(group_name), group_size, memory_efficient,
      transposed, output_padding, activation, negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_conv_bn_train_backward(
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
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convbn::sync_conv_bn_train_backward", "")
          .typed<decltype(sync_conv_bn_train_backward)>();
  return op.call(
      grad_output, input, weight, bias, bn_weight, conv_output, save_mean,
      save_invstd, stride, padding, dilation, groups, eps,
      std::move(group_name), group_size, count, output_mask, transposed,
      output_padding, bn_bias, activation, negative_slope);
}

void update_running_stats(
    at::Tensor& running_mean,
    at::Tensor& running_var,
    at::Tensor& num_batches_tracked,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    double eps,
    std::optional<double> momentum,
    int64_t count) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convbn::update_running_stats", "")
          .typed<void(
              at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&,
              const at::Tensor&, double, std::optional<double>, c10::SymInt)>();
  op.call(
      running_mean, running_var, num_batches_tracked, save_mean, save_invstd,
      eps, momentum, c10::SymInt(count));
}

std::tuple<at::Tensor, at::Tensor> fold_conv_bn(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps,
    bool transposed,
    int64_t groups) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("convbn::fold_conv_bn", "")
                       .typed<decltype(fold_conv_bn)>();
  return op.call(
      weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
      transposed, groups);
}

at::Tensor conv_bn_eval(
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
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("convbn::conv_bn_eval", "")
                       .typed<decltype(conv_bn_eval)>();
  return op.call(
      input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
      stride, padding, dilation, groups, eps, transposed, output_padding,
      activation, negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_train(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    bool memory_efficient) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("convbn::linear_bn_train", "")
                       .typed<decltype(linear_bn_train)>();
  return op.call(input, weight, bias, bn_weight, bn_bias, eps, memory_efficient);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_bn_train_backward(
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
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convbn::linear_bn_train_backward", "")
          .typed<decltype(linear_bn_train_backward)>();
  return op.call(
      grad_output, input, weight, bias, bn_weight, linear_output, save_mean,
      save_invstd, eps, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_linear_bn_train(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    std::string group_name,
    int64_t group_size,
    bool memory_efficient) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("convbn::sync_linear_bn_train", "")
                       .typed<decltype(sync_linear_bn_train)>();
  return op.call(
      input, weight, bias, bn_weight, bn_bias, eps, std::move(group_name),
      group_size, memory_efficient);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_linear_bn_train_backward(
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
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convbn::sync_linear_bn_train_backward", "")
          .typed<decltype(sync_linear_bn_train_backward)>();
  return op.call(
      grad_output, input, weight, bias, bn_weight, linear_output, save_mean,
      save_invstd, eps, std::move(group_name), group_size, count,
      output_mask);
}

at::Tensor linear_bn_eval(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("convbn::linear_bn_eval", "")
                       .typed<decltype(linear_bn_eval)>();
  return op.call(
      input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps);
}

} // namespace convbn
