// The three batch-norm kernels a device provides to the training driver
// (train_driver.h): CPU (cpu/, compiled once per instruction set and chosen
// at run time) and CUDA (cuda/batch_norm_kernels.cu). They take 4-D tensors
// (N, C, H, W), all dense in one layout, NCHW or channels_last (see
// walks_channels_last); a linear output (N, C) comes as an (N, C, 1, 1)
// channels_last view.
#pragma once

#include "activation.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace convbn {

// Whether the kernels walk `t` as channels_last (else NCHW). The driver
// makes every operand dense in the input's layout with .contiguous(fmt),
// which is_contiguous(fmt) decides; suggest_memory_format() must not decide
// here, since it can name the other layout for such a tensor (a size-1
// dimension with an unusual stride, as squeeze/unsqueeze leave in a
// gradient). A tensor dense in both layouts (C = 1 or H * W = 1) has the
// same offsets either way; with one value per plane it is walked as rows
// of C values, the faster walk.
inline bool walks_channels_last(const at::Tensor& t) {
  const bool nchw = t.is_contiguous();
  const bool channels_last = t.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(
      nchw || channels_last, "convbn: internal error: a kernel operand of "
      "shape ", t.sizes(), " and strides ", t.strides(), " is dense in "
      "neither layout");
  return channels_last && (!nchw || t.size(2) * t.size(3) == 1);
}

// Every operand a kernel indexes with the same offsets as the one its walk
// was chosen from must be dense in that walk's layout.
inline void check_walks_like(
    const at::Tensor& t,
    bool channels_last,
    const char* name) {
  TORCH_CHECK(
      t.is_contiguous(
          channels_last ? at::MemoryFormat::ChannelsLast
                        : at::MemoryFormat::Contiguous),
      "convbn: internal error: kernel operand `", name, "` of shape ",
      t.sizes(), " and strides ", t.strides(), " is not dense in the ",
      channels_last ? "channels_last" : "NCHW", " layout of the others");
}

// The optional centred term of channel_affine: b[c] * (v - m[c]).
//
// channel_affine computes out = a[c] * ((u - mu[c]) + b[c] * (v - m[c]))
// + c0[c], in that order, which is ATen's (batch_norm_backward_cpu:
// dx = (dy - grad_mean - (x - mean) * k) * invstd * w). Every intermediate
// is then of the size of an input or of the result:
//   forward   u = y, mu = mean, a = gamma * invstd, c0 = beta (no b term):
//             y is centred before it is scaled, so a large mean does not
//             cancel in y * a - mean * a (a constant channel's output is
//             exactly beta);
//   backward  u = dy, mu = sum(dy) / n, v = y, m = mean,
//             b = -(sum(dy * (y - mean)) * invstd / n) * invstd (~ dy / std),
//             a = gamma * invstd, c0 = 0.
// Folding a into b instead (b = -gamma * invstd^3 * sum(dy * (y - mean)) / n,
// ~ dy / std^2, and out = a * dy + b * (y - mean) + c) leaves float32's
// range where the pair nn.Conv2d + nn.BatchNorm2d stays accurate: invstd^3
// is subnormal once the batch's std is above ~1e13 and 0 from ~1e15, and
// inf once invstd is above ~7e12 (a tiny std with a tiny eps).
struct CenteredTerm {
  const at::Tensor& v;
  const at::Tensor& b;
  const at::Tensor& m;
};

struct KernelTable {
  // Per-channel mean and biased variance of y (opmath 1-D outputs).
  void (*batch_mean_var)(const at::Tensor& y, at::Tensor& mean, at::Tensor& var);
  // Per-channel sum(dy) and sum(dy * (y - mean)).
  void (*batch_grad_sums)(
      const at::Tensor& dy,
      const at::Tensor& y,
      const at::Tensor& mean,
      at::Tensor& sum_dy,
      at::Tensor& sum_dy_xmu);
  // out = f(a[c] * ((u - mu[c]) (+ b[c] * (v - m[c]))) + c0[c]),
  // elementwise (see CenteredTerm), f the activation: the forward's
  // normalization applies it in the same pass; the backward's grad-input
  // pass passes identity.
  void (*channel_affine)(
      at::Tensor& out,
      const at::Tensor& u,
      const at::Tensor& a,
      const at::Tensor& mu,
      const at::Tensor& c0,
      const CenteredTerm* centered,
      const Activation& act);
  // dz = dy * f'(a[c] * (y - mean[c]) + c0[c]), elementwise: the gradient
  // at the activation's input z, recomputed from the conv output y with the
  // forward's coefficients (a = gamma * invstd, c0 = beta), so the
  // normalized output is never kept. The mean is save_mean less the conv
  // bias, which can differ from the forward's by an ulp: an element within
  // rounding of a kink may take the other side's derivative. dz may alias
  // dy.
  void (*activation_grad)(
      at::Tensor& dz,
      const at::Tensor& dy,
      const at::Tensor& y,
      const at::Tensor& a,
      const at::Tensor& mean,
      const at::Tensor& c0,
      const Activation& act);
};

namespace cpu {

const KernelTable& default_kernels();
// nullptr where this build or this processor has no AVX2 + FMA.
const KernelTable* avx2_kernels();
// Whether this build compiled the AVX2 + FMA kernels (x86-64 with GCC or
// Clang), whatever this processor has.
extern const bool avx2_kernels_built;

// AVX2 where the processor has it, else the portable build. The environment
// variable CONVBN_CPU_CAPABILITY=default forces the portable kernels (read
// once, at the first call).
const KernelTable& kernels();

} // namespace cpu

namespace cuda {

// Defined in cuda/batch_norm_kernels.cu, in builds that compile CUDA.
const KernelTable& kernels();

} // namespace cuda
} // namespace convbn
