// The activation a conv+BN op may apply to its output in the same pass as
// the normalization (the ops' `activation` and `negative_slope` arguments):
// what nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.Sigmoid
// and nn.GELU() compute, and their derivatives as ATen's backward kernels
// take them. The scalar functions here serve the CUDA kernels and the CPU
// kernels' tails (the CPU kernels vectorize the same formulas with at::vec);
// activation_backward serves the differentiable (double-backward) paths
// with ATen's own backward ops.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace at {
class Tensor;
}

namespace convbn {

enum class ActivationKind : int8_t {
  identity,
  relu,
  relu6,
  leaky_relu,
  silu,
  hardswish,
  sigmoid,
  gelu, // nn.GELU() (approximate='none'), with erf
};

struct Activation {
  ActivationKind kind = ActivationKind::identity;
  double negative_slope = 0.01; // leaky_relu's; unused by the others

  bool is_identity() const {
    return kind == ActivationKind::identity;
  }
};

// The op's `activation` and `negative_slope` arguments, checked: a name
// from the list above (the error lists them) and a finite slope.
Activation parse_activation(
    const char* op,
    c10::string_view name,
    double negative_slope);

// f(z), in the opmath type T (float or double).
template <typename T>
C10_HOST_DEVICE inline T activation_forward(ActivationKind kind, T slope, T z) {
  switch (kind) {
    case ActivationKind::identity:
      return z;
    case ActivationKind::relu:
      // z itself when z is NaN, as torch.relu propagates it.
      return z > T(0) ? z : (z != z ? z : T(0));
    case ActivationKind::relu6:
      return z != z ? z : (z <= T(0) ? T(0) : (z >= T(6) ? T(6) : z));
    case ActivationKind::leaky_relu:
      return z > T(0) ? z : z * slope;
    case ActivationKind::silu:
      return z / (T(1) + std::exp(-z));
    case ActivationKind::hardswish: {
      const T r = z + T(3);
      return z * (r <= T(0) ? T(0) : (r >= T(6) ? T(6) : r)) / T(6);
    }
    case ActivationKind::sigmoid:
      return T(1) / (T(1) + std::exp(-z));
    case ActivationKind::gelu:
      return T(0.5) * z * (T(1) + std::erf(z * T(0.7071067811865476)));
  }
  return z;
}

// f'(z), with ATen's conventions at the kinks (threshold_backward,
// hardtanh_backward, leaky_relu_backward, hardswish_backward): 0 at z = 0
// for relu and at z = 0 or 6 for relu6, the slope at z = 0 for leaky_relu,
// 0 at z = -3 and 1 at z = 3 for hardswish (z / 3 + 1/2 between); a NaN
// z passes the gradient through, as there.
template <typename T>
C10_HOST_DEVICE inline T activation_derivative(
    ActivationKind kind,
    T slope,
    T z) {
  switch (kind) {
    case ActivationKind::identity:
      return T(1);
    case ActivationKind::relu:
      return z <= T(0) ? T(0) : T(1);
    case ActivationKind::relu6:
      return (z <= T(0) || z >= T(6)) ? T(0) : T(1);
    case ActivationKind::leaky_relu:
      return z > T(0) ? T(1) : slope;
    case ActivationKind::silu: {
      const T s = T(1) / (T(1) + std::exp(-z));
      return s * (T(1) + z * (T(1) - s));
    }
    case ActivationKind::hardswish:
      return z <= T(-3) ? T(0) : (z < T(3) ? z / T(3) + T(0.5) : T(1));
    case ActivationKind::sigmoid: {
      const T s = T(1) / (T(1) + std::exp(-z));
      return s * (T(1) - s);
    }
    case ActivationKind::gelu: {
      // d/dz z * Phi(z) = Phi(z) + z * phi(z).
      const T cdf = T(0.5) * (T(1) + std::erf(z * T(0.7071067811865476)));
      const T pdf = std::exp(T(-0.5) * z * z) * T(0.3989422804014327);
      return cdf + z * pdf;
    }
  }
  return T(1);
}

// The kernels take the kind as a template argument, so that their loops
// carry no branch per element: dispatch_activation(kind, fn) calls
// fn(ActivationTag<kind>{}).
template <ActivationKind K>
using ActivationTag = std::integral_constant<ActivationKind, K>;

template <typename Fn>
void dispatch_activation(ActivationKind kind, const Fn& fn) {
  switch (kind) {
    case ActivationKind::identity:
      return fn(ActivationTag<ActivationKind::identity>{});
    case ActivationKind::relu:
      return fn(ActivationTag<ActivationKind::relu>{});
    case ActivationKind::relu6:
      return fn(ActivationTag<ActivationKind::relu6>{});
    case ActivationKind::leaky_relu:
      return fn(ActivationTag<ActivationKind::leaky_relu>{});
    case ActivationKind::silu:
      return fn(ActivationTag<ActivationKind::silu>{});
    case ActivationKind::hardswish:
      return fn(ActivationTag<ActivationKind::hardswish>{});
    case ActivationKind::sigmoid:
      return fn(ActivationTag<ActivationKind::sigmoid>{});
    case ActivationKind::gelu:
      return fn(ActivationTag<ActivationKind::gelu>{});
  }
}

// f applied to `z` with ATen's op (eval's composite): in place, except
// leaky_relu with a negative slope, which then replaces z by a new tensor.
void apply_activation_(at::Tensor& z, const Activation& act);

// grad * f'(z) with ATen's backward ops, differentiable in turn (double
// backward) when grad mode is on.
at::Tensor activation_backward(
    const at::Tensor& grad,
    const at::Tensor& z,
    const Activation& act);

} // namespace convbn
