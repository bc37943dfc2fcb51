// convbn::ConvBN2d: bookkeeping only (options, parameters, padding plan); the
// computing is done by the convbn operators through the dispatcher.
#include "conv_bn2d.h"

#include "../activation.h"
#include "../conv_bn_common.h"
#include "../convbn.h"

#include <torch/nn/init.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>

#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <ostream>
#include <string>
#include <variant>

namespace convbn {
namespace {

constexpr const char* kModule = "convbn.ConvBN2d";

// at::pad's name for a conv padding mode other than zeros.
std::string pad_mode_name(const ConvBN2dOptions::padding_mode_t& mode) {
  if (std::holds_alternative<torch::enumtype::kReflect>(mode)) {
    return "reflect";
  }
  if (std::holds_alternative<torch::enumtype::kReplicate>(mode)) {
    return "replicate";
  }
  if (std::holds_alternative<torch::enumtype::kCircular>(mode)) {
    return "circular";
  }
  return "constant";
}

// Gives dst's parameters and buffers copies of src's, by name: their values,
// dtype, device and requires_grad (set_data keeps each tensor the one the
// module registered).
void copy_state(const torch::nn::Module& src, torch::nn::Module& dst,
                const std::vector<std::pair<std::string, std::string>>& names) {
  const auto src_params = src.named_parameters(/*recurse=*/false);
  const auto src_buffers = src.named_buffers(/*recurse=*/false);
  auto dst_params = dst.named_parameters(/*recurse=*/false);
  auto dst_buffers = dst.named_buffers(/*recurse=*/false);
  for (const auto& [from, to] : names) {
    const at::Tensor* source = src_params.find(from);
    at::Tensor* target = dst_params.find(to);
    if (source == nullptr) {
      source = src_buffers.find(from);
      target = dst_buffers.find(to);
    }
    if (source != nullptr && source->defined()) {
      TORCH_INTERNAL_ASSERT(target != nullptr && target->defined(), "no tensor ", to);
      // A counter stays an integer (Module::to(kFloat64) makes a pair's
      // num_batches_tracked a double).
      target->set_data(
          target->is_floating_point()
              ? source->detach().clone()
              : source->detach().to(target->scalar_type(), /*non_blocking=*/false, /*copy=*/true));
      target->set_requires_grad(source->requires_grad());
    }
  }
}

// (pair's name, ConvBN2d's name) for the conv's and batch norm's tensors.
const std::vector<std::pair<std::string, std::string>> kConvNames{
    {"weight", "weight"}, {"bias", "bias"}};
const std::vector<std::pair<std::string, std::string>> kBatchNormNames{
    {"weight", "bn_weight"},
    {"bias", "bn_bias"},
    {"running_mean", "running_mean"},
    {"running_var", "running_var"},
    {"num_batches_tracked", "num_batches_tracked"}};

std::vector<std::pair<std::string, std::string>> reversed(
    const std::vector<std::pair<std::string, std::string>>& names) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [a, b] : names) {
    out.emplace_back(b, a);
  }
  return out;
}

} // namespace

ConvBN2dOptions::ConvBN2dOptions(
    int64_t in_channels,
    int64_t out_channels,
    torch::ExpandingArray<2> kernel_size)
    : in_channels_(in_channels),
      out_channels_(out_channels),
      kernel_size_(std::move(kernel_size)) {}

void ConvBN2dOptions::check_num_features(int64_t out_channels, int64_t num_features) {
  TORCH_CHECK(
      out_channels == num_features,
      kModule, ": the conv has ", out_channels,
      " output channels but the batch norm has num_features=", num_features);
}

torch::nn::Conv2dOptions ConvBN2dOptions::conv_options() const {
  return torch::nn::Conv2dOptions(in_channels(), out_channels(), kernel_size())
      .stride(stride())
      .padding(padding())
      .dilation(dilation())
      .groups(groups())
      .bias(bias())
      .padding_mode(padding_mode());
}

torch::nn::BatchNormOptions ConvBN2dOptions::bn_options() const {
  return torch::nn::BatchNormOptions(out_channels())
      .eps(eps())
      .momentum(momentum())
      .affine(affine())
      .track_running_stats(track_running_stats());
}

ConvBN2dImpl::ConvBN2dImpl(ConvBN2dOptions options) : options(std::move(options)) {
  // NOLINTNEXTLINE(clang-analyzer-optin.cplusplus.VirtualCall)
  reset();
}

void ConvBN2dImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.groups() > 0, kModule, ": groups must be a positive integer, got ", o.groups());
  parse_activation(kModule, o.activation(), o.negative_slope());
  TORCH_CHECK(
      o.in_channels() > 0 && o.in_channels() % o.groups() == 0,
      kModule, ": in_channels (", o.in_channels(),
      ") must be a positive multiple of groups (", o.groups(), ")");
  TORCH_CHECK(
      o.out_channels() > 0 && o.out_channels() % o.groups() == 0,
      kModule, ": out_channels (", o.out_channels(),
      ") must be a positive multiple of groups (", o.groups(), ")");
  TORCH_CHECK(
      std::isfinite(o.eps()) && o.eps() > 0,
      kModule, ": eps must be a positive finite number, got ", o.eps());
  TORCH_CHECK(
      !o.momentum().has_value() || std::isfinite(*o.momentum()),
      kModule, ": momentum must be a finite number, or std::nullopt for a "
      "cumulative moving average, got ", o.momentum().value_or(0));

  // The padding plan, as Conv2d does it: the conv pads zeros symmetrically;
  // other modes, and the odd remainder of 'same', pad the input first.
  std::array<int64_t, 2> symmetric{0, 0};
  std::array<int64_t, 2> extra{0, 0};  // (H, W) at the bottom/right
  if (std::holds_alternative<torch::enumtype::kSame>(o.padding())) {
    TORCH_CHECK(
        (*o.stride())[0] == 1 && (*o.stride())[1] == 1,
        kModule, ": padding=kSame is not supported for strided convolutions");
    for (int i = 0; i < 2; ++i) {
      const int64_t total = (*o.dilation())[i] * ((*o.kernel_size())[i] - 1);
      symmetric[i] = total / 2;
      extra[i] = total - 2 * symmetric[i];
    }
  } else if (const auto* ints = std::get_if<torch::ExpandingArray<2>>(&o.padding())) {
    symmetric = {(**ints)[0], (**ints)[1]};
  }
  if (std::holds_alternative<torch::enumtype::kZeros>(o.padding_mode())) {
    conv_padding_ = {symmetric[0], symmetric[1]};
    input_pad_ = {0, extra[1], 0, extra[0]};
  } else {
    conv_padding_ = {0, 0};
    input_pad_ = {symmetric[1], symmetric[1] + extra[1], symmetric[0],
                  symmetric[0] + extra[0]};
  }

  const auto& k = *o.kernel_size();
  weight = register_parameter(
      "weight",
      torch::empty({o.out_channels(), o.in_channels() / o.groups(), k[0], k[1]}));
  bias = o.bias() ? register_parameter("bias", torch::empty({o.out_channels()}))
                  : register_parameter("bias", at::Tensor(), /*requires_grad=*/false);
  if (o.affine()) {
    bn_weight = register_parameter("bn_weight", torch::empty({o.out_channels()}));
    bn_bias = register_parameter("bn_bias", torch::empty({o.out_channels()}));
  } else {
    bn_weight = register_parameter("bn_weight", at::Tensor(), /*requires_grad=*/false);
    bn_bias = register_parameter("bn_bias", at::Tensor(), /*requires_grad=*/false);
  }
  if (o.track_running_stats()) {
    running_mean = register_buffer("running_mean", torch::zeros({o.out_channels()}));
    running_var = register_buffer("running_var", torch::ones({o.out_channels()}));
    num_batches_tracked = register_buffer(
        "num_batches_tracked", torch::tensor(0, torch::dtype(torch::kLong)));
  } else {
    running_mean = register_buffer("running_mean", at::Tensor());
    running_var = register_buffer("running_var", at::Tensor());
    num_batches_tracked = register_buffer("num_batches_tracked", at::Tensor());
  }
  reset_parameters();
}

void ConvBN2dImpl::reset_running_stats() {
  if (options.track_running_stats()) {
    torch::NoGradGuard no_grad;
    running_mean.zero_();
    running_var.fill_(1);
    num_batches_tracked.zero_();
  }
}

void ConvBN2dImpl::reset_parameters() {
  // torch::nn::Conv2d's and torch::nn::BatchNorm2d's initialization.
  torch::nn::init::kaiming_uniform_(weight, /*a=*/std::sqrt(5.0));
  if (bias.defined()) {
    const auto [fan_in, fan_out] = torch::nn::init::_calculate_fan_in_and_fan_out(weight);
    const double bound = 1 / std::sqrt(static_cast<double>(fan_in));
    torch::nn::init::uniform_(bias, -bound, bound);
  }
  reset_running_stats();
  if (options.affine()) {
    torch::nn::init::ones_(bn_weight);
    torch::nn::init::zeros_(bn_bias);
  }
}

torch::Tensor ConvBN2dImpl::forward(const torch::Tensor& input) {
  TORCH_CHECK(
      input.dim() == 4,
      kModule, ": expected a 4-D input (N, C, H, W), got a ", input.dim(),
      "-D input of shape ", input.sizes(),
      input.dim() == 3 ? " (add the batch dimension with input.unsqueeze(0))" : "");
  at::Tensor x = input;
  if (input_pad_[0] || input_pad_[1] || input_pad_[2] || input_pad_[3]) {
    x = at::pad(x, input_pad_, pad_mode_name(options.padding_mode()));
  }
  const std::vector<int64_t> stride(options.stride()->begin(), options.stride()->end());
  const std::vector<int64_t> dilation(
      options.dilation()->begin(), options.dilation()->end());
  // BatchNorm2d: batch statistics in training, and in eval when no running
  // statistics are tracked.
  if (!is_training() && running_mean.defined()) {
    return conv_bn_eval(
        x, weight, optional_of(bias), optional_of(bn_weight),
        optional_of(bn_bias), running_mean, running_var, stride,
        conv_padding_, dilation, options.groups(), options.eps(),
        /*transposed=*/false, /*output_padding=*/{}, options.activation(),
        options.negative_slope());
  }
  auto [output, save_mean, save_invstd, conv_output] = conv_bn_train(
      x, weight, optional_of(bias), optional_of(bn_weight),
      optional_of(bn_bias), stride, conv_padding_, dilation,
      options.groups(), options.eps(), options.memory_efficient(),
      /*transposed=*/false, /*output_padding=*/{}, options.activation(),
      options.negative_slope());
  // Only once the compute succeeded: an error leaves the statistics as they were.
  if (is_training() && running_mean.defined()) {
    update_running_stats(
        running_mean, running_var, num_batches_tracked, save_mean, save_invstd,
        options.eps(), options.momentum(),
        output.size(0) * output.size(2) * output.size(3));
  }
  return output;
}

void ConvBN2dImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(device, dtype, non_blocking);
  keep_count_integral();
}

void ConvBN2dImpl::to(torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(dtype, non_blocking);
  keep_count_integral();
}

void ConvBN2dImpl::keep_count_integral() {
  if (num_batches_tracked.defined() && num_batches_tracked.is_floating_point()) {
    num_batches_tracked.set_data(num_batches_tracked.to(torch::kLong));
  }
}

void ConvBN2dImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  stream << "convbn::ConvBN2d(" << o.in_channels() << ", " << o.out_channels()
         << ", kernel_size=" << o.kernel_size() << ", stride=" << o.stride()
         << ", padding=";
  if (const auto* ints = std::get_if<torch::ExpandingArray<2>>(&o.padding())) {
    stream << *ints;
  } else if (std::holds_alternative<torch::enumtype::kSame>(o.padding())) {
    stream << "kSame";
  } else {
    stream << "kValid";
  }
  stream << ", dilation=" << o.dilation() << ", groups=" << o.groups()
         << ", bias=" << std::boolalpha << o.bias() << ", padding_mode="
         << torch::enumtype::get_enum_name(o.padding_mode()) << ", eps=" << o.eps()
         << ", momentum=";
  if (o.momentum().has_value()) {
    stream << *o.momentum();
  } else {
    stream << "None";
  }
  stream << ", affine=" << o.affine()
         << ", track_running_stats=" << o.track_running_stats()
         << ", memory_efficient=" << o.memory_efficient();
  if (o.activation() != "identity") {
    stream << ", activation=" << o.activation();
    if (o.activation() == "leaky_relu") {
      stream << ", negative_slope=" << o.negative_slope();
    }
  }
  stream << ")";
}

ConvBN2d from_modules(
    const torch::nn::Conv2d& conv,
    const torch::nn::BatchNorm2d& bn,
    bool memory_efficient) {
  ConvBN2d fused(ConvBN2dOptions(conv->options, bn->options)
                     .memory_efficient(memory_efficient));
  copy_state(*conv, *fused, kConvNames);
  copy_state(*bn, *fused, kBatchNormNames);
  fused->train(bn->is_training());
  return fused;
}

std::pair<torch::nn::Conv2d, torch::nn::BatchNorm2d> to_modules(
    const ConvBN2d& module) {
  // The pair alone would compute something else; Python's to_modules
  // returns the activation module as a third element.
  TORCH_CHECK_VALUE(
      module->options.activation() == "identity",
      kModule, ": to_modules returns the conv and the batch norm only, but "
      "this module also applies activation=", module->options.activation(),
      "; apply that activation after the pair");
  torch::nn::Conv2d conv(module->options.conv_options());
  torch::nn::BatchNorm2d bn(module->options.bn_options());
  copy_state(*module, *conv, reversed(kConvNames));
  copy_state(*module, *bn, reversed(kBatchNormNames));
  conv->train(module->is_training());
  bn->train(module->is_training());
  return {conv, bn};
}

} // namespace convbn
