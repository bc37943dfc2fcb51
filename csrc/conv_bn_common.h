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
    const ConvArgs& conv) {
  return at::convolution(
             input, weight, std::nullopt, conv.stride, conv.padding,
             conv.dilation, conv.transposed, conv.output_padding, conv.groups)
      .contiguous(layout_of(input));
}

// The batch-norm kernels (kernel_table.h) walk 4-D tensors. A conv output
// of any rank, dense in its layout, is one for them: its spatial dimensions
// flattened into one, (N, C, S, 1), with the same memory. NCHW-like data
// (contiguous, any rank) keeps contiguous strides; channels_last_3d data
// becomes a channels_last (N, C, S, 1) view, each position a row of C
// values as before.
inline at::Tensor as_kernel_4d(const at::Tensor& t) {
  if (t.dim() == 4) {
    return t;
  }
  const int64_t n = t.size(0), c = t.size(1);
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) {
    s *= t.size(d);
  }
  if (t.is_contiguous()) {
    return t.view({n, c, s, 1});
  }
  TORCH_CHECK(
      t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d),
      "convbn: internal error: a kernel operand of shape ", t.sizes(),
      " and strides ", t.strides(), " is dense in neither layout");
  return t.permute({0, 2, 3, 4, 1}).view({n, s, 1, c}).permute({0, 3, 1, 2});
}

// The other way round: a kernel's (N, C, S, 1) result, dense in the layout
// of `like` (the conv output it was computed from), with like's sizes.
inline at::Tensor from_kernel_4d(const at::Tensor& t4, const at::Tensor& like) {
  if (like.dim() == 4) {
    return t4;
  }
  if (like.is_contiguous()) {
    return t4.view(like.sizes());
  }
  const auto sizes = like.sizes();
  return t4.permute({0, 2, 3, 1})
      .view({sizes[0], sizes[2], sizes[3], sizes[4], sizes[1]})
      .permute({0, 4, 1, 2, 3});
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

// The coefficients of the kernels' elementwise pass (channel_affine,
// kernel_table.h): out = a * ((u - mu) + b * (v - m)) + c, in that order,
// ATen's. The order matters in float32: every coefficient and every
// intermediate is then of the size of the data, of the gradient or of the
// result, so nothing leaves float32's range where nn.BatchNorm2d's own
// computation does not (see CenteredTerm in kernel_table.h).

// Forward: out = scale * (y - mean) + shift, with scale = gamma * invstd and
// shift = beta (0 without affine parameters). y is centred before it is
// scaled: y * scale - mean * scale would cancel when the mean is large
// against the spread.
struct NormalizeCoefficients {
  at::Tensor scale;
  at::Tensor mean;
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
  at::Tensor shift =
      present(bn_bias) ? bn_bias->to(dtype) : at::zeros_like(invstd);
  return {scale.contiguous(), mean.contiguous(), shift.contiguous()};
}

// Backward, with n values per channel, xhat = (y - mean) * invstd,
// sum_dy = sum(dy) and sum_dy_xmu = sum(dy * (y - mean)):
//   grad_y = gamma * invstd * (dy - sum_dy / n - xhat * sum(dy * xhat) / n)
//          = a * ((dy - mu) + b * (y - mean)) + c
// with a = gamma * invstd, mu = sum_dy / n, c = 0 and
//   b = -((sum_dy_xmu * invstd) / n) * invstd,
// ATen's k = dotp * invstd * invstd / N (batch_norm_backward_cpu), negated.
// Order matters: sum_dy_xmu * invstd is sum(dy * xhat) (the size of
// grad_bn_weight), / n the size of dy, * invstd that of dy / std: all of the
// data's scale, as is b * (y - mean) ~ dy. The former folding of a into b,
// -gamma * invstd^3 * sum_dy_xmu / n (~ dy / std^2), left float32's range:
// invstd^3 lost its digits for a batch std above ~1e13 and was 0 from ~1e15
// (the (y - mean) term of the gradient was lost, grad_input and grad_weight
// off by O(1)), and overflowed to inf for a tiny std with a tiny eps (NaN
// gradients), where nn.BatchNorm2d's float32 gradients stay accurate. y is
// centred before it is scaled, as ATen does: folding b * mean into c loses
// precision when the mean is large.
struct GradCoefficients {
  at::Tensor a;
  at::Tensor mu;
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
  at::Tensor a =
      present(bn_weight) ? invstd * bn_weight->to(dtype) : invstd.clone();
  at::Tensor mu = sum_dy * inv_n;
  at::Tensor b = ((sum_dy_xmu * invstd) * inv_n).mul_(invstd).neg_();
  at::Tensor c = at::zeros_like(invstd);
  return {a.contiguous(), mu.contiguous(), b.contiguous(), c.contiguous()};
}

} // namespace convbn
