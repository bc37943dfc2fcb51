// fold_conv_bn, conv_bn_eval and linear_bn_eval: batch norm with running
// statistics folded into the conv (or linear layer),
//   W' = W * gamma / sqrt(running_var + eps)           (per output channel)
//   b' = (b - running_mean) * gamma / sqrt(running_var + eps) + beta
// then one convolution (or one matmul). Written with ATen ops and registered as
// CompositeImplicitAutograd: the conv goes to cuDNN/oneDNN, fake tensors need
// no kernel of their own and torch.export decomposes the eval operators into
// the fold and one aten.convolution. On CPU and CUDA the eval operators have
// autograd kernels of their own (autograd/eval_autograd.cpp); fold_conv_bn
// is differentiated as written, to any order. The fold is computed in float32 (float64 for float64
// data) and only its results are cast to the weight's dtype. conv_bn_eval
// then applies its activation in place on the conv output.
#include "fold_and_eval.h"

#include "../activation.h"
#include "../checks.h"
#include "../conv_bn_common.h"
#include "../convbn.h"

#include <torch/library.h>

#include <utility>
#include <vector>

namespace convbn {
namespace {

void check_fold_args(
    const char* op,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps,
    OutputChannels where) {
  TORCH_CHECK(
      (weight.dim() >= 3 && weight.dim() <= 5) ||
          (weight.dim() == 2 && !where.transposed),
      op, ": expected a conv `weight` (out_channels, in_channels / groups, "
      "k...) with 1 to 3 kernel dimensions, a transposed conv's `weight` "
      "(in_channels, out_channels / groups, k...) or a linear `weight` "
      "(out_features, in_features), but got shape ", weight.sizes(),
      where.transposed ? " with transposed=True" : "");
  TORCH_CHECK(
      where.groups > 0 && (!where.transposed || weight.size(0) % where.groups == 0),
      op, ": `groups` (", where.groups, ") must be positive and, for a "
      "transposed conv, divide weight.size(0) = ", weight.size(0));
  const int64_t channels =
      conv_out_channels(weight, where.transposed, where.groups);
  for (const auto& [name, t] :
       {std::pair<const char*, const std::optional<at::Tensor>*>{"bias", &bias},
        {"bn_weight", &bn_weight},
        {"bn_bias", &bn_bias}}) {
    if (present(*t)) {
      check_channel_vector(op, name, **t, channels, weight);
    }
  }
  check_channel_vector(op, "running_mean", running_mean, channels, weight);
  check_channel_vector(op, "running_var", running_var, channels, weight);
  check_eps(op, eps);
}

std::tuple<at::Tensor, at::Tensor> fold_conv_bn_composite(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps,
    bool transposed,
    int64_t groups) {
  const OutputChannels where{transposed, groups};
  check_fold_args(
      "convbn.fold_conv_bn", weight, bias, bn_weight, bn_bias, running_mean,
      running_var, eps, where);
  const auto dtype = fold_dtype(weight, running_var);
  at::Tensor scale = fold_inv_std(running_var, dtype, eps);
  if (present(bn_weight)) {
    scale = scale * bn_weight->to(dtype);
  }
  return {scale_output_channels(weight, scale, where),
          fold_bias(bias, running_mean, scale, bn_bias).to(weight.dtype())};
}

} // namespace

at::ScalarType fold_dtype(const at::Tensor& weight, const at::Tensor& running_var) {
  return at::promote_types(
      stats_dtype(weight.scalar_type()), running_var.scalar_type());
}

at::Tensor fold_inv_std(const at::Tensor& running_var, at::ScalarType dtype, double eps) {
  return (running_var.to(dtype) + eps).rsqrt();
}

at::Tensor centered_bias(
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    at::ScalarType dtype) {
  return present(bias) ? bias->to(dtype) - running_mean.to(dtype)
                       : -running_mean.to(dtype);
}

at::Tensor fold_bias(
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& scale,
    const std::optional<at::Tensor>& bn_bias) {
  const auto dtype = scale.scalar_type();
  at::Tensor folded = centered_bias(bias, running_mean, dtype) * scale;
  return present(bn_bias) ? folded + bn_bias->to(dtype) : folded;
}

namespace {

// A transposed conv's weight (in_channels, out_channels / groups, k...) as
// (groups, in_channels / groups, out_channels / groups, k...): its output
// channel o = g * (out_channels / groups) + j is [g, :, j, ...].
std::vector<int64_t> grouped_transposed_sizes(
    const at::Tensor& weight,
    int64_t groups) {
  std::vector<int64_t> sizes{groups, weight.size(0) / groups};
  for (int64_t d = 1; d < weight.dim(); ++d) {
    sizes.push_back(weight.size(d));
  }
  return sizes;
}

} // namespace

at::Tensor scale_output_channels(
    const at::Tensor& weight,
    const at::Tensor& scale,
    OutputChannels where) {
  const at::Tensor w = weight.to(scale.scalar_type());
  if (!where.transposed) {
    std::vector<int64_t> per_output_channel(weight.dim(), 1);
    per_output_channel[0] = -1;
    return (w * scale.view(per_output_channel)).to(weight.scalar_type());
  }
  const auto grouped = grouped_transposed_sizes(weight, where.groups);
  std::vector<int64_t> per_output_channel(grouped.size(), 1);
  per_output_channel[0] = where.groups;
  per_output_channel[2] = -1;
  return (w.reshape(grouped) * scale.view(per_output_channel))
      .view(weight.sizes())
      .to(weight.scalar_type());
}

at::Tensor sum_per_output_channel(const at::Tensor& t, OutputChannels where) {
  if (!where.transposed) {
    std::vector<int64_t> reduced;
    for (int64_t d = 1; d < t.dim(); ++d) {
      reduced.push_back(d);
    }
    return t.sum(reduced);
  }
  return t.reshape({where.groups, t.size(0) / where.groups, t.size(1), -1})
      .sum({1, 3})
      .reshape({-1});
}

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
    double negative_slope) {
  constexpr const char* kOp = "convbn.conv_bn_eval";
  // fold_conv_bn checks the running statistics (on weight's device, which
  // check_conv_bn_args ties to input's).
  const ConvArgs conv =
      conv_args(stride, padding, dilation, groups, transposed, output_padding);
  check_conv_bn_args(kOp, input, weight, bias, bn_weight, bn_bias, conv, eps);
  // fold_conv_bn's kernel, called directly: the same ATen ops without a
  // second trip through the dispatcher.
  const auto [folded_weight, folded_bias] = fold_conv_bn_composite(
      weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
      transposed, groups);
  const Activation act = parse_activation(kOp, activation, negative_slope);
  at::Tensor output = at::convolution(
      input, folded_weight, folded_bias, conv.stride, conv.padding,
      conv.dilation, conv.transposed, conv.output_padding, conv.groups);
  // In place on the conv's fresh output: one output-sized buffer at a time.
  apply_activation_(output, act);
  return output;
}

at::Tensor linear_bn_eval_composite(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps) {
  check_linear_bn_args(
      "convbn.linear_bn_eval", input, weight, bias, bn_weight, bn_bias, eps);
  // fold_conv_bn's kernel, called directly: the same ATen ops without a
  // second trip through the dispatcher.
  const auto [folded_weight, folded_bias] = fold_conv_bn_composite(
      weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
      /*transposed=*/false, /*groups=*/1);
  return at::linear(input, folded_weight, folded_bias);
}

TORCH_LIBRARY_IMPL(convbn, CompositeImplicitAutograd, m) {
  m.impl("fold_conv_bn", &fold_conv_bn_composite);
  m.impl("conv_bn_eval", &conv_bn_eval_composite);
  m.impl("linear_bn_eval", &linear_bn_eval_composite);
}

} // namespace convbn
