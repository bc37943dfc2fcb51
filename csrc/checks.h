// Argument checks shared by every kernel of every dispatch key (CPU, CUDA,
// Meta, composite), so that a bad input gets the same clear error wherever it
// runs, before anything is computed or written.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <vector>

namespace convbn {

// `t` (the argument called `name`) is on input's device. Every tensor a
// kernel reads must be: a CPU tensor handed to a CUDA kernel is a host
// pointer, and the illegal address would end the CUDA context.
void check_same_device(
    const char* op,
    const char* name,
    const at::Tensor& t,
    const at::Tensor& input);

// The convolution of a conv+BN op, with aten::convolution's arguments: any
// number of spatial dimensions (1, 2 or 3), transposed or not. The ops take
// them flat (their schemas mirror aten::convolution's); the driver and the
// checks pass them around as one value. output_padding is zeros when the op
// was given none ([]).
struct ConvArgs {
  std::vector<int64_t> stride;
  std::vector<int64_t> padding;
  std::vector<int64_t> dilation;
  int64_t groups = 1;
  bool transposed = false;
  std::vector<int64_t> output_padding;
};

ConvArgs conv_args(
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool transposed,
    at::IntArrayRef output_padding);

// Output channels of a conv weight: weight.size(0) for a convolution,
// weight.size(1) * groups for a transposed one (whose weight is
// (in_channels, out_channels / groups, k...)).
int64_t conv_out_channels(
    const at::Tensor& weight,
    bool transposed,
    int64_t groups);

inline int64_t conv_out_channels(const at::Tensor& weight, const ConvArgs& conv) {
  return conv_out_channels(weight, conv.transposed, conv.groups);
}

// Checks input/weight/bias/bn_weight/bn_bias and the conv hyper-parameters.
// Returns the conv output's sizes (N, C_out, spatial...). Sizes are
// SymInts so that the checks also run on fake tensors with symbolic shapes
// (torch.compile with dynamic shapes) without specializing them.
std::vector<c10::SymInt> check_conv_bn_args(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const ConvArgs& conv,
    double eps);

// The same for linear_bn ops: input (N, in_features), weight
// (out_features, in_features). Returns the output's sizes (N, out_features).
std::vector<c10::SymInt> check_linear_bn_args(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps);

// Training normalizes with batch statistics: it needs a non-empty batch and
// more than one value per channel.
void check_batch_statistics_possible(
    const char* op,
    const at::Tensor& input,
    c10::ArrayRef<c10::SymInt> output_sizes);

// A per-channel statistics tensor (running_mean, save_invstd, ...): 1-D with
// `channels` elements, floating point, on input's device.
void check_channel_vector(
    const char* op,
    const char* name,
    const at::Tensor& t,
    int64_t channels,
    const at::Tensor& input);

// batch norm's eps: positive and finite.
void check_eps(const char* op, double eps);

// Per-channel statistics (save_mean, save_invstd) are kept in float32 for
// float16/bfloat16 data, as cuDNN and ATen do.
at::ScalarType stats_dtype(at::ScalarType data_dtype);

// The layout the training ops compute in: the input's, to which the
// driver makes every tensor the kernels read dense with .contiguous() (the
// kernels then tell which layout an operand is dense in from is_contiguous,
// kernel_table.h).
inline at::MemoryFormat layout_of(const at::Tensor& t) {
  return t.suggest_memory_format();
}

} // namespace convbn
