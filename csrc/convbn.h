// convbn: Conv2d followed by BatchNorm2d, and Linear followed by
// BatchNorm1d, each as one operator.
//
// The C++ API for LibTorch users. Every function calls its operator through
// the dispatcher (namespace `convbn`), so autograd, the CPU/CUDA kernels and
// the Meta kernels are picked exactly as they are from Python's
// torch.ops.convbn.*. Link the op library (libconvbn.so) to use it.
#pragma once

#include <ATen/ATen.h>

#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace convbn {

// Training forward: y = convolution(input, weight) + bias, then batch norm
// of y with the batch's statistics (biased variance), scaled by bn_weight and
// shifted by bn_bias when given. The convolution is aten::convolution's:
// 1-, 2- or 3-D ((N, C, L), (N, C, H, W) or (N, C, D, H, W) input, one
// stride/padding/dilation value per spatial dimension), transposed
// (weight (in_channels, out_channels / groups, k...), output_padding) or not.
// Returns (output, save_mean, save_invstd, conv_output):
//   output       same dtype and memory format as input
//   save_mean    per-channel mean of y (the conv output including its bias)
//   save_invstd  per-channel 1 / sqrt(var_biased(y) + eps)
//   conv_output  the conv output before normalization (without bias) when
//                memory_efficient is false, else an empty tensor: the
//                memory-efficient backward recomputes it from input and weight.
// save_mean and save_invstd are float32 for float16/bfloat16 input.
// activation ("identity", "relu", "relu6", "leaky_relu" with negative_slope,
// "silu", "hardswish", "sigmoid", "gelu") is applied to the normalized
// output in the same pass: output = activation(batch_norm(y)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train(
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
    bool memory_efficient = true,
    bool transposed = false,
    at::IntArrayRef output_padding = {},
    c10::string_view activation = "identity",
    double negative_slope = 0.01);

// Backward of conv_bn_train. output_mask selects which of (grad_input,
// grad_weight, grad_bias, grad_bn_weight, grad_bn_bias) are computed; the
// others are returned undefined. Pass conv_output as returned by
// conv_bn_train (an empty tensor or nullopt means: recompute it). With an
// activation, pass the forward's bn_bias, activation and negative_slope:
// the backward recomputes the activation's input from them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_train_backward(
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
    std::array<bool, 5> output_mask,
    bool transposed = false,
    at::IntArrayRef output_padding = {},
    const std::optional<at::Tensor>& bn_bias = std::nullopt,
    c10::string_view activation = "identity",
    double negative_slope = 0.01);

// conv_bn_train with the batch statistics of all ranks of a torch.distributed
// process group, as nn.SyncBatchNorm computes them: every rank all-gathers
// the per-channel (mean, biased variance, count) of its own batch and
// merges them exactly, so the ranks' batch sizes may differ and a rank may
// have an empty batch. group_name is the group's registered name
// (ProcessGroup.group_name in Python, "0" for the default group),
// group_size its number of ranks; every rank of the group must call it.
// Returns conv_bn_train's four results and count, a 0-dim int64 CPU tensor:
// the group's number of values per channel, for update_running_stats and
// sync_conv_bn_train_backward. Needs a PyTorch built with torch.distributed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_conv_bn_train(
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
    std::string group_name,
    int64_t group_size,
    bool memory_efficient = true,
    bool transposed = false,
    at::IntArrayRef output_padding = {},
    c10::string_view activation = "identity",
    double negative_slope = 0.01);

// Backward of sync_conv_bn_train: conv_bn_train_backward with the two
// per-channel sums of the normalization's backward all-reduced over the
// group, and count as sync_conv_bn_train returned it. grad_bn_weight and
// grad_bn_bias are this rank's own, as in nn.SyncBatchNorm: data-parallel
// training reduces parameter gradients itself. Every rank of the group must
// call it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_conv_bn_train_backward(
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
    std::string group_name,
    int64_t group_size,
    const at::Tensor& count,
    std::array<bool, 5> output_mask,
    bool transposed = false,
    at::IntArrayRef output_padding = {},
    const std::optional<at::Tensor>& bn_bias = std::nullopt,
    c10::string_view activation = "identity",
    double negative_slope = 0.01);

// Updates running statistics in place from conv_bn_train's save_mean and
// save_invstd, as nn.BatchNorm2d does: num_batches_tracked += 1, then
// running = (1 - f) * running + f * batch with f = momentum, or
// f = 1 / num_batches_tracked when momentum is nullopt (cumulative average).
// running_var takes the unbiased variance (count / (count - 1)), where count
// is the number of values per channel (N * H_out * W_out). Checks every
// argument before it writes anything.
void update_running_stats(
    at::Tensor& running_mean,
    at::Tensor& running_var,
    at::Tensor& num_batches_tracked,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    double eps,
    std::optional<double> momentum,
    int64_t count);

// Batch norm with running statistics folded into a conv or a linear layer:
// returns (folded_weight, folded_bias) with conv(x, folded_weight,
// folded_bias) == batch_norm(conv(x, weight, bias), running stats,
// bn_weight, bn_bias) for a convolution of any rank, and the same with
// linear for a 2-D weight (out_features, in_features). A transposed
// convolution's weight (in_channels, out_channels / groups, k...) is scaled
// along its output channels: pass transposed and its groups. Computed in
// float32 (float64 for float64
// weights), cast to weight's dtype.
std::tuple<at::Tensor, at::Tensor> fold_conv_bn(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps,
    bool transposed = false,
    int64_t groups = 1);

// Inference: batch norm with running statistics folded into the conv weight
// and bias, one convolution. Differentiable with respect to input, weight,
// bias, bn_weight and bn_bias (training with frozen statistics).
at::Tensor conv_bn_eval(
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
    bool transposed = false,
    at::IntArrayRef output_padding = {},
    c10::string_view activation = "identity",
    double negative_slope = 0.01);

// Linear followed by BatchNorm1d on (N, in_features) input: as conv_bn_train
// with y = input @ weight.T + bias (N, out_features) in place of the conv
// output. Returns (output, save_mean, save_invstd, linear_output), the last
// an empty tensor when memory_efficient (the backward recomputes it).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_train(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    bool memory_efficient = true);

// Backward of linear_bn_train; output_mask as in conv_bn_train_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_bn_train_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& linear_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    double eps,
    std::array<bool, 5> output_mask);

// linear_bn_train with the batch statistics of all ranks of a process
// group, with sync_conv_bn_train's arguments, results and rules.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_linear_bn_train(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    std::string group_name,
    int64_t group_size,
    bool memory_efficient = true);

// Backward of sync_linear_bn_train, as sync_conv_bn_train_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_linear_bn_train_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& linear_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    double eps,
    std::string group_name,
    int64_t group_size,
    const at::Tensor& count,
    std::array<bool, 5> output_mask);

// Inference of Linear + BatchNorm1d: the running statistics folded into the
// linear weight and bias, one matmul. Differentiable like conv_bn_eval.
at::Tensor linear_bn_eval(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps);

// What this library was built with, one `key=value` per line:
//   torch=2.13.0                 the LibTorch it was compiled against
//   cpu_kernels=default,avx2     the CPU kernel builds it holds
//   cpu_kernels_used=avx2        the one this process runs (see
//                                CONVBN_CPU_CAPABILITY in README.md)
//   cuda=13.0                    CUDA runtime it was compiled with (builds
//   cuda_architectures=800,900   with CUDA only: nvcc's __CUDA_ARCH_LIST__)
std::string build_info();

} // namespace convbn

// The same text, for callers without C++ linkage (Python reads it through
// ctypes before running any operator). The string lives as long as the
// library.
extern "C" const char* convbn_build_info();
