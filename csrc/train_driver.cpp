// The training forward and backward of conv+BN and linear+BN, for any
// device: argument checks, the linear map (ATen: oneDNN/cuDNN convolution,
// BLAS/cuBLAS matmul), the per-channel coefficients, allocation and the
// order of passes. The passes over the data are the device's kernels
// (kernel_table.h): cpu/ and cuda/ each register these functions at their
// dispatch key with their own table.
//
// Batch norm does not care which linear map produced its input, so both ops
// share one forward half (normalize_batch) and one backward half
// (batch_norm_backward), on a 4-D tensor: the conv output as it is, the
// linear output (N, C) as an (N, C, 1, 1) channels_last view.
//
// The synchronized conv+BN ops run the same code with a process group
// (distributed/group_statistics.h): the forward merges the ranks'
// statistics before normalizing, the backward sums the ranks' per-channel
// gradient sums before computing grad_y. A rank's batch may be empty; it
// then takes part in the exchange and contributes nothing.
#include "train_driver.h"

#include "checks.h"
#include "conv_bn_common.h"
#include "distributed/group_statistics.h"

namespace convbn {

namespace {
constexpr const char* kConvTrainOp = "convbn.conv_bn_train";
constexpr const char* kConvBackwardOp = "convbn.conv_bn_train_backward";
constexpr const char* kLinearTrainOp = "convbn.linear_bn_train";
constexpr const char* kLinearBackwardOp = "convbn.linear_bn_train_backward";
constexpr const char* kSyncTrainOp = "convbn.sync_conv_bn_train";
constexpr const char* kSyncBackwardOp = "convbn.sync_conv_bn_train_backward";
constexpr const char* kSyncLinearTrainOp = "convbn.sync_linear_bn_train";
constexpr const char* kSyncLinearBackwardOp =
    "convbn.sync_linear_bn_train_backward";

// A linear map's output (N, C) as the (N, C, 1, 1) tensor the kernels walk,
// with channels_last strides over the same memory: each sample is one row
// of C values, the layout the kernels reduce fastest (NCHW strides would
// make every value a plane of its own).
at::Tensor rows_as_4d(const at::Tensor& y) {
  return y.view({y.size(0), 1, 1, y.size(1)}).permute({0, 3, 1, 2});
}

at::Tensor rows_from_4d(const at::Tensor& y) {
  return y.view({y.size(0), y.size(1)});
}

// Values per channel of a 4-D tensor: all but the channels' dimension.
int64_t values_per_channel(const at::Tensor& y) {
  return y.size(0) * y.size(2) * y.size(3);
}

struct NormalizedBatch {
  at::Tensor output;
  at::Tensor save_mean;
  at::Tensor save_invstd;
  at::Tensor kept_y; // the map's output in save-output mode, else empty
  int64_t count; // values per channel the statistics are over
};

// The forward after the linear map. y is its output without bias: 4-D,
// dense in the input's layout (layout_of), and the caller's to overwrite.
// With a group, the statistics are the group's (the caller checks count).
// The activation is applied in the normalization's pass.
NormalizedBatch normalize_batch(
    const KernelTable& kernels,
    at::Tensor y,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    bool memory_efficient,
    const Activation& act,
    const ProcessGroupRef* group = nullptr) {
  const auto acc_dtype = stats_dtype(y.scalar_type());
  const int64_t channels = y.size(1);
  int64_t count = values_per_channel(y);
  at::Tensor mean = at::empty({channels}, y.options().dtype(acc_dtype));
  at::Tensor var = at::empty_like(mean);
  if (count > 0) {
    kernels.batch_mean_var(y, mean, var);
  } else { // only a synchronized op's rank may have an empty batch
    mean.zero_();
    var.zero_();
  }
  if (group != nullptr) {
    auto merged = gather_batch_statistics(mean, var, count, *group);
    mean = std::move(merged.mean);
    var = std::move(merged.var);
    count = merged.count;
  }
  at::Tensor invstd = (var + eps).rsqrt_();

  const auto coef = normalize_coefficients(mean, invstd, bn_weight, bn_bias);
  // Memory-efficient mode normalizes in place: the map's output is not
  // kept, the backward recomputes it.
  at::Tensor output = memory_efficient ? y : at::empty_like(y);
  if (y.numel() > 0) {
    kernels.channel_affine(
        output, y, coef.scale, coef.mean, coef.shift, nullptr, act);
  }

  at::Tensor save_mean =
      present(bias) ? mean + bias->to(acc_dtype) : std::move(mean);
  at::Tensor kept_y =
      memory_efficient ? at::empty({0}, y.options()) : std::move(y);
  return {output, save_mean, invstd, kept_y, count};
}

struct BatchNormGrads {
  at::Tensor grad_y; // defined when output_mask[0] or output_mask[1]
  at::Tensor grad_bias;
  at::Tensor grad_bn_weight;
  at::Tensor grad_bn_bias;
};

// The backward down to the linear map's output. dy and y are 4-D (see
// as_kernel_4d) in the same memory format; y_is_scratch says y was
// recomputed, so grad_y may overwrite it. count is the number of values per
// channel the statistics were over: y's own, or the group's when group is
// given, whose ranks then sum their per-channel gradient sums. With an
// activation, dy is first taken back through it (activation_grad, from y
// and the forward's coefficients, which need bn_bias): the rest of the
// backward is batch norm's, on that gradient.
BatchNormGrads batch_norm_backward(
    const KernelTable& kernels,
    const at::Tensor& output_grad,
    at::Tensor y,
    bool y_is_scratch,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& input,
    std::array<bool, 5> output_mask,
    int64_t count,
    const Activation& act,
    const ProcessGroupRef* group = nullptr) {
  const int64_t channels = y.size(1);
  const auto acc_dtype = stats_dtype(y.scalar_type());
  const at::Tensor mean = mean_without_conv_bias(save_mean, bias, acc_dtype);
  const at::Tensor invstd = save_invstd.to(acc_dtype).contiguous();
  // The gradient at batch norm's output: the activation's input gradient,
  // in a buffer of its own (output_grad is the caller's), which grad_y
  // then overwrites.
  at::Tensor dy = output_grad;
  bool dy_is_scratch = false;
  if (!act.is_identity()) {
    const auto coef = normalize_coefficients(mean, invstd, bn_weight, bn_bias);
    dy = at::empty_like(y);
    if (y.numel() > 0) {
      kernels.activation_grad(
          dy, output_grad, y, coef.scale, coef.mean, coef.shift, act);
    }
    dy_is_scratch = true;
  }
  at::Tensor sum_dy = at::empty({channels}, y.options().dtype(acc_dtype));
  at::Tensor sum_dy_xmu = at::empty_like(sum_dy);
  if (y.numel() > 0) {
    kernels.batch_grad_sums(dy, y, mean, sum_dy, sum_dy_xmu);
  } else {
    sum_dy.zero_();
    sum_dy_xmu.zero_();
  }

  BatchNormGrads grads;
  const auto param_dtype = bn_param_dtype(bn_weight, input);
  if (output_mask[3] && present(bn_weight)) {
    grads.grad_bn_weight = (sum_dy_xmu * invstd).to(param_dtype);
  }
  if (output_mask[4]) {
    grads.grad_bn_bias = sum_dy.to(param_dtype);
  }
  if (output_mask[2] && present(bias)) {
    // Batch norm subtracts the batch mean, which absorbs any per-channel
    // constant: the output does not depend on the conv/linear bias at all.
    grads.grad_bias = at::zeros_like(*bias);
  }
  if (group != nullptr) {
    // After the parameters' gradients: those stay this rank's own. Every
    // rank takes part whatever its output_mask, so none waits alone.
    auto summed = all_reduce_grad_sums(sum_dy, sum_dy_xmu, *group);
    sum_dy = std::move(summed.sum_dy);
    sum_dy_xmu = std::move(summed.sum_dy_xmu);
  }
  if (output_mask[0] || output_mask[1]) {
    const auto coef =
        grad_y_coefficients(sum_dy, sum_dy_xmu, invstd, bn_weight, count);
    at::Tensor grad_y =
        y_is_scratch ? y : (dy_is_scratch ? dy : at::empty_like(y));
    if (y.numel() > 0) {
      const CenteredTerm centered{y, coef.b, mean};
      kernels.channel_affine(
          grad_y, dy, coef.a, coef.mu, coef.c, &centered, Activation{});
    }
    grads.grad_y = std::move(grad_y);
  }
  return grads;
}

// A tensor of the output's size that the kernels read beside input
// (grad_output, a kept conv/linear output): its shape, dtype and device.
void check_output_sized(
    const char* op,
    const char* name,
    const at::Tensor& t,
    c10::ArrayRef<c10::SymInt> out_sizes,
    const at::Tensor& input) {
  TORCH_CHECK(
      t.sym_sizes() == out_sizes,
      op, ": `", name, "` has shape ", t.sym_sizes(),
      " but the output has shape ", out_sizes);
  TORCH_CHECK(
      t.scalar_type() == input.scalar_type(),
      op, ": `", name, "` has dtype ", t.scalar_type(),
      " but `input` has dtype ", input.scalar_type());
  check_same_device(op, name, t, input);
}

// A kept map output (save-output mode) or nothing (memory-efficient mode,
// or a caller that passes none): the backward then recomputes it.
bool needs_recompute(const std::optional<at::Tensor>& kept_output) {
  return !present(kept_output) || kept_output->numel() == 0;
}

// What every backward op checks before it computes anything: grad_output,
// the saved statistics and, when one is passed, the kept map output
// (`kept_name`: conv_output or linear_output).
void check_backward_args(
    const char* op,
    const at::Tensor& grad_output,
    c10::ArrayRef<c10::SymInt> out_sizes,
    const at::Tensor& input,
    int64_t channels,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    const char* kept_name,
    const std::optional<at::Tensor>& kept_output) {
  check_channel_vector(op, "save_mean", save_mean, channels, input);
  check_channel_vector(op, "save_invstd", save_invstd, channels, input);
  check_output_sized(op, "grad_output", grad_output, out_sizes, input);
  if (!needs_recompute(kept_output)) {
    check_output_sized(op, kept_name, *kept_output, out_sizes, input);
  }
}

// The group of a synchronized op, checked.
ProcessGroupRef group_of(
    const char* op,
    const std::string& group_name,
    int64_t group_size) {
  TORCH_CHECK(
      group_size >= 1, op, ": `group_size` must be the number of ranks in "
      "the process group (at least 1), got ", group_size);
  TORCH_CHECK(
      !group_name.empty(), op, ": `group_name` is empty; pass the process "
      "group's name (ProcessGroup.group_name)");
  return {group_name, group_size};
}

// The group's values per channel, as the synchronized forward returned it.
int64_t count_of(const char* op, const at::Tensor& count) {
  TORCH_CHECK(
      count.numel() == 1 && !at::isFloatingType(count.scalar_type()) &&
          !count.is_complex(),
      op, ": `count` must be the one-element integer tensor the forward "
      "returned, got ", count.scalar_type(), " of shape ", count.sizes());
  return count.item<int64_t>();
}

// What a synchronized forward checks once the exchange gave the group's
// count. Every rank has the same count, so every rank raises alike and none
// is left waiting.
void check_group_count(
    const at::Tensor& input,
    int64_t count,
    const ProcessGroupRef& group) {
  // ValueError in Python, as nn.BatchNorm raises it.
  TORCH_CHECK_VALUE(
      count > 1,
      "Expected more than 1 value per channel when training, got ", count,
      " over the ", group.size, " processes of the group (this process has "
      "input size ", input.sizes(), "); use larger batches, or call .eval()");
}

// What a synchronized backward checks of the count it is given: the
// statistics were over at least this process's values, and more than one.
void check_backward_count(const char* op, int64_t count, int64_t local) {
  TORCH_CHECK(
      count >= local && count > 1,
      op, ": `count` (", count, ") must be the number of values per channel "
      "over the whole group, which the forward returned: more than 1 and at "
      "least this process's ", local);
}

// conv_bn_train, and with a group sync_conv_bn_train.
NormalizedBatch conv_bn_forward(
    const char* op,
    const KernelTable& kernels,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const ConvArgs& conv,
    double eps,
    bool memory_efficient,
    const Activation& act,
    const ProcessGroupRef* group) {
  const auto out_sizes = check_conv_bn_args(
      op, input, weight, bias, bn_weight, bn_bias, conv, eps);
  if (group == nullptr) {
    check_batch_statistics_possible(op, input, out_sizes);
  }
  const at::Tensor y = conv_without_bias(input, weight, conv);
  auto result = normalize_batch(
      kernels, as_kernel_4d(y), bias, bn_weight, bn_bias, eps,
      memory_efficient, act, group);
  if (group != nullptr) {
    check_group_count(input, result.count, *group);
  }
  result.output = from_kernel_4d(result.output, y);
  if (!memory_efficient) {
    result.kept_y = y;
  }
  return result;
}

// conv_bn_train_backward, and with a group sync_conv_bn_train_backward;
// count is the number of values per channel the statistics were over.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_backward(
    const char* op,
    const KernelTable& kernels,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& conv_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    const ConvArgs& conv,
    double eps,
    std::array<bool, 5> output_mask,
    const std::optional<at::Tensor>& bn_bias,
    const Activation& act,
    const ProcessGroupRef* group,
    std::optional<int64_t> group_count) {
  // eps is in save_invstd already; the differentiable (double backward)
  // path in autograd/ needs it to recompute the statistics.
  const auto out_sizes = check_conv_bn_args(
      op, input, weight, bias, bn_weight, bn_bias, conv, eps);
  check_backward_args(
      op, grad_output, out_sizes, input, conv_out_channels(weight, conv),
      save_mean, save_invstd, "conv_output", conv_output);

  const auto fmt = layout_of(input);
  const bool recompute = needs_recompute(conv_output);
  const at::Tensor y = recompute ? conv_without_bias(input, weight, conv)
                                 : conv_output->contiguous(fmt);
  const at::Tensor y4 = as_kernel_4d(y);
  const int64_t count = group_count.value_or(values_per_channel(y4));
  if (group_count.has_value()) {
    check_backward_count(op, count, values_per_channel(y4));
  }
  auto bn = batch_norm_backward(
      kernels, as_kernel_4d(grad_output.contiguous(fmt)), y4, recompute,
      save_mean, save_invstd, bias, bn_weight, bn_bias, input, output_mask,
      count, act, group);

  at::Tensor grad_input, grad_weight;
  if (output_mask[0] || output_mask[1]) {
    auto grads = at::convolution_backward(
        from_kernel_4d(bn.grad_y, y), input, weight,
        /*bias_sizes=*/std::nullopt, conv.stride, conv.padding, conv.dilation,
        conv.transposed, conv.output_padding, conv.groups,
        {output_mask[0], output_mask[1], false});
    if (output_mask[0]) {
      grad_input = std::get<0>(grads).contiguous(fmt);
    }
    if (output_mask[1]) {
      grad_weight = std::get<1>(grads).contiguous(layout_of(weight));
    }
  }
  return {grad_input, grad_weight, bn.grad_bias, bn.grad_bn_weight,
          bn.grad_bn_bias};
}

// linear_bn_train, and with a group sync_linear_bn_train.
NormalizedBatch linear_bn_forward(
    const char* op,
    const KernelTable& kernels,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    bool memory_efficient,
    const ProcessGroupRef* group) {
  const auto out_sizes = check_linear_bn_args(
      op, input, weight, bias, bn_weight, bn_bias, eps);
  if (group == nullptr) {
    check_batch_statistics_possible(op, input, out_sizes);
  }
  // at::mm gives a fresh contiguous (N, C) tensor the kernels may overwrite.
  auto result = normalize_batch(
      kernels, rows_as_4d(at::mm(input, weight.t())), bias, bn_weight,
      bn_bias, eps, memory_efficient, Activation{}, group);
  if (group != nullptr) {
    check_group_count(input, result.count, *group);
  }
  result.output = rows_from_4d(result.output);
  if (!memory_efficient) {
    result.kept_y = rows_from_4d(result.kept_y);
  }
  return result;
}

// linear_bn_train_backward, and with a group sync_linear_bn_train_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_bn_backward(
    const char* op,
    const KernelTable& kernels,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& linear_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    double eps,
    std::array<bool, 5> output_mask,
    const ProcessGroupRef* group,
    std::optional<int64_t> group_count) {
  const auto out_sizes = check_linear_bn_args(
      op, input, weight, bias, bn_weight, std::nullopt, eps);
  check_backward_args(
      op, grad_output, out_sizes, input, weight.size(0), save_mean,
      save_invstd, "linear_output", linear_output);

  const bool recompute = needs_recompute(linear_output);
  const at::Tensor y =
      recompute ? at::mm(input, weight.t()) : linear_output->contiguous();
  const int64_t count = group_count.value_or(y.size(0));
  if (group_count.has_value()) {
    check_backward_count(op, count, y.size(0));
  }
  auto bn = batch_norm_backward(
      kernels, rows_as_4d(grad_output.contiguous()), rows_as_4d(y), recompute,
      save_mean, save_invstd, bias, bn_weight, std::nullopt, input,
      output_mask, count, Activation{}, group);

  at::Tensor grad_input, grad_weight;
  if (output_mask[0] || output_mask[1]) {
    const at::Tensor grad_y = rows_from_4d(bn.grad_y);
    if (output_mask[0]) {
      grad_input = at::mm(grad_y, weight);
    }
    if (output_mask[1]) {
      grad_weight = at::mm(grad_y.t(), input);
    }
  }
  return {grad_input, grad_weight, bn.grad_bias, bn.grad_bn_weight,
          bn.grad_bn_bias};
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train_forward(
    const KernelTable& kernels,
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
  auto result = conv_bn_forward(
      kConvTrainOp, kernels, input, weight, bias, bn_weight, bn_bias,
      conv_args(stride, padding, dilation, groups, transposed, output_padding),
      eps, memory_efficient,
      parse_activation(kConvTrainOp, activation, negative_slope), nullptr);
  return {result.output, result.save_mean, result.save_invstd, result.kept_y};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_train_backward_impl(
    const KernelTable& kernels,
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
  return conv_bn_backward(
      kConvBackwardOp, kernels, grad_output, input, weight, bias, bn_weight,
      conv_output, save_mean, save_invstd,
      conv_args(stride, padding, dilation, groups, transposed, output_padding),
      eps, output_mask, bn_bias,
      parse_activation(kConvBackwardOp, activation, negative_slope), nullptr,
      std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_conv_bn_train_forward(
    const KernelTable& kernels,
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
    const std::string& group_name,
    int64_t group_size,
    bool memory_efficient,
    bool transposed,
    at::IntArrayRef output_padding,
    c10::string_view activation,
    double negative_slope) {
  const auto group = group_of(kSyncTrainOp, group_name, group_size);
  auto result = conv_bn_forward(
      kSyncTrainOp, kernels, input, weight, bias, bn_weight, bn_bias,
      conv_args(stride, padding, dilation, groups, transposed, output_padding),
      eps, memory_efficient,
      parse_activation(kSyncTrainOp, activation, negative_slope), &group);
  return {result.output, result.save_mean, result.save_invstd, result.kept_y,
          at::scalar_tensor(result.count, at::kLong)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_conv_bn_train_backward_impl(
    const KernelTable& kernels,
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
    const std::string& group_name,
    int64_t group_size,
    const at::Tensor& count,
    std::array<bool, 5> output_mask,
    bool transposed,
    at::IntArrayRef output_padding,
    const std::optional<at::Tensor>& bn_bias,
    c10::string_view activation,
    double negative_slope) {
  const auto group = group_of(kSyncBackwardOp, group_name, group_size);
  return conv_bn_backward(
      kSyncBackwardOp, kernels, grad_output, input, weight, bias, bn_weight,
      conv_output, save_mean, save_invstd,
      conv_args(stride, padding, dilation, groups, transposed, output_padding),
      eps, output_mask, bn_bias,
      parse_activation(kSyncBackwardOp, activation, negative_slope), &group,
      count_of(kSyncBackwardOp, count));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_bn_train_forward(
    const KernelTable& kernels,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    bool memory_efficient) {
  auto result = linear_bn_forward(
      kLinearTrainOp, kernels, input, weight, bias, bn_weight, bn_bias, eps,
      memory_efficient, nullptr);
  return {result.output, result.save_mean, result.save_invstd, result.kept_y};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_bn_train_backward_impl(
    const KernelTable& kernels,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& linear_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    double eps,
    std::array<bool, 5> output_mask) {
  return linear_bn_backward(
      kLinearBackwardOp, kernels, grad_output, input, weight, bias, bn_weight,
      linear_output, save_mean, save_invstd, eps, output_mask, nullptr,
      std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_linear_bn_train_forward(
    const KernelTable& kernels,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps,
    const std::string& group_name,
    int64_t group_size,
    bool memory_efficient) {
  const auto group = group_of(kSyncLinearTrainOp, group_name, group_size);
  auto result = linear_bn_forward(
      kSyncLinearTrainOp, kernels, input, weight, bias, bn_weight, bn_bias,
      eps, memory_efficient, &group);
  return {result.output, result.save_mean, result.save_invstd, result.kept_y,
          at::scalar_tensor(result.count, at::kLong)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sync_linear_bn_train_backward_impl(
    const KernelTable& kernels,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& linear_output,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    double eps,
    const std::string& group_name,
    int64_t group_size,
    const at::Tensor& count,
    std::array<bool, 5> output_mask) {
  const auto group = group_of(kSyncLinearBackwardOp, group_name, group_size);
  return linear_bn_backward(
      kSyncLinearBackwardOp, kernels, grad_output, input, weight, bias,
      bn_weight, linear_output, save_mean, save_invstd, eps, output_mask,
      &group, count_of(kSyncLinearBackwardOp, count));
}

} // namespace convbn
