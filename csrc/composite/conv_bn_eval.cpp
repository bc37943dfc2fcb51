// conv_bn_eval: batch norm with running statistics folded into the conv,
//   W' = W * gamma / sqrt(running_var + eps)           (per output channel)
//   b' = (b - running_mean) * gamma / sqrt(running_var + eps) + beta
// followed by one convolution. Written with ATen ops and registered as
// CompositeImplicitAutograd: autograd differentiates the fold and the conv
// (to any order), the conv goes to cuDNN/oneDNN, and fake tensors need no
// kernel of their own. The fold is computed in float32 (float64 for float64
// data) and only the folded weight is cast to the data's dtype.
#include "../checks.h"
#include "../conv_bn_common.h"

#include <torch/library.h>

namespace convbn {
namespace {

constexpr const char* kOp = "convbn.conv_bn_eval";

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
    double eps) {
  check_conv_bn_args(
      kOp, input, weight, bias, bn_weight, bn_bias, stride, padding, dilation,
      groups, eps);
  const int64_t channels = weight.size(0);
  check_channel_vector(kOp, "running_mean", running_mean, channels, input);
  check_channel_vector(kOp, "running_var", running_var, channels, input);

  const auto fold_dtype = at::promote_types(
      stats_dtype(input.scalar_type()), running_var.scalar_type());
  at::Tensor scale = (running_var.to(fold_dtype) + eps).rsqrt();
  if (present(bn_weight)) {
    scale = scale * bn_weight->to(fold_dtype);
  }
  at::Tensor centered_bias = present(bias)
      ? bias->to(fold_dtype) - running_mean.to(fold_dtype)
      : -running_mean.to(fold_dtype);
  at::Tensor folded_bias = centered_bias * scale;
  if (present(bn_bias)) {
    folded_bias = folded_bias + bn_bias->to(fold_dtype);
  }
  const at::Tensor folded_weight =
      (weight.to(fold_dtype) * scale.view({-1, 1, 1, 1})).to(weight.dtype());
  return at::convolution(
      input, folded_weight, folded_bias.to(weight.dtype()), stride, padding,
      dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
}

} // namespace

TORCH_LIBRARY_IMPL(convbn, CompositeImplicitAutograd, m) {
  m.impl("conv_bn_eval", &conv_bn_eval_composite);
}

} // namespace convbn
