// The training forward and backward of conv+BN, for any device: argument
// checks, the convolution (ATen: oneDNN, cuDNN), the per-channel
// coefficients, allocation and the order of passes. The passes over the
// data are the device's kernels (kernel_table.h): cpu/ and cuda/ each
// register these functions at their dispatch key with their own table.
#include "conv_bn_train_driver.h"

#include "checks.h"
#include "conv_bn_common.h"

namespace convbn {

namespace {
constexpr const char* kTrainOp = "convbn.conv_bn_train";
constexpr const char* kBackwardOp = "convbn.conv_bn_train_backward";
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
      kTrainOp, input, weight, bias, bn_weight, bn_bias, stride, padding,
      dilation, groups, eps);
  check_batch_statistics_possible(kTrainOp, input, out_sizes);

  at::Tensor y =
      conv_without_bias(input, weight, stride, padding, dilation, groups);
  const auto acc_dtype = stats_dtype(y.scalar_type());
  const int64_t channels = y.size(1);
  at::Tensor mean = at::empty({channels}, y.options().dtype(acc_dtype));
  at::Tensor var = at::empty_like(mean);
  kernels.batch_mean_var(y, mean, var);
  at::Tensor invstd = (var + eps).rsqrt_();

  const auto coef = normalize_coefficients(mean, invstd, bn_weight, bn_bias);
  // Memory-efficient mode normalizes in place: the conv output is not kept,
  // the backward recomputes it.
  at::Tensor output = memory_efficient ? y : at::empty_like(y);
  kernels.channel_affine(output, y, coef.scale, coef.shift, nullptr);

  at::Tensor save_mean =
      present(bias) ? mean + bias->to(acc_dtype) : std::move(mean);
  at::Tensor conv_output =
      memory_efficient ? at::empty({0}, y.options()) : std::move(y);
  return {output, save_mean, invstd, conv_output};
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
      kBackwardOp, input, weight, bias, bn_weight, std::nullopt, stride,
      padding, dilation, groups, eps);
  const int64_t channels = weight.size(0);
  check_channel_vector(kBackwardOp, "save_mean", save_mean, channels, input);
  check_channel_vector(
      kBackwardOp, "save_invstd", save_invstd, channels, input);
  TORCH_CHECK(
      grad_output.sym_sizes() == c10::SymIntArrayRef(out_sizes),
      kBackwardOp, ": `grad_output` has shape ", grad_output.sizes(),
      " but the output has shape ", out_sizes);
  TORCH_CHECK(
      grad_output.scalar_type() == input.scalar_type(),
      kBackwardOp, ": `grad_output` has dtype ", grad_output.scalar_type(),
      " but `input` has dtype ", input.scalar_type());

  const auto fmt = layout_of(input);
  const bool recompute = !present(conv_output) || conv_output->numel() == 0;
  at::Tensor y = recompute
      ? conv_without_bias(input, weight, stride, padding, dilation, groups)
      : conv_output->contiguous(fmt);
  TORCH_CHECK(
      y.sym_sizes() == c10::SymIntArrayRef(out_sizes),
      kBackwardOp, ": `conv_output` has shape ", y.sizes(), ", expected ",
      out_sizes);
  const at::Tensor dy = grad_output.contiguous(fmt);

  const auto acc_dtype = stats_dtype(y.scalar_type());
  const at::Tensor mean = mean_without_conv_bias(save_mean, bias, acc_dtype);
  const at::Tensor invstd = save_invstd.to(acc_dtype).contiguous();
  at::Tensor sum_dy = at::empty({channels}, y.options().dtype(acc_dtype));
  at::Tensor sum_dy_xmu = at::empty_like(sum_dy);
  kernels.batch_grad_sums(dy, y, mean, sum_dy, sum_dy_xmu);

  at::Tensor grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias;
  const auto param_dtype = bn_param_dtype(bn_weight, input);
  if (output_mask[3] && present(bn_weight)) {
    grad_bn_weight = (sum_dy_xmu * invstd).to(param_dtype);
  }
  if (output_mask[4]) {
    grad_bn_bias = sum_dy.to(param_dtype);
  }
  if (output_mask[2] && present(bias)) {
    // Batch norm subtracts the batch mean, which absorbs any per-channel
    // constant: the output does not depend on the conv bias at all.
    grad_bias = at::zeros_like(*bias);
  }
  if (output_mask[0] || output_mask[1]) {
    const auto coef = grad_y_coefficients(
        sum_dy, sum_dy_xmu, invstd, bn_weight,
        y.size(0) * y.size(2) * y.size(3));
    // A recomputed conv output is scratch: grad_y overwrites it.
    at::Tensor grad_y = recompute ? y : at::empty_like(y);
    const CenteredTerm centered{y, coef.b, mean};
    kernels.channel_affine(grad_y, dy, coef.a, coef.c, &centered);
    auto grads = at::convolution_backward(
        grad_y, input, weight, /*bias_sizes=*/std::nullopt, stride, padding,
        dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
        {output_mask[0], output_mask[1], false});
    if (output_mask[0]) {
      grad_input = std::get<0>(grads).contiguous(fmt);
    }
    if (output_mask[1]) {
      grad_weight = std::get<1>(grads).contiguous(layout_of(weight));
    }
  }
  return {grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias};
}

} // namespace convbn
