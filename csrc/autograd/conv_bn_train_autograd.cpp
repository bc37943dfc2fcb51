// Autograd for conv_bn_train and sync_conv_bn_train: one node in the graph
// whose backward calls conv_bn_train_backward (or
// sync_conv_bn_train_backward) through the dispatcher.
//
// What the node keeps (the memory saving): input, weight, conv bias and
// bn_weight, plus the per-channel save_mean/save_invstd. In memory-efficient
// mode conv_output is an empty tensor and the backward recomputes the conv;
// otherwise the conv output is kept too and nothing is recomputed.
//
// Double backward: conv_bn_train_backward has an Autograd kernel of its own.
// When the graph of the backward itself is recorded (create_graph=True, or
// any call with grad mode on and inputs that require grad), it computes the
// gradients from differentiable ATen ops, recomputing the statistics from
// input so that their dependence on input is part of the graph, as ATen's
// batchnorm_double_backward does. Otherwise it runs the fast kernels. The
// synchronized backward has no double backward.
#include "train_autograd_common.h"

#include "../activation.h"
#include "../checks.h"
#include "../convbn.h"

#include <torch/autograd.h>
#include <torch/library.h>

namespace convbn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

class ConvBNTrainFunction
    : public torch::autograd::Function<ConvBNTrainFunction> {
 public:
  static constexpr size_t kNumInputs = 16;

  static variable_list forward(
      AutogradContext* ctx,
      const Variable& input,
      const Variable& weight,
      const std::optional<Variable>& bias,
      const std::optional<Variable>& bn_weight,
      const std::optional<Variable>& bn_bias,
      at::IntArrayRef stride,
      at::IntArrayRef padding,
      at::IntArrayRef dilation,
      int64_t groups,
      double eps,
      bool memory_efficient,
      bool transposed,
      at::IntArrayRef output_padding,
      c10::string_view activation,
      double negative_slope,
      const std::optional<SyncGroup>& group) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor output, save_mean, save_invstd, conv_output, count;
    if (group.has_value()) {
      std::tie(output, save_mean, save_invstd, conv_output, count) =
          sync_conv_bn_train(
              input, weight, bias, bn_weight, bn_bias, stride, padding,
              dilation, groups, eps, group->name, group->size,
              memory_efficient, transposed, output_padding, activation,
              negative_slope);
      save_sync_group(ctx, *group, output);
    } else {
      std::tie(output, save_mean, save_invstd, conv_output) = conv_bn_train(
          input, weight, bias, bn_weight, bn_bias, stride, padding, dilation,
          groups, eps, memory_efficient, transposed, output_padding,
          activation, negative_slope);
    }

    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["transposed"] = transposed;
    ctx->saved_data["output_padding"] = output_padding;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bn_bias"] = present(bn_bias);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    // bn_bias shifts the activation's input, which the backward recomputes;
    // batch norm alone does not need it.
    const bool keeps_bn_bias = activation != "identity" && present(bn_bias);
    ctx->save_for_backward(
        {input, weight, bias.value_or(Variable()),
         bn_weight.value_or(Variable()), conv_output, save_mean, save_invstd,
         count, keeps_bn_bias ? *bn_bias : Variable()});
    variable_list outputs{output, save_mean, save_invstd, conv_output};
    if (count.defined()) {
      outputs.push_back(count);
    }
    ctx->mark_non_differentiable(
        variable_list(outputs.begin() + 1, outputs.end()));
    // Only `output` carries a gradient. Without this, autograd would fill a
    // zero tensor of the conv output's size for conv_output on every
    // backward in save-output mode.
    ctx->set_materialize_grads(false);
    return outputs;
  }

  static variable_list backward(
      AutogradContext* ctx,
      const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor grad_output = grad_or_zeros(ctx, grad_outputs[0], saved[0]);
    if (!grad_output.defined()) {
      return variable_list(kNumInputs);
    }
    const auto output_mask = train_output_mask(
        ctx, saved[2].defined(), saved[3].defined(),
        ctx->saved_data["has_bn_bias"].toBool());
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const auto groups = ctx->saved_data["groups"].toInt();
    const auto eps = ctx->saved_data["eps"].toDouble();
    const auto transposed = ctx->saved_data["transposed"].toBool();
    const auto output_padding =
        ctx->saved_data["output_padding"].toIntVector();
    const std::string activation =
        ctx->saved_data["activation"].toStringRef();
    const double negative_slope =
        ctx->saved_data["negative_slope"].toDouble();
    at::Tensor grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias;
    if (is_synchronized(ctx)) {
      std::tie(grad_input, grad_weight, grad_bias, grad_bn_weight,
               grad_bn_bias) =
          sync_conv_bn_train_backward(
              grad_output, saved[0], saved[1], optional_of(saved[2]),
              optional_of(saved[3]), optional_of(saved[4]), saved[5],
              saved[6], stride, padding, dilation, groups, eps,
              ctx->saved_data["group_name"].toStringRef(),
              ctx->saved_data["group_size"].toInt(),
              saved[7], output_mask, transposed, output_padding,
              optional_of(saved[8]), activation, negative_slope);
    } else {
      std::tie(grad_input, grad_weight, grad_bias, grad_bn_weight,
               grad_bn_bias) =
          conv_bn_train_backward(
              grad_output, saved[0], saved[1], optional_of(saved[2]),
              optional_of(saved[3]), optional_of(saved[4]), saved[5],
              saved[6], stride, padding, dilation, groups, eps, output_mask,
              transposed, output_padding, optional_of(saved[8]), activation,
              negative_slope);
    }
    variable_list grads(kNumInputs);
    grads[0] = grad_input;
    grads[1] = grad_weight;
    grads[2] = grad_bias;
    grads[3] = grad_bn_weight;
    grads[4] = grad_bn_bias;
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_train_autograd(
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
    bool memory_efficient,
    bool transposed,
    at::IntArrayRef output_padding,
    c10::string_view activation,
    double negative_slope) {
  auto result = ConvBNTrainFunction::apply(
      input, weight, bias, bn_weight, bn_bias, stride, padding, dilation,
      groups, eps, memory_efficient, transposed, output_padding, activation,
      negative_slope, std::optional<SyncGroup>());
  return {result[0], result[1], result[2], result[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_train_backward_autograd(
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
    bool transposed,
    at::IntArrayRef output_padding,
    const std::optional<at::Tensor>& bn_bias,
    c10::string_view activation,
    double negative_slope) {
  if (records_graph(grad_output, input, weight, bias, bn_weight, bn_bias)) {
    return differentiable_conv_bn_backward(
        grad_output, input, weight, bias, bn_weight, bn_bias,
        conv_args(stride, padding, dilation, groups, transposed,
                  output_padding),
        eps, output_mask,
        parse_activation(
            "convbn.conv_bn_train_backward", activation, negative_slope));
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return conv_bn_train_backward(
      grad_output, input, weight, bias, bn_weight, conv_output, save_mean,
      save_invstd, stride, padding, dilation, groups, eps, output_mask,
      transposed, output_padding, bn_bias, activation, negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_conv_bn_train_autograd(
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
    bool memory_efficient,
    bool transposed,
    at::IntArrayRef output_padding,
    c10::string_view activation,
    double negative_slope) {
  auto result = ConvBNTrainFunction::apply(
      input, weight, bias, bn_weight, bn_bias, stride, padding, dilation,
      groups, eps, memory_efficient, transposed, output_padding, activation,
      negative_slope,
      std::optional<SyncGroup>(SyncGroup{std::move(group_name), group_size}));
  return {result[0], result[1], result[2], result[3], result[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_conv_bn_train_backward_autograd(
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
    bool transposed,
    at::IntArrayRef output_padding,
    const std::optional<at::Tensor>& bn_bias,
    c10::string_view activation,
    double negative_slope) {
  check_no_double_backward(
      "convbn.sync_conv_bn_train_backward", grad_output, input, weight, bias,
      bn_weight, bn_bias);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return sync_conv_bn_train_backward(
      grad_output, input, weight, bias, bn_weight, conv_output, save_mean,
      save_invstd, stride, padding, dilation, groups, eps,
      std::move(group_name), group_size, count, output_mask, transposed,
      output_padding, bn_bias, activation, negative_slope);
}

} // namespace

// save_mean/save_invstd/conv_output are not used: the statistics are
// recomputed from input, so their dependence on input is differentiated.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
differentiable_conv_bn_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const ConvArgs& conv,
    double eps,
    std::array<bool, 5> output_mask,
    const Activation& act) {
  // Every dimension but the channels' (1).
  std::vector<int64_t> dims{0};
  std::vector<int64_t> per_channel(input.dim(), 1);
  per_channel[1] = -1;
  for (int64_t d = 2; d < input.dim(); ++d) {
    dims.push_back(d);
  }
  const at::Tensor y = at::convolution(
      input, weight, bias, conv.stride, conv.padding, conv.dilation,
      conv.transposed, conv.output_padding, conv.groups);
  const at::Tensor centered = y - y.mean(dims, /*keepdim=*/true);
  const at::Tensor invstd =
      (centered.square().mean(dims, /*keepdim=*/true) + eps).rsqrt();
  const at::Tensor xhat = centered * invstd;
  // The gradient at batch norm's output: grad_output taken back through the
  // activation at its input z = xhat * gamma + beta (ATen's backward ops,
  // differentiable in turn).
  at::Tensor grad_bn_output = grad_output;
  if (!act.is_identity()) {
    at::Tensor z = present(bn_weight) ? xhat * bn_weight->view(per_channel)
                                      : xhat;
    if (present(bn_bias)) {
      z = z + bn_bias->view(per_channel);
    }
    grad_bn_output = activation_backward(grad_output, z, act);
  }

  at::Tensor grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias;
  const auto param_dtype = bn_param_dtype(bn_weight, input);
  if (output_mask[3] && present(bn_weight)) {
    grad_bn_weight = (grad_bn_output * xhat).sum(dims).to(param_dtype);
  }
  if (output_mask[4]) {
    grad_bn_bias = grad_bn_output.sum(dims).to(param_dtype);
  }
  const bool has_bias = present(bias);
  if (output_mask[0] || output_mask[1] || (output_mask[2] && has_bias)) {
    const at::Tensor grad_xhat = present(bn_weight)
        ? grad_bn_output * bn_weight->view(per_channel)
        : grad_bn_output;
    const at::Tensor grad_y = invstd *
        (grad_xhat - grad_xhat.mean(dims, true) -
         xhat * (grad_xhat * xhat).mean(dims, true));
    std::optional<at::IntArrayRef> bias_sizes;
    if (has_bias) {
      bias_sizes = bias->sizes();
    }
    auto grads = at::convolution_backward(
        grad_y.to(input.scalar_type()), input, weight, bias_sizes,
        conv.stride, conv.padding, conv.dilation, conv.transposed,
        conv.output_padding, conv.groups,
        {output_mask[0], output_mask[1], output_mask[2] && has_bias});
    grad_input = std::get<0>(grads);
    grad_weight = std::get<1>(grads);
    grad_bias = std::get<2>(grads);
  }
  return {grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias};
}

TORCH_LIBRARY_IMPL(convbn, Autograd, m) {
  m.impl("conv_bn_train", &conv_bn_train_autograd);
  m.impl("conv_bn_train_backward", &conv_bn_train_backward_autograd);
  m.impl("sync_conv_bn_train", &sync_conv_bn_train_autograd);
  m.impl(
      "sync_conv_bn_train_backward", &sync_conv_bn_train_backward_autograd);
}

} // namespace convbn
