// The cast every convbn autocast kernel applies to the data-side tensors
// (input, weight, the conv/linear bias): see conv_bn_autocast.cpp.
#pragma once

#include <ATen/autocast_mode.h>

#include <optional>

namespace convbn {

// Casts a floating-point tensor to the autocast dtype of Device.
template <c10::DeviceType Device>
struct AutocastCast {
  at::ScalarType dtype = at::autocast::get_autocast_dtype(Device);
  at::Tensor operator()(const at::Tensor& t) const {
    return at::autocast::cached_cast(dtype, t, Device);
  }
  std::optional<at::Tensor> operator()(const std::optional<at::Tensor>& t) const {
    if (!t.has_value() || !t->defined()) {
      return t;
    }
    return (*this)(*t);
  }
};

} // namespace convbn
