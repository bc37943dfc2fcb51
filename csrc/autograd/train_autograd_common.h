// What the autograd kernels of conv_bn_train and linear_bn_train share
// (autograd/*_train_autograd.cpp); eval_autograd.cpp uses its input mask.
#pragma once

#include "../activation.h"
#include "../conv_bn_common.h"

#include <torch/autograd.h>

#include <array>
#include <optional>
#include <string>

namespace convbn {

// Which of a node's N forward tensors need a gradient, given which were
// passed: needs_input_grad counts only the tensors that were passed (an
// absent optional has no edge).
template <size_t N>
std::array<bool, N> needs_grad_of_passed(
    torch::autograd::AutogradContext* ctx,
    const std::array<bool, N>& passed) {
  std::array<bool, N> mask{};
  size_t edge = 0;
  for (size_t i = 0; i < N; ++i) {
    if (passed[i]) {
      mask[i] = ctx->needs_input_grad(edge++);
    }
  }
  return mask;
}

// Which of (input, weight, bias, bn_weight, bn_bias) need a gradient.
inline std::array<bool, 5> train_output_mask(
    torch::autograd::AutogradContext* ctx,
    bool has_bias,
    bool has_bn_weight,
    bool has_bn_bias) {
  return needs_grad_of_passed<5>(
      ctx, {true, true, has_bias, has_bn_weight, has_bn_bias});
}

// The process group of a synchronized training op (sync_conv_bn_train,
// sync_linear_bn_train); absent for the per-process ops.
struct SyncGroup {
  std::string name;
  int64_t size;
};

// Keeps what a synchronized node's backward needs besides tensors.
inline void save_sync_group(
    torch::autograd::AutogradContext* ctx,
    const SyncGroup& group,
    const at::Tensor& output) {
  ctx->saved_data["group_name"] = group.name;
  ctx->saved_data["group_size"] = group.size;
  ctx->saved_data["output_sizes"] = output.sizes();
}

inline bool is_synchronized(torch::autograd::AutogradContext* ctx) {
  return ctx->saved_data.count("group_name") > 0;
}

// The node's grad_output; undefined (no gradient reached the output) means
// nothing to compute, except for a synchronized node: the other ranks wait
// for this rank's sums, so it takes part with zeros.
inline at::Tensor grad_or_zeros(
    torch::autograd::AutogradContext* ctx,
    const at::Tensor& grad_output,
    const at::Tensor& input) {
  if (grad_output.defined() || !is_synchronized(ctx)) {
    return grad_output;
  }
  return at::zeros(
      ctx->saved_data["output_sizes"].toIntVector(), input.options());
}

// A backward op called with grad mode on and an input that requires grad is
// itself being differentiated (double backward): it must record a graph.
// bn_bias counts where the backward depends on it (a fused activation).
inline bool records_graph(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias = std::nullopt) {
  auto requires_grad = [](const std::optional<at::Tensor>& t) {
    return present(t) && t->requires_grad();
  };
  return at::GradMode::is_enabled() &&
      (grad_output.requires_grad() || input.requires_grad() ||
       weight.requires_grad() || requires_grad(bias) ||
       requires_grad(bn_weight) || requires_grad(bn_bias));
}

// The synchronized backward ops have no double backward (nor has
// nn.SyncBatchNorm): their statistics depend on other processes' inputs.
inline void check_no_double_backward(
    const char* op,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias = std::nullopt) {
  TORCH_CHECK(
      !records_graph(grad_output, input, weight, bias, bn_weight, bn_bias),
      op, ": double backward (create_graph=True through a synchronized "
      "batch norm) is not supported, as with nn.SyncBatchNorm; use the "
      "per-process module for higher-order gradients");
}

// conv_bn_train's backward written with differentiable ATen ops, for double
// backward: the statistics are recomputed from input, so that their
// dependence on input is differentiated too.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
differentiable_conv_bn_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const ConvArgs& conv,
    double eps,
    std::array<bool, 5> output_mask,
    const Activation& act);

} // namespace convbn
