#include "activation.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <utility>

namespace convbn {
namespace {

constexpr std::array<std::pair<const char*, ActivationKind>, 8> kActivations{{
    {"identity", ActivationKind::identity},
    {"relu", ActivationKind::relu},
    {"relu6", ActivationKind::relu6},
    {"leaky_relu", ActivationKind::leaky_relu},
    {"silu", ActivationKind::silu},
    {"hardswish", ActivationKind::hardswish},
    {"sigmoid", ActivationKind::sigmoid},
    {"gelu", ActivationKind::gelu},
}};

} // namespace

Activation parse_activation(
    const char* op,
    c10::string_view name,
    double negative_slope) {
  TORCH_CHECK_VALUE(
      std::isfinite(negative_slope),
      op, ": `negative_slope` must be a finite number, got ", negative_slope);
  for (const auto& [known, kind] : kActivations) {
    if (name == known) {
      return {kind, negative_slope};
    }
  }
  TORCH_CHECK_VALUE(
      false, op, ": unknown `activation` '", name, "'; expected one of "
      "'identity', 'relu', 'relu6', 'leaky_relu', 'silu', 'hardswish', "
      "'sigmoid', 'gelu' (nn.GELU() with approximate='none')");
}

void apply_activation_(at::Tensor& z, const Activation& act) {
  // In place where autograd allows it: inference then holds one
  // output-sized buffer at a time.
  switch (act.kind) {
    case ActivationKind::identity:
      return;
    case ActivationKind::relu:
      at::relu_(z);
      return;
    case ActivationKind::relu6:
      at::hardtanh_(z, 0.0, 6.0);
      return;
    case ActivationKind::leaky_relu:
      if (act.negative_slope < 0) {
        // Autograd (forward-mode AD, torch.func) cannot differentiate the
        // in-place form with a negative slope: its output does not tell the
        // sign of its input.
        z = at::leaky_relu(z, act.negative_slope);
      } else {
        at::leaky_relu_(z, act.negative_slope);
      }
      return;
    case ActivationKind::silu:
      at::silu_(z);
      return;
    case ActivationKind::hardswish:
      at::hardswish_(z);
      return;
    case ActivationKind::sigmoid:
      at::sigmoid_(z);
      return;
    case ActivationKind::gelu:
      at::gelu_(z, "none");
      return;
  }
}

at::Tensor activation_backward(
    const at::Tensor& grad,
    const at::Tensor& z,
    const Activation& act) {
  switch (act.kind) {
    case ActivationKind::identity:
      return grad;
    case ActivationKind::relu:
      return at::threshold_backward(grad, z, 0);
    case ActivationKind::relu6:
      return at::hardtanh_backward(grad, z, 0.0, 6.0);
    case ActivationKind::leaky_relu:
      return at::leaky_relu_backward(
          grad, z, act.negative_slope, /*self_is_result=*/false);
    case ActivationKind::silu:
      if (at::GradMode::is_enabled()) {
        // silu_backward has no derivative of its own; torch differentiates
        // this formula instead (infinitely_differentiable_silu_backward).
        const at::Tensor s = at::sigmoid(z);
        return grad * s * (1 + z * (1 - s));
      }
      return at::silu_backward(grad, z);
    case ActivationKind::hardswish:
      return at::hardswish_backward(grad, z);
    case ActivationKind::sigmoid:
      return at::sigmoid_backward(grad, at::sigmoid(z));
    case ActivationKind::gelu:
      return at::gelu_backward(grad, z, "none");
  }
  return grad;
}

} // namespace convbn
