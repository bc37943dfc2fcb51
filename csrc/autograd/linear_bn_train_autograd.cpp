// Autograd for linear_bn_train and sync_linear_bn_train: one node in the
// graph whose backward calls linear_bn_train_backward (or
// sync_linear_bn_train_backward) through the dispatcher.
//
// What the node keeps, as for conv_bn_train: input, weight, bias and
// bn_weight, plus the per-channel save_mean/save_invstd; the linear output
// only in save-output mode (memory_efficient=false).
//
// Double backward: a linear layer is a 1x1 convolution of (N, C, 1, 1)
// tensors, so the differentiable backward is conv_bn_train's, on views. The
// synchronized backward has no double backward.
#include "train_autograd_common.h"

#include "../checks.h"
#include "../convbn.h"

#include <torch/library.h>

namespace convbn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

class LinearBNTrainFunction
    : public torch::autograd::Function<LinearBNTrainFunction> {
 public:
  static constexpr size_t kNumInputs = 8;

  static variable_list forward(
      AutogradContext* ctx,
      const Variable& input,
      const Variable& weight,
      const std::optional<Variable>& bias,
      const std::optional<Variable>& bn_weight,
      const std::optional<Variable>& bn_bias,
      double eps,
      bool memory_efficient,
      const std::optional<SyncGroup>& group) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor output, save_mean, save_invstd, linear_output, count;
    if (group.has_value()) {
      std::tie(output, save_mean, save_invstd, linear_output, count) =
          sync_linear_bn_train(
              input, weight, bias, bn_weight, bn_bias, eps, group->name,
              group->size, memory_efficient);
      save_sync_group(ctx, *group, output);
    } else {
      std::tie(output, save_mean, save_invstd, linear_output) =
          linear_bn_train(
              input, weight, bias, bn_weight, bn_bias, eps, memory_efficient);
    }

    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bn_bias"] = present(bn_bias);
    ctx->save_for_backward(
        {input, weight, bias.value_or(Variable()),
         bn_weight.value_or(Variable()), linear_output, save_mean, save_invstd,
         count});
    variable_list outputs{output, save_mean, save_invstd, linear_output};
    if (count.defined()) {
      outputs.push_back(count);
    }
    ctx->mark_non_differentiable(
        variable_list(outputs.begin() + 1, outputs.end()));
    // Only `output` carries a gradient (see conv_bn_train_autograd.cpp).
    ctx->set_materialize_grads(false);
    return outputs;
  }

  static variable_list backward(
      AutogradContext* ctx,
      const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor grad_output = grad_or_zeros(ctx, grad_outputs[0], saved[0]);
    if (!grad_output.defined()) {
      return variable_list(kNumInputs);
    }
    const auto output_mask = train_output_mask(
        ctx, saved[2].defined(), saved[3].defined(),
        ctx->saved_data["has_bn_bias"].toBool());
    const auto eps = ctx->saved_data["eps"].toDouble();
    at::Tensor grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias;
    if (is_synchronized(ctx)) {
      std::tie(grad_input, grad_weight, grad_bias, grad_bn_weight,
               grad_bn_bias) =
          sync_linear_bn_train_backward(
              grad_output, saved[0], saved[1], optional_of(saved[2]),
              optional_of(saved[3]), optional_of(saved[4]), saved[5],
              saved[6], eps, ctx->saved_data["group_name"].toStringRef(),
              ctx->saved_data["group_size"].toInt(), saved[7], output_mask);
    } else {
      std::tie(grad_input, grad_weight, grad_bias, grad_bn_weight,
               grad_bn_bias) =
          linear_bn_train_backward(
              grad_output, saved[0], saved[1], optional_of(saved[2]),
              optional_of(saved[3]), optional_of(saved[4]), saved[5],
              saved[6], eps, output_mask);
    }
    variable_list grads(kNumInputs);
    grads[0] = grad_input;
    grads[1] = grad_weight;
    grads[2] = grad_bias;
    grads[3] = grad_bn_weight;
    grads[4] = grad_bn_bias;
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_bn_train_autograd(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    bool memory_efficient) {
  auto result = LinearBNTrainFunction::apply(
      input, weight, bias, bn_weight, bn_bias, eps, memory_efficient,
      std::optional<SyncGroup>());
  return {result[0], result[1], result[2], result[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_linear_bn_train_autograd(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    std::string group_name,
    int64_t group_size,
    bool memory_efficient) {
  auto result = LinearBNTrainFunction::apply(
      input, weight, bias, bn_weight, bn_bias, eps, memory_efficient,
      std::optional<SyncGroup>(SyncGroup{std::move(group_name), group_size}));
  return {result[0], result[1], result[2], result[3], result[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_linear_bn_train_backward_autograd(
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
  check_no_double_backward(
      "convbn.sync_linear_bn_train_backward", grad_output, input, weight, bias,
      bn_weight);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return sync_linear_bn_train_backward(
      grad_output, input, weight, bias, bn_weight, linear_output, save_mean,
      save_invstd, eps, std::move(group_name), group_size, count, output_mask);
}

at::Tensor as_1x1(const at::Tensor& t) {
  return t.view({t.size(0), t.size(1), 1, 1});
}

at::Tensor from_1x1(const at::Tensor& t) {
  return t.defined() ? t.view({t.size(0), t.size(1)}) : t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_bn_train_backward_autograd(
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
  if (records_graph(grad_output, input, weight, bias, bn_weight)) {
    check_linear_bn_args(
        "convbn.linear_bn_train_backward", input, weight, bias, bn_weight,
        std::nullopt, eps);
    auto [grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias] =
        differentiable_conv_bn_backward(
            as_1x1(grad_output), as_1x1(input), as_1x1(weight), bias,
            bn_weight, /*bn_bias=*/std::nullopt,
            conv_args(/*stride=*/{1, 1}, /*padding=*/{0, 0},
                      /*dilation=*/{1, 1}, /*groups=*/1,
                      /*transposed=*/false, /*output_padding=*/{}),
            eps, output_mask, Activation{});
    return {from_1x1(grad_input), from_1x1(grad_weight), grad_bias,
            grad_bn_weight, grad_bn_bias};
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return linear_bn_train_backward(
      grad_output, input, weight, bias, bn_weight, linear_output, save_mean,
      save_invstd, eps, output_mask);
}

} // namespace

TORCH_LIBRARY_IMPL(convbn, Autograd, m) {
  m.impl("linear_bn_train", &linear_bn_train_autograd);
  m.impl("linear_bn_train_backward", &linear_bn_train_backward_autograd);
  m.impl("sync_linear_bn_train", &sync_linear_bn_train_autograd);
  m.impl(
      "sync_linear_bn_train_backward",
      &sync_linear_bn_train_backward_autograd);
}

} // namespace convbn
