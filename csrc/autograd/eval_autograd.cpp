// Autograd for conv_bn_eval and linear_bn_eval: batch norm frozen at its
// running statistics while the weights train (a backbone fine-tuned with the
// model in eval mode, as detection and segmentation models are; Inductor's
// and mmcv's "efficient_conv_bn_eval").
//
// The operators are CompositeImplicitAutograd (the fold, then one conv or
// matmul), and differentiated as such the conv's node would keep the folded
// weight: a second copy of every weight, kept until backward. This node
// keeps only what the operator was given (input, weights and per-channel
// vectors) and folds again in backward, a per-channel scale that costs
// little next to the conv. Its forward runs the composite's ATen ops, and
// the operators keep their CompositeImplicitAutograd kernel for every other
// key, so tensor subclasses, fake tensors, torch.export and
// run_decompositions see the fold and one aten.convolution as before.
//
// The backward is written with differentiable ATen ops (convolution_backward
// has a derivative of its own), so it is differentiable in turn: double
// backward works without a node of its own. Forward-mode AD, which the node
// does not implement, differentiates the composite as written.
#include "train_autograd_common.h"

#include "../activation.h"
#include "../checks.h"
#include "../composite/fold_and_eval.h"
#include "../conv_bn_common.h"
#include "../convbn.h"

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <initializer_list>
#include <vector>

namespace convbn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

enum EvalInput { kInput, kWeight, kBias, kBnWeight, kBnBias, kMean, kVar };

// Saves what the backward refolds from: input, weight, bias, bn_weight and
// the running statistics (bn_bias only shifts the folded bias, so only its
// presence is kept, unless keeps_bn_bias: a fused activation's input, which
// the backward recomputes, depends on it). The statistics are buffers that a training-mode call
// of the same layer updates in place, and may be inference tensors: unless
// they are differentiated, the node keeps what it needs of them (a copy of
// the mean and 1 / sqrt(var + eps), per channel) instead of the buffers.
void save_eval_inputs(
    AutogradContext* ctx,
    const Variable& input,
    const Variable& weight,
    const std::optional<Variable>& bias,
    const std::optional<Variable>& bn_weight,
    const std::optional<Variable>& bn_bias,
    const Variable& running_mean,
    const Variable& running_var,
    double eps,
    bool keeps_bn_bias = false) {
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["has_bn_bias"] = present(bn_bias);
  if (present(bn_bias)) {
    ctx->saved_data["bn_bias_dtype"] =
        static_cast<int64_t>(bn_bias->scalar_type());
  }
  const bool statistics_differentiable =
      running_mean.requires_grad() || running_var.requires_grad();
  ctx->saved_data["statistics_differentiable"] = statistics_differentiable;
  at::Tensor mean = running_mean, var_or_inv_std = running_var;
  if (!statistics_differentiable) {
    const auto dtype = fold_dtype(weight, running_var);
    mean = running_mean.to(dtype, /*non_blocking=*/false, /*copy=*/true);
    var_or_inv_std = fold_inv_std(running_var, dtype, eps);
  }
  ctx->save_for_backward(
      {input, weight, bias.value_or(Variable()), bn_weight.value_or(Variable()),
       mean, var_or_inv_std,
       keeps_bn_bias && present(bn_bias) ? *bn_bias : Variable()});
}

std::optional<at::ScalarType> saved_bn_bias_dtype(AutogradContext* ctx) {
  if (!ctx->saved_data["has_bn_bias"].toBool()) {
    return std::nullopt;
  }
  return static_cast<at::ScalarType>(ctx->saved_data["bn_bias_dtype"].toInt());
}

// The fold of fold_and_eval.cpp (W' = W * s, b' = (b - mean) * s + beta,
// s = gamma / sqrt(var + eps)), kept in its parts for the chain rule.
struct Fold {
  at::ScalarType dtype;   // float32, or float64 for float64 data
  at::Tensor inv_std;     // 1 / sqrt(running_var + eps)
  at::Tensor scale;       // inv_std * bn_weight
  at::Tensor weight;      // W', in the weight's dtype
};

// The fold from 1 / sqrt(running_var + eps) in the fold's dtype.
Fold refold(
    const at::Tensor& weight,
    const at::Tensor& bn_weight,
    const at::Tensor& inv_std,
    OutputChannels where) {
  Fold fold;
  fold.dtype = inv_std.scalar_type();
  fold.inv_std = inv_std;
  fold.scale = bn_weight.defined() ? fold.inv_std * bn_weight.to(fold.dtype)
                                   : fold.inv_std;
  fold.weight = scale_output_channels(weight, fold.scale, where);
  return fold;
}

// What a backward starts from: the saved inputs, which of them need a
// gradient, and the fold recomputed from them.
struct SavedEval {
  // running_mean: the buffer, or its copy in the fold's dtype; running_var:
  // the buffer where the statistics are differentiated, else undefined.
  at::Tensor input, weight, bias, bn_weight, running_mean, running_var;
  at::Tensor bn_bias; // kept for an activation, else undefined
  std::array<bool, 7> needs;
  OutputChannels where; // of a conv weight; a linear one's are dimension 0
  Fold fold;

  bool needs_folded_weight_grad() const {
    return needs[kWeight] || needs[kBnWeight] || needs[kVar];
  }
  bool needs_folded_bias_grad() const {
    return needs[kBias] || needs[kBnWeight] || needs[kBnBias] ||
        needs[kMean] || needs[kVar];
  }
};

SavedEval unpack_saved(AutogradContext* ctx) {
  const auto saved = ctx->get_saved_variables();
  SavedEval s{saved[0], saved[1], saved[2], saved[3], saved[4], at::Tensor(),
              saved[6], {}, {}, {}};
  if (ctx->saved_data.count("transposed") > 0) {
    s.where = {ctx->saved_data["transposed"].toBool(),
               ctx->saved_data["groups"].toInt()};
  }
  // (input, weight, bias, bn_weight, bn_bias, running_mean, running_var)
  s.needs = needs_grad_of_passed<7>(
      ctx, {true, true, s.bias.defined(), s.bn_weight.defined(),
            ctx->saved_data["has_bn_bias"].toBool(), true, true});
  at::Tensor inv_std;
  if (ctx->saved_data["statistics_differentiable"].toBool()) {
    // Recomputed from running_var, so that its gradient flows.
    s.running_var = saved[5];
    inv_std = fold_inv_std(
        s.running_var, fold_dtype(s.weight, s.running_var),
        ctx->saved_data["eps"].toDouble());
  } else {
    inv_std = saved[5];
  }
  s.fold = refold(s.weight, s.bn_weight, inv_std, s.where);
  return s;
}

// grads[weight..running_var], the gradients of the operator's inputs
// other than `input`, from those of the folded weight and bias (each in the
// fold's dtype, or undefined when not needed).
void chain_through_fold(
    AutogradContext* ctx,
    const SavedEval& s,
    const at::Tensor& grad_folded_weight,
    const at::Tensor& grad_folded_bias,
    variable_list& grads) {
  const Fold& fold = s.fold;
  const auto& needs = s.needs;
  const at::Tensor &weight = s.weight, &bias = s.bias,
                   &bn_weight = s.bn_weight, &running_mean = s.running_mean,
                   &running_var = s.running_var;
  const auto bn_bias_dtype = saved_bn_bias_dtype(ctx);
  if (needs[kWeight]) {
    grads[kWeight] =
        scale_output_channels(grad_folded_weight, fold.scale, s.where)
            .to(weight.scalar_type());
  }
  if (needs[kBias]) {
    grads[kBias] = (grad_folded_bias * fold.scale).to(bias.scalar_type());
  }
  if (needs[kBnBias] && bn_bias_dtype.has_value()) {
    grads[kBnBias] = grad_folded_bias.to(*bn_bias_dtype);
  }
  if (needs[kMean]) {
    grads[kMean] =
        (-grad_folded_bias * fold.scale).to(running_mean.scalar_type());
  }
  if (needs[kBnWeight] || needs[kVar]) {
    // d/d scale of W' = W * s and b' = (b - mean) * s + beta, per channel.
    const at::Tensor grad_scale =
        sum_per_output_channel(
            grad_folded_weight * weight.to(fold.dtype), s.where) +
        grad_folded_bias *
            centered_bias(optional_of(bias), running_mean, fold.dtype);
    if (needs[kBnWeight]) {
      grads[kBnWeight] =
          (grad_scale * fold.inv_std).to(bn_weight.scalar_type());
    }
    if (needs[kVar]) {
      // d inv_std / d var = -inv_std^3 / 2.
      const at::Tensor grad_inv_std = bn_weight.defined()
          ? grad_scale * bn_weight.to(fold.dtype)
          : grad_scale;
      grads[kVar] = (grad_inv_std * fold.inv_std.pow(3) * -0.5)
                        .to(running_var.scalar_type());
    }
  }
}

class ConvBNEvalFunction
    : public torch::autograd::Function<ConvBNEvalFunction> {
 public:
  static Variable forward(
      AutogradContext* ctx,
      const Variable& input,
      const Variable& weight,
      const std::optional<Variable>& bias,
      const std::optional<Variable>& bn_weight,
      const std::optional<Variable>& bn_bias,
      const Variable& running_mean,
      const Variable& running_var,
      at::IntArrayRef stride,
      at::IntArrayRef padding,
      at::IntArrayRef dilation,
      int64_t groups,
      double eps,
      bool transposed,
      at::IntArrayRef output_padding,
      c10::string_view activation,
      double negative_slope) {
    // The composite's ATen ops, with grad mode off (as in any forward):
    // they record nothing, and a tensor subclass sees them as ATen ops.
    at::Tensor output = conv_bn_eval_composite(
        input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
        stride, padding, dilation, groups, eps, transposed, output_padding,
        activation, negative_slope);
    const ConvArgs conv = conv_args(
        stride, padding, dilation, groups, transposed, output_padding);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["transposed"] = transposed;
    ctx->saved_data["output_padding"] = conv.output_padding;
    save_eval_inputs(
        ctx, input, weight, bias, bn_weight, bn_bias, running_mean,
        running_var, eps, /*keeps_bn_bias=*/activation != "identity");
    return output;
  }

  static variable_list backward(
      AutogradContext* ctx,
      const variable_list& grad_outputs) {
    constexpr size_t kNumInputs = 16;
    const at::Tensor& grad_output = grad_outputs[0];
    variable_list grads(kNumInputs);
    if (!grad_output.defined()) {
      return grads;
    }
    const SavedEval s = unpack_saved(ctx);
    const int64_t out_channels =
        conv_out_channels(s.weight, s.where.transposed, s.where.groups);
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const auto output_padding =
        ctx->saved_data["output_padding"].toIntVector();
    const Activation act = parse_activation(
        "convbn.conv_bn_eval", ctx->saved_data["activation"].toStringRef(),
        ctx->saved_data["negative_slope"].toDouble());
    // The gradient at the conv's output: through the activation at its
    // input, the folded conv's output, recomputed (the node keeps no
    // output-sized tensor).
    at::Tensor grad_conv_output = grad_output;
    if (!act.is_identity()) {
      const at::Tensor folded_bias =
          fold_bias(
              optional_of(s.bias), s.running_mean, s.fold.scale,
              optional_of(s.bn_bias))
              .to(s.weight.scalar_type());
      const at::Tensor z = at::convolution(
          s.input, s.fold.weight, folded_bias, stride, padding, dilation,
          s.where.transposed, output_padding, s.where.groups);
      grad_conv_output = activation_backward(grad_output, z, act);
    }
    auto [grad_input, grad_folded_weight, grad_folded_bias] =
        at::convolution_backward(
            grad_conv_output, s.input, s.fold.weight,
            at::OptionalIntArrayRef(at::IntArrayRef(out_channels)), stride,
            padding, dilation, s.where.transposed, output_padding,
            s.where.groups,
            {s.needs[kInput], s.needs_folded_weight_grad(),
             s.needs_folded_bias_grad()});
    grads[kInput] = grad_input;
    chain_through_fold(
        ctx, s,
        s.needs_folded_weight_grad() ? grad_folded_weight.to(s.fold.dtype)
                                     : at::Tensor(),
        s.needs_folded_bias_grad() ? grad_folded_bias.to(s.fold.dtype)
                                   : at::Tensor(),
        grads);
    return grads;
  }
};

class LinearBNEvalFunction
    : public torch::autograd::Function<LinearBNEvalFunction> {
 public:
  static Variable forward(
      AutogradContext* ctx,
      const Variable& input,
      const Variable& weight,
      const std::optional<Variable>& bias,
      const std::optional<Variable>& bn_weight,
      const std::optional<Variable>& bn_bias,
      const Variable& running_mean,
      const Variable& running_var,
      double eps) {
    at::Tensor output = linear_bn_eval_composite(
        input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
        eps);
    save_eval_inputs(
        ctx, input, weight, bias, bn_weight, bn_bias, running_mean,
        running_var, eps);
    return output;
  }

  static variable_list backward(
      AutogradContext* ctx,
      const variable_list& grad_outputs) {
    constexpr size_t kNumInputs = 8;
    const at::Tensor& grad_output = grad_outputs[0];
    variable_list grads(kNumInputs);
    if (!grad_output.defined()) {
      return grads;
    }
    const SavedEval s = unpack_saved(ctx);
    // output = input @ W'^T + b', input (N, in_features).
    if (s.needs[kInput]) {
      grads[kInput] = grad_output.mm(s.fold.weight);
    }
    chain_through_fold(
        ctx, s,
        s.needs_folded_weight_grad()
            ? grad_output.t().mm(s.input).to(s.fold.dtype)
            : at::Tensor(),
        s.needs_folded_bias_grad() ? grad_output.sum(0).to(s.fold.dtype)
                                   : at::Tensor(),
        grads);
    return grads;
  }
};

// Whether a call goes through this file's node. Otherwise the composite
// runs here as written: it records nothing when nothing requires grad, and
// autograd differentiates its ATen ops under forward-mode AD (dual tensors)
// and torch.func's transforms, which the node does not support.
bool uses_node(std::initializer_list<const at::Tensor*> tensors) {
  // torch.func's transforms (grad, vjp, jvp, vmap) include this key while
  // any of them runs.
  if (c10::impl::tls_is_dispatch_key_included(
          c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) {
    return false;
  }
  bool requires_grad = false;
  for (const at::Tensor* t : tensors) {
    if (t->defined()) {
      if (t->_fw_grad(/*level=*/0).defined()) {
        return false;
      }
      requires_grad = requires_grad || t->requires_grad();
    }
  }
  return requires_grad && at::GradMode::is_enabled();
}

const at::Tensor& or_undefined(const std::optional<at::Tensor>& t) {
  static const at::Tensor undefined;
  return t.has_value() ? *t : undefined;
}

at::Tensor conv_bn_eval_autograd(
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
    bool transposed,
    at::IntArrayRef output_padding,
    c10::string_view activation,
    double negative_slope) {
  if (!uses_node(
          {&input, &weight, &or_undefined(bias), &or_undefined(bn_weight),
           &or_undefined(bn_bias), &running_mean, &running_var})) {
    return conv_bn_eval_composite(
        input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
        stride, padding, dilation, groups, eps, transposed, output_padding,
        activation, negative_slope);
  }
  return ConvBNEvalFunction::apply(
      input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
      stride, padding, dilation, groups, eps, transposed, output_padding,
      activation, negative_slope);
}

at::Tensor linear_bn_eval_autograd(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps) {
  if (!uses_node(
          {&input, &weight, &or_undefined(bias), &or_undefined(bn_weight),
           &or_undefined(bn_bias), &running_mean, &running_var})) {
    return linear_bn_eval_composite(
        input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
        eps);
  }
  return LinearBNEvalFunction::apply(
      input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps);
}

} // namespace

// At AutogradCPU and AutogradCUDA, not the Autograd alias: for a device
// without a kernel of its own the dispatcher prefers an operator's
// CompositeImplicitAutograd kernel to an Autograd alias one, and a CPU or
// CUDA kernel would keep torch.export's run_decompositions from expanding
// the operators into the fold and one aten.convolution.
TORCH_LIBRARY_IMPL(convbn, AutogradCPU, m) {
  m.impl("conv_bn_eval", &conv_bn_eval_autograd);
  m.impl("linear_bn_eval", &linear_bn_eval_autograd);
}

TORCH_LIBRARY_IMPL(convbn, AutogradCUDA, m) {
  m.impl("conv_bn_eval", &conv_bn_eval_autograd);
  m.impl("linear_bn_eval", &linear_bn_eval_autograd);
}

} // namespace convbn
