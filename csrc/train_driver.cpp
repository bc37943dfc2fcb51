// The training forward and backward of conv+BN and linear+BN, for any
// device: argument checks, the linear map (ATen: oneDNN/cuDNN convolution,
// BLAS/cuBLAS matmul), the per-channel coefficients, allocation and the
// order of passes. The passes over the data are the device's kernels
// (kernel_table.h): cpu/ and cuda/ each register these functions at their
// dispatch key with their own table.
//
// Batch norm does not care which linear map produced its input, so both ops
// share one forward half (normalize_batch) and one backward half
// (batch_norm_backward), on a 4-D tensor: the conv output as it is, the
// linear output (N, C) as an (N, C, 1, 1) channels_last view.
#include "train_driver.h"

#include "checks.h"
#include "conv_bn_common.h"

namespace convbn {

namespace {
constexpr const char* kConvTrainOp = "convbn.conv_bn_train";
constexpr const char* kConvBackwardOp = "convbn.conv_bn_train_backward";
constexpr const char* kLinearTrainOp = "convbn.linear_bn_train";
constexpr const char* kLinearBackwardOp = "convbn.linear_bn_train_backward";

// A linear map's output (N, C) as the (N, C, 1, 1) tensor the kernels walk,
// with channels_last strides over the same memory: each sample is one row
// of C values, the layout the kernels reduce fastest (NCHW strides would
// make every value a plane of its own).
at::Tensor rows_as_4d(const at::Tensor& y) {
  return y.view({y.size(0), 1, 1, y.size(1)}).permute({0, 3, 1, 2});
}

at::Tensor rows_from_4d(const at::Tensor& y) {
  return y.view({y.size(0), y.size(1)});
}

struct NormalizedBatch {
  at::Tensor output;
  at::Tensor save_mean;
  at::Tensor save_invstd;
  at::Tensor kept_y; // the map's output in save-output mode, else empty
};

// The forward after the linear map. y is its output without bias: 4-D,
// dense in its suggested memory format, and the caller's to overwrite.
NormalizedBatch normalize_batch(
    const KernelTable& kernels,
    at::Tensor y,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    bool memory_efficient) {
  const auto acc_dtype = stats_dtype(y.scalar_type());
  const int64_t channels = y.size(1);
  at::Tensor mean = at::empty({channels}, y.options().dtype(acc_dtype));
  at::Tensor var = at::empty_like(mean);
  kernels.batch_mean_var(y, mean, var);
  at::Tensor invstd = (var + eps).rsqrt_();

  const auto coef = normalize_coefficients(mean, invstd, bn_weight, bn_bias);
  // Memory-efficient mode normalizes in place: the map's output is not
  // kept, the backward recomputes it.
  at::Tensor output = memory_efficient ? y : at::empty_like(y);
  kernels.channel_affine(output, y, coef.scale, coef.shift, nullptr);

  at::Tensor save_mean =
      present(bias) ? mean + bias->to(acc_dtype) : std::move(mean);
  at::Tensor kept_y =
      memory_efficient ? at::empty({0}, y.options()) : std::move(y);
  return {output, save_mean, invstd, kept_y};
}

struct BatchNormGrads {
  at::Tensor grad_y; // defined when output_mask[0] or output_mask[1]
  at::Tensor grad_bias;
  at::Tensor grad_bn_weight;
  at::Tensor grad_bn_bias;
};

// The backward down to the linear map's output. dy and y are 4-D in the
// same memory format; y_is_scratch says y was recomputed, so grad_y may
// overwrite it.
BatchNormGrads batch_norm_backward(
    const KernelTable& kernels,
    const at::Tensor& dy,
    at::Tensor y,
    bool y_is_scratch,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const at::Tensor& input,
    std::array<bool, 5> output_mask) {
  const int64_t channels = y.size(1);
  const auto acc_dtype = stats_dtype(y.scalar_type());
  const at::Tensor mean = mean_without_conv_bias(save_mean, bias, acc_dtype);
  const at::Tensor invstd = save_invstd.to(acc_dtype).contiguous();
  at::Tensor sum_dy = at::empty({channels}, y.options().dtype(acc_dtype));
  at::Tensor sum_dy_xmu = at::empty_like(sum_dy);
  kernels.batch_grad_sums(dy, y, mean, sum_dy, sum_dy_xmu);

  BatchNormGrads grads;
  const auto param_dtype = bn_param_dtype(bn_weight, input);
  if (output_mask[3] && present(bn_weight)) {
    grads.grad_bn_weight = (sum_dy_xmu * invstd).to(param_dtype);
  }
  if (output_mask[4]) {
    grads.grad_bn_bias = sum_dy.to(param_dtype);
  }
  if (output_mask[2] && present(bias)) {
    // Batch norm subtracts the batch mean, which absorbs any per-channel
    // constant: the output does not depend on the conv/linear bias at all.
    grads.grad_bias = at::zeros_like(*bias);
  }
  if (output_mask[0] || output_mask[1]) {
    const auto coef = grad_y_coefficients(
        sum_dy, sum_dy_xmu, invstd, bn_weight,
        y.size(0) * y.size(2) * y.size(3));
    at::Tensor grad_y = y_is_scratch ? y : at::empty_like(y);
    const CenteredTerm centered{y, coef.b, mean};
    kernels.channel_affine(grad_y, dy, coef.a, coef.c, &centered);
    grads.grad_y = std::move(grad_y);
  }
  return grads;
}

// What both backward ops check of grad_output and the saved statistics.
void check_backward_args(
    const char* op,
    const at::Tensor& grad_output,
    c10::ArrayRef<c10::SymInt> out_sizes,
    const at::Tensor& input,
    int64_t channels,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd) {
  check_channel_vector(op, "save_mean", save_mean, channels, input);
  check_channel_vector(op, "save_invstd", save_invstd, channels, input);
  TORCH_CHECK(
      grad_output.sym_sizes() == out_sizes,
      op, ": `grad_output` has shape ", grad_output.sizes(),
      " but the output has shape ", out_sizes);
  TORCH_CHECK(
      grad_output.scalar_type() == input.scalar_type(),
      op, ": `grad_output` has dtype ", grad_output.scalar_type(),
      " but `input` has dtype ", input.scalar_type());
}

// A kept map output (save-output mode) or nothing (memory-efficient mode,
// or a caller that passes none): the backward then recomputes it.
bool needs_recompute(const std::optional<at::Tensor>& kept_output) {
  return !present(kept_output) || kept_output->numel() == 0;
}

} // namespace

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
    bool memory_efficient) {
  const auto out_sizes = check_conv_bn_args(
      kConvTrainOp, input, weight, bias, bn_weight, bn_bias, stride, padding,
      dilation, groups, eps);
  check_batch_statistics_possible(kConvTrainOp, input, out_sizes);
  auto result = normalize_batch(
      kernels,
      conv_without_bias(input, weight, stride, padding, dilation, groups),
      bias, bn_weight, bn_bias, eps, memory_efficient);
  return {result.output, result.save_mean, result.save_invstd, result.kept_y};
}

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
    std::array<bool, 5> output_mask) {
  // eps is in save_invstd already; the differentiable (double backward)
  // path in autograd/ needs it to recompute the statistics.
  const auto out_sizes = check_conv_bn_args(
      kConvBackwardOp, input, weight, bias, bn_weight, std::nullopt, stride,
      padding, dilation, groups, eps);
  check_backward_args(
      kConvBackwardOp, grad_output, out_sizes, input, weight.size(0),
      save_mean, save_invstd);

  const auto fmt = layout_of(input);
  const bool recompute = needs_recompute(conv_output);
  at::Tensor y = recompute
      ? conv_without_bias(input, weight, stride, padding, dilation, groups)
      : conv_output->contiguous(fmt);
  TORCH_CHECK(
      y.sym_sizes() == c10::SymIntArrayRef(out_sizes),
      kConvBackwardOp, ": `conv_output` has shape ", y.sizes(), ", expected ",
      out_sizes);
  auto bn = batch_norm_backward(
      kernels, grad_output.contiguous(fmt), y, recompute, save_mean,
      save_invstd, bias, bn_weight, input, output_mask);

  at::Tensor grad_input, grad_weight;
  if (output_mask[0] || output_mask[1]) {
    auto grads = at::convolution_backward(
        bn.grad_y, input, weight, /*bias_sizes=*/std::nullopt, stride, padding,
        dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
        {output_mask[0], output_mask[1], false});
    if (output_mask[0]) {
      grad_input = std::get<0>(grads).contiguous(fmt);
    }
    if (output_mask[1]) {
      grad_weight = std::get<1>(grads).contiguous(layout_of(weight));
    }
  }
  return {grad_input, grad_weight, bn.grad_bias, bn.grad_bn_weight,
          bn.grad_bn_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_bn_train_forward(
    const KernelTable& kernels,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    bool memory_efficient) {
  const auto out_sizes = check_linear_bn_args(
      kLinearTrainOp, input, weight, bias, bn_weight, bn_bias, eps);
  check_batch_statistics_possible(kLinearTrainOp, input, out_sizes);
  // at::mm gives a fresh contiguous (N, C) tensor the kernels may overwrite.
  auto result = normalize_batch(
      kernels, rows_as_4d(at::mm(input, weight.t())), bias, bn_weight,
      bn_bias, eps, memory_efficient);
  at::Tensor kept_y = memory_efficient ? result.kept_y
                                       : rows_from_4d(result.kept_y);
  return {rows_from_4d(result.output), result.save_mean, result.save_invstd,
          kept_y};
}

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
    std::array<bool, 5> output_mask) {
  const auto out_sizes = check_linear_bn_args(
      kLinearBackwardOp, input, weight, bias, bn_weight, std::nullopt, eps);
  check_backward_args(
      kLinearBackwardOp, grad_output, out_sizes, input, weight.size(0),
      save_mean, save_invstd);

  const bool recompute = needs_recompute(linear_output);
  const at::Tensor y =
      recompute ? at::mm(input, weight.t()) : linear_output->contiguous();
  TORCH_CHECK(
      y.sym_sizes() == c10::SymIntArrayRef(out_sizes),
      kLinearBackwardOp, ": `linear_output` has shape ", y.sizes(),
      ", expected ", out_sizes);
  auto bn = batch_norm_backward(
      kernels, rows_as_4d(grad_output.contiguous()), rows_as_4d(y), recompute,
      save_mean, save_invstd, bias, bn_weight, input, output_mask);

  at::Tensor grad_input, grad_weight;
  if (output_mask[0] || output_mask[1]) {
    const at::Tensor grad_y = rows_from_4d(bn.grad_y);
    if (output_mask[0]) {
      grad_input = at::mm(grad_y, weight);
    }
    if (output_mask[1]) {
      grad_weight = at::mm(grad_y.t(), input);
    }
  }
  return {grad_input, grad_weight, bn.grad_bias, bn.grad_bn_weight,
          bn.grad_bn_bias};
}

} // namespace convbn
