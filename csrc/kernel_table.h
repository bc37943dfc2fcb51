// The three batch-norm kernels a device provides to the training driver
// (train_driver.h): CPU (cpu/, compiled once per instruction set and chosen
// at run time) and CUDA (cuda/batch_norm_kernels.cu). They take 4-D tensors
// (N, C, H, W) dense in their suggested memory format; a linear output
// (N, C) comes as an (N, C, 1, 1) channels_last view.
#pragma once

#include <ATen/core/Tensor.h>

namespace convbn {

// The optional centred term of channel_affine: b[c] * (v - m[c]).
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
  // out = a[c] * u + c0[c] (+ b[c] * (v - m[c])), elementwise.
  void (*channel_affine)(
      at::Tensor& out,
      const at::Tensor& u,
      const at::Tensor& a,
      const at::Tensor& c0,
      const CenteredTerm* centered);
};

namespace cpu {

const KernelTable& default_kernels();
// nullptr where this build or this processor has no AVX2 + FMA.
const KernelTable* avx2_kernels();

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
