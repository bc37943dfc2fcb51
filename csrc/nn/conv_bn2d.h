// convbn::ConvBN2d: torch::nn::Conv2d followed by torch::nn::BatchNorm2d as
// one torch::nn::Module, for LibTorch programs. The same numbers, train/eval
// behaviour and running statistics as the pair; the same parameter and
// buffer names as the Python convbn.ConvBN2d (weight, bias, bn_weight,
// bn_bias, running_mean, running_var, num_batches_tracked).
//
//   #include <nn/conv_bn2d.h>      // with csrc/ on the include path
//   convbn::ConvBN2d layer(convbn::ConvBN2dOptions(64, 128, 3).stride(2).padding(1));
//   auto y = layer(x);             // train: batch statistics, running stats updated
//   layer->eval(); y = layer(x);   // eval: batch norm folded into the conv
//
// Built into libconvbn.so by CMake (not into the Python extension, which has
// its own nn.Module).
#pragma once

#include <string>

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/options/batchnorm.h>
#include <torch/nn/options/conv.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <utility>
#include <vector>

namespace convbn {

// torch::nn::Conv2dOptions and torch::nn::BatchNormOptions in one: the same
// argument names and defaults, except bias, which is false here (batch norm
// subtracts any per-channel bias again), and memory_efficient.
struct ConvBN2dOptions {
  using padding_t = torch::nn::detail::conv_padding_t<2>;
  using padding_mode_t = torch::nn::detail::conv_padding_mode_t;

  ConvBN2dOptions(
      int64_t in_channels,
      int64_t out_channels,
      torch::ExpandingArray<2> kernel_size);
  // The options of an existing pair (Conv2dOptions, or a Conv2d's
  // conv->options); num_features must equal out_channels.
  ConvBN2dOptions(
      const torch::nn::Conv2dOptions& conv,
      const torch::nn::BatchNormOptions& bn)
      : ConvBN2dOptions(conv.in_channels(), conv.out_channels(), conv.kernel_size()) {
    copy_from(conv, bn);
  }
  ConvBN2dOptions(
      const torch::nn::detail::ConvNdOptions<2>& conv,
      const torch::nn::BatchNormOptions& bn)
      : ConvBN2dOptions(conv.in_channels(), conv.out_channels(), conv.kernel_size()) {
    copy_from(conv, bn);
  }

  // The options of the equivalent pair.
  torch::nn::Conv2dOptions conv_options() const;
  torch::nn::BatchNormOptions bn_options() const;

  // Conv2d's.
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  TORCH_ARG(torch::ExpandingArray<2>, kernel_size);
  TORCH_ARG(torch::ExpandingArray<2>, stride) = 1;
  // Ints, or torch::kSame (an odd total padding puts the extra row/column at
  // the bottom/right, as Conv2d does) or torch::kValid.
  TORCH_ARG(padding_t, padding) = 0;

 public:
  auto padding(std::initializer_list<int64_t> il) {
    return padding(torch::IntArrayRef{il});
  }
  TORCH_ARG(torch::ExpandingArray<2>, dilation) = 1;
  TORCH_ARG(int64_t, groups) = 1;
  TORCH_ARG(bool, bias) = false;
  TORCH_ARG(padding_mode_t, padding_mode) = torch::kZeros;
  // BatchNorm2d's. momentum = std::nullopt is the cumulative moving average.
  TORCH_ARG(double, eps) = 1e-5;
  TORCH_ARG(std::optional<double>, momentum) = 0.1;
  TORCH_ARG(bool, affine) = true;
  TORCH_ARG(bool, track_running_stats) = true;
  // Keep only the input, weights and per-channel statistics for backward and
  // recompute the convolution there (true), or keep the conv output (false).
  TORCH_ARG(bool, memory_efficient) = true;
  // Applied to the normalized output in the same pass: "identity", "relu",
  // "relu6", "leaky_relu" (with negative_slope), "silu", "hardswish",
  // "sigmoid" or "gelu" (torch::nn::GELU's default, approximate "none").
  TORCH_ARG(std::string, activation) = "identity";
  TORCH_ARG(double, negative_slope) = 0.01;

 private:
  template <typename ConvOptions>
  void copy_from(const ConvOptions& conv, const torch::nn::BatchNormOptions& bn) {
    check_num_features(conv.out_channels(), bn.num_features());
    stride(conv.stride());
    padding(conv.padding());
    dilation(conv.dilation());
    groups(conv.groups());
    bias(conv.bias());
    padding_mode(conv.padding_mode());
    eps(bn.eps());
    momentum(bn.momentum());
    affine(bn.affine());
    track_running_stats(bn.track_running_stats());
  }
  static void check_num_features(int64_t out_channels, int64_t num_features);
};

class ConvBN2dImpl : public torch::nn::Cloneable<ConvBN2dImpl> {
 public:
  ConvBN2dImpl(
      int64_t in_channels,
      int64_t out_channels,
      torch::ExpandingArray<2> kernel_size)
      : ConvBN2dImpl(
            ConvBN2dOptions(in_channels, out_channels, kernel_size)) {}
  explicit ConvBN2dImpl(ConvBN2dOptions options);

  // Checks the options, then (re)creates the parameters and buffers.
  void reset() override;
  // The initialization of Conv2d and BatchNorm2d.
  void reset_parameters();
  void reset_running_stats();

  // Train mode (or no running statistics): normalize with the batch's
  // statistics and update the running statistics. Eval: fold them into the
  // conv, one convolution.
  torch::Tensor forward(const torch::Tensor& input);

  // Module::to casts every tensor to dtype; num_batches_tracked stays an
  // integer count here (Python's Module.to casts floating-point tensors only).
  using torch::nn::Module::to;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;

  void pretty_print(std::ostream& stream) const override;

  ConvBN2dOptions options;

  torch::Tensor weight;  // the conv's (out, in / groups, kH, kW)
  torch::Tensor bias;    // the conv's, undefined unless options.bias()
  torch::Tensor bn_weight, bn_bias;  // undefined unless options.affine()
  torch::Tensor running_mean, running_var, num_batches_tracked;  // undefined
                                         // unless options.track_running_stats()

 private:
  // What the conv pads itself, and what the input is padded with first
  // (left, right, top, bottom): non-zero padding modes and an odd 'same'.
  std::vector<int64_t> conv_padding_{0, 0};
  std::vector<int64_t> input_pad_{0, 0, 0, 0};

  void keep_count_integral();
};

TORCH_MODULE(ConvBN2d);

// A ConvBN2d holding copies of the pair's parameters, buffers and options, in
// bn's train/eval mode: it computes what bn(conv(x)) computes.
ConvBN2d from_modules(
    const torch::nn::Conv2d& conv,
    const torch::nn::BatchNorm2d& bn,
    bool memory_efficient = true);

// The pair holding copies of the module's parameters, buffers and options,
// in its train/eval mode. A module with an activation is refused
// (c10::ValueError): the pair alone would not compute what it computes.
std::pair<torch::nn::Conv2d, torch::nn::BatchNorm2d> to_modules(
    const ConvBN2d& module);

} // namespace convbn
