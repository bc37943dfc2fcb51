// Device-independent pieces of the training forward and backward: the
// convolution (from ATen, so cuDNN/oneDNN do it) and the per-channel
// coefficients that turn batch norm into one affine pass per direction.
// Computed on 1-D tensors of C values with ATen ops, in the statistics dtype.
#pragma once

#include "checks.h"

#include <ATen/ATen.h>

#include <optional>

namespace convbn {

// The conv output without its bias: in training the conv bias only shifts
// the batch mean, so it is added to the reported mean instead of to every
// element (the normalized output is the same either way).
inline at::Tensor conv_without_bias(
    const at::Tensor& input,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups) {
  return at::convolution(
             input, weight, std::nullopt, stride, padding, dilation,
             /*transposed=*/false, /*output_padding=*/{0, 0}, groups)
      .contiguous(layout_of(input));
}

inline bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// The other way round: an undefined tensor (an absent optional input, as
// autograd and LibTorch modules hold it) as std::nullopt.
inline std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The dtype of grad_bn_weight/grad_bn_bias: bn_weight's (bn_bias has the
// same), or the data's when batch norm has no affine parameters.
inline at::ScalarType bn_param_dtype(
    const std::optional<at::Tensor>& bn_weight,
    const at::Tensor& input) {
  return present(bn_weight) ? bn_weight->scalar_type() : input.scalar_type();
}

// save_mean is the mean of conv output + bias; the kernels see the conv
// output without bias, as a dense vector: .to() returns save_mean itself
// when its dtype already matches, and a caller's save_mean may be a strided
// view, which the kernels (indexing mean[c]) would misread.
inline at::Tensor mean_without_conv_bias(
    const at::Tensor& save_mean,
    const std::optional<at::Tensor>& bias,
    at::ScalarType dtype) {
  at::Tensor mean = save_mean.to(dtype);
  return (present(bias) ? mean - bias->to(dtype) : mean).contiguous();
}

// Forward: out = y * scale + shift, with
//   scale = invstd * gamma,  shift = beta - mean * scale.
struct NormalizeCoefficients {
  at::Tensor scale;
  at::Tensor shift;
};

inline NormalizeCoefficients normalize_coefficients(
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias) {
  const auto dtype = invstd.scalar_type();
  at::Tensor scale =
      present(bn_weight) ? invstd * bn_weight->to(dtype) : invstd.clone();
  at::Tensor shift = -mean * scale;
  if (present(bn_bias)) {
    shift.add_(bn_bias->to(dtype));
  }
  return {scale.contiguous(), shift.contiguous()};
}

// Backward, with n values per channel, xhat = (y - mean) * invstd,
// sum_dy = sum(dy) and sum_dy_xmu = sum(dy * (y - mean)):
//   grad_y = gamma * invstd * (dy - sum_dy / n - xhat * sum(dy * xhat) / n)
//          = a * dy + b * (y - mean) + c
// with k = gamma * invstd, a = k, b = -k * invstd^2 * sum_dy_xmu / n,
// c = -k * sum_dy / n. (y is centred before scaling, as ATen does: folding
// b * mean into c loses precision when the mean is large.)
struct GradCoefficients {
  at::Tensor a;
  at::Tensor b;
  at::Tensor c;
};

inline GradCoefficients grad_y_coefficients(
    const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xmu,
    const at::Tensor& invstd,
    const std::optional<at::Tensor>& bn_weight,
    int64_t values_per_channel) {
  const auto dtype = invstd.scalar_type();
  const double inv_n = 1.0 / static_cast<double>(values_per_channel);
  at::Tensor k =
      present(bn_weight) ? invstd * bn_weight->to(dtype) : invstd.clone();
  at::Tensor b = -k * invstd * invstd * sum_dy_xmu * inv_n;
  at::Tensor c = -k * sum_dy * inv_n;
  return {k.contiguous(), b.contiguous(), c.contiguous()};
}

} // namespace convbn
