// The three batch-norm kernels a device provides to the training driver
// (train_driver.h): CPU (cpu/, compiled once per instruction set and chosen
// at run time) and CUDA (cuda/batch_norm_kernels.cu). They take 4-D tensors
// (N, C, H, W), all dense in one layout, NCHW or channels_last (see
// walks_channels_last); a linear output (N, C) comes as an (N, C, 1, 1)
// channels_last view.
#pragma once

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
