#include "checks.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace convbn {

void check_same_device(
    const char* op,
    const char* name,
    const at::Tensor& t,
    const at::Tensor& input) {
  TORCH_CHECK(
      t.device() == input.device(),
      op, ": `", name, "` is on ", t.device(), " but `input` is on ",
      input.device(), "; move them to the same device");
}

namespace {

void check_optional_channel_param(
    const char* op,
    const char* name,
    const std::optional<at::Tensor>& t,
    int64_t channels,
    const at::Tensor& input,
    bool allow_float32_for_reduced_input) {
  if (!t.has_value() || !t->defined()) {
    return;
  }
  TORCH_CHECK(
      t->dim() == 1 && t->size(0) == channels,
      op, ": expected `", name, "` to be a 1-D tensor with one value per "
      "output channel (", channels, " values, weight.size(0)), "
      "but got shape ", t->sizes());
  check_same_device(op, name, *t, input);
  const bool same_dtype = t->scalar_type() == input.scalar_type();
  const bool mixed_ok = allow_float32_for_reduced_input &&
      at::isReducedFloatingType(input.scalar_type()) &&
      t->scalar_type() == at::kFloat;
  TORCH_CHECK(
      same_dtype || mixed_ok,
      op, ": `", name, "` has dtype ", t->scalar_type(), " but `input` has "
      "dtype ", input.scalar_type(), "; convert it with .to(",
      input.scalar_type(), ")",
      allow_float32_for_reduced_input
          ? " (float32 is also accepted for float16/bfloat16 input)"
          : "");
}

// The bias of the conv or linear map: one value per output channel, with
// weight's dtype.
void check_conv_bias(
    const char* op,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& weight,
    int64_t out_channels,
    const at::Tensor& input) {
  if (!bias.has_value() || !bias->defined()) {
    return;
  }
  TORCH_CHECK(
      bias->dim() == 1 && bias->size(0) == out_channels,
      op, ": expected `bias` (the conv/linear bias) to be a 1-D tensor with ",
      out_channels, " values, but got shape ", bias->sizes());
  TORCH_CHECK(
      bias->scalar_type() == weight.scalar_type(),
      op, ": `bias` has dtype ", bias->scalar_type(), " but `weight` has "
      "dtype ", weight.scalar_type(), "; convert it with .to(",
      weight.scalar_type(), ")");
  check_same_device(op, "bias", *bias, input);
}

// Floating-point input, and a weight of its dtype on its device: what the
// conv and linear ops both ask of their data.
void check_data_types(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& weight) {
  TORCH_CHECK(
      at::isFloatingType(input.scalar_type()),
      op, ": `input` must be floating point (float32, float64, bfloat16 or "
      "float16), got ", input.scalar_type(), "; convert it with "
      "input.float()");
  TORCH_CHECK(
      weight.scalar_type() == input.scalar_type(),
      op, ": `weight` has dtype ", weight.scalar_type(), " but `input` has "
      "dtype ", input.scalar_type(), "; convert one of them (e.g. "
      "input.to(weight.dtype)) or run under torch.autocast");
  check_same_device(op, "weight", weight, input);
}

// One value per spatial dimension.
void check_per_dim(
    const char* op,
    const char* name,
    at::IntArrayRef v,
    int64_t spatial) {
  static const char* const kDims[] = {
      "", "(length)", "(height, width)", "(depth, height, width)"};
  TORCH_CHECK(
      static_cast<int64_t>(v.size()) == spatial,
      op, ": expected `", name, "` to have ", spatial, " value",
      spatial == 1 ? " " : "s ", kDims[spatial], ", one per spatial "
      "dimension of the ", spatial + 2, "-D input, got ", v.size(),
      " values ", v);
}

const char* input_shape(int64_t dim) {
  switch (dim) {
    case 3: return "(N, C, L)";
    case 5: return "(N, C, D, H, W)";
    default: return "(N, C, H, W)";
  }
}

} // namespace

void check_eps(const char* op, double eps) {
  TORCH_CHECK(
      std::isfinite(eps) && eps > 0,
      op, ": `eps` must be a positive finite number, got ", eps);
}

at::ScalarType stats_dtype(at::ScalarType data_dtype) {
  return at::isReducedFloatingType(data_dtype) ? at::kFloat : data_dtype;
}

ConvArgs conv_args(
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool transposed,
    at::IntArrayRef output_padding) {
  ConvArgs conv{stride.vec(), padding.vec(), dilation.vec(), groups,
                transposed, output_padding.vec()};
  if (conv.output_padding.empty()) {
    conv.output_padding.assign(conv.stride.size(), 0);
  }
  return conv;
}

int64_t conv_out_channels(
    const at::Tensor& weight,
    bool transposed,
    int64_t groups) {
  return transposed ? weight.size(1) * groups : weight.size(0);
}

std::vector<c10::SymInt> check_conv_bn_args(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    const ConvArgs& conv,
    double eps) {
  const int64_t dim = input.dim();
  TORCH_CHECK(
      dim >= 3 && dim <= 5,
      op, ": expected `input` of shape (N, C, L), (N, C, H, W) or "
      "(N, C, D, H, W) (a batch of 1-, 2- or 3-D data), but got a ", dim,
      "-D tensor of shape ", input.sizes(),
      dim == 2 ? "; add the batch dimension with input.unsqueeze(0)" : "");
  const int64_t spatial = dim - 2;
  const char* const kernel_dims[] = {"", "kL", "kH, kW", "kD, kH, kW"};
  TORCH_CHECK(
      weight.dim() != dim + 1 || weight.dim() > 5,
      op, ": `input` of shape ", input.sizes(), " is ", dim, "-D, but `weight` "
      "of shape ", weight.sizes(), " is a ", dim - 1, "-D convolution's, "
      "which takes `input` of shape ", input_shape(dim + 1), "; if `input` is "
      "one sample, add the batch dimension with input.unsqueeze(0)");
  TORCH_CHECK(
      weight.dim() == dim,
      op, ": expected `weight` of shape ",
      conv.transposed ? "(in_channels, out_channels / groups, "
                      : "(out_channels, in_channels / groups, ",
      kernel_dims[spatial], ") for the ", input_shape(dim), " input, but "
      "got a ", weight.dim(), "-D tensor of shape ", weight.sizes());
  check_data_types(op, input, weight);
  TORCH_CHECK(
      conv.groups > 0, op, ": `groups` must be positive, got ", conv.groups);

  check_per_dim(op, "stride", conv.stride, spatial);
  check_per_dim(op, "padding", conv.padding, spatial);
  check_per_dim(op, "dilation", conv.dilation, spatial);
  check_per_dim(op, "output_padding", conv.output_padding, spatial);
  for (int64_t i = 0; i < spatial; ++i) {
    TORCH_CHECK(
        conv.stride[i] > 0, op, ": `stride` must be positive, got ",
        conv.stride);
    TORCH_CHECK(
        conv.dilation[i] > 0, op, ": `dilation` must be positive, got ",
        conv.dilation);
    TORCH_CHECK(
        conv.padding[i] >= 0, op, ": `padding` must be non-negative, got ",
        conv.padding);
    if (conv.transposed) {
      // aten::convolution's rule: the extra output rows must be fewer than
      // the stride or the dilation, or they would be a whole step.
      TORCH_CHECK(
          conv.output_padding[i] >= 0 &&
              conv.output_padding[i] <
                  std::max(conv.stride[i], conv.dilation[i]),
          op, ": `output_padding` ", conv.output_padding, " must be "
          "non-negative and smaller than either the stride ", conv.stride,
          " or the dilation ", conv.dilation, " in each dimension");
    } else {
      TORCH_CHECK(
          conv.output_padding[i] == 0,
          op, ": `output_padding` ", conv.output_padding, " applies to "
          "transposed convolutions only; pass transposed=True or zeros");
    }
  }
  check_eps(op, eps);

  const int64_t groups = conv.groups;
  const int64_t out_channels = conv_out_channels(weight, conv);
  if (conv.transposed) {
    TORCH_CHECK(
        weight.size(0) % groups == 0 && out_channels > 0,
        op, ": `groups` (", groups, ") must divide the number of input "
        "channels (weight.size(0) = ", weight.size(0), " of a transposed "
        "convolution's weight), and weight.size(1) must be positive");
    TORCH_CHECK(
        input.sym_size(1) == weight.size(0),
        op, ": channel mismatch: `input` has ", input.sym_size(1),
        " channels but the transposed convolution's `weight` of shape ",
        weight.sizes(), " expects weight.size(0) = ", weight.size(0),
        " input channels");
  } else {
    TORCH_CHECK(
        out_channels > 0 && out_channels % groups == 0,
        op, ": `groups` (", groups, ") must divide the number of output "
        "channels (weight.size(0) = ", out_channels, ")");
    TORCH_CHECK(
        input.sym_size(1) == weight.size(1) * groups,
        op, ": channel mismatch: `input` has ", input.sym_size(1), " channels "
        "but `weight` of shape ", weight.sizes(), " with groups=", groups,
        " expects weight.size(1) * groups = ", weight.size(1) * groups,
        " input channels");
  }

  check_conv_bias(op, bias, weight, out_channels, input);
  check_optional_channel_param(
      op, "bn_weight", bn_weight, out_channels, input, true);
  check_optional_channel_param(
      op, "bn_bias", bn_bias, out_channels, input, true);

  std::vector<c10::SymInt> out_sizes{
      input.sym_size(0), c10::SymInt(out_channels)};
  for (int64_t i = 0; i < spatial; ++i) {
    const c10::SymInt in = input.sym_size(2 + i);
    const int64_t extent = conv.dilation[i] * (weight.size(2 + i) - 1) + 1;
    if (conv.transposed) {
      const c10::SymInt out = (in - 1) * conv.stride[i] -
          2 * conv.padding[i] + extent + conv.output_padding[i];
      TORCH_CHECK(
          out > 0,
          op, ": the transposed convolution output would be empty: `input` "
          "spatial size ", input.sym_sizes().slice(2), " with stride ",
          conv.stride, ", padding ", conv.padding, ", dilation ",
          conv.dilation, " and kernel ", weight.sizes().slice(2), " gives "
          "size ", out, " in dimension ", i, "; use less padding");
      out_sizes.push_back(out);
    } else {
      TORCH_CHECK(
          in + 2 * conv.padding[i] >= extent,
          op, ": the convolution output would be empty: `input` spatial size ",
          input.sym_sizes().slice(2), " with padding ", conv.padding,
          " is smaller than the dilated kernel ", weight.sizes().slice(2),
          " with dilation ", conv.dilation,
          "; use a larger input or more padding");
      out_sizes.push_back((in + 2 * conv.padding[i] - extent) / conv.stride[i] + 1);
    }
  }
  return out_sizes;
}

std::vector<c10::SymInt> check_linear_bn_args(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias,
    double eps) {
  TORCH_CHECK(
      input.dim() == 2,
      op, ": expected `input` of shape (N, in_features), but got a ",
      input.dim(), "-D tensor of shape ", input.sizes(),
      input.dim() == 1
          ? "; add the batch dimension with input.unsqueeze(0)"
          : "; BatchNorm1d after Linear normalizes (N, features) batches, "
            "so flatten the other dimensions first");
  TORCH_CHECK(
      weight.dim() == 2,
      op, ": expected `weight` of shape (out_features, in_features), but got "
      "a ", weight.dim(), "-D tensor of shape ", weight.sizes());
  check_data_types(op, input, weight);
  check_eps(op, eps);
  const int64_t out_features = weight.size(0);
  TORCH_CHECK(
      out_features > 0,
      op, ": `weight` has no output features (shape ", weight.sizes(), ")");
  TORCH_CHECK(
      input.sym_size(1) == weight.size(1),
      op, ": feature mismatch: `input` has ", input.sym_size(1),
      " features but `weight` of shape ", weight.sizes(), " expects ",
      weight.size(1), " (in_features)");
  check_conv_bias(op, bias, weight, out_features, input);
  check_optional_channel_param(
      op, "bn_weight", bn_weight, out_features, input, true);
  check_optional_channel_param(
      op, "bn_bias", bn_bias, out_features, input, true);
  return {input.sym_size(0), c10::SymInt(out_features)};
}

void check_batch_statistics_possible(
    const char* op,
    const at::Tensor& input,
    c10::ArrayRef<c10::SymInt> output_sizes) {
  TORCH_CHECK(
      input.sym_size(0) > 0,
      op, ": `input` has an empty batch (shape ", input.sym_sizes(), "): batch "
      "normalization in training needs at least one sample; skip empty "
      "batches or call .eval() to use the running statistics");
  // Every dimension but the channels' (1) holds values of a channel.
  c10::SymInt values_per_channel = output_sizes[0];
  for (size_t d = 2; d < output_sizes.size(); ++d) {
    values_per_channel = values_per_channel * output_sizes[d];
  }
  // ValueError in Python, as nn.BatchNorm raises it.
  TORCH_CHECK_VALUE(
      values_per_channel > 1,
      "Expected more than 1 value per channel when training, got input size ",
      input.sym_sizes(), " (the output ", output_sizes, " has ",
      values_per_channel, " value per channel); use a larger batch",
      output_sizes.size() > 2 ? " or spatial size" : "", ", or call .eval()");
}

void check_channel_vector(
    const char* op,
    const char* name,
    const at::Tensor& t,
    int64_t channels,
    const at::Tensor& input) {
  TORCH_CHECK(
      t.defined(), op, ": `", name, "` must be a tensor, got None");
  TORCH_CHECK(
      t.dim() == 1 && t.sym_size(0) == channels,
      op, ": expected `", name, "` to be a 1-D tensor with one value per "
      "channel (", channels, " values), but got shape ", t.sym_sizes());
  TORCH_CHECK(
      at::isFloatingType(t.scalar_type()),
      op, ": `", name, "` must be floating point, got ", t.scalar_type());
  TORCH_CHECK(
      t.device() == input.device(),
      op, ": `", name, "` is on ", t.device(), " but the data is on ",
      input.device(), "; move them to the same device");
}

} // namespace convbn
