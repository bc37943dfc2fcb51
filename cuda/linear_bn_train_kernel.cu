// CUDA registration of linear_bn_train and its backward: the device-generic
// driver (csrc/train_driver.cpp) with the CUDA kernel table
// (batch_norm_kernels.cu).
#include "train_driver.h"

#include <torch/library.h>

namespace convbn {

TORCH_LIBRARY_IMPL(convbn, CUDA, m) {
  m.impl("linear_bn_train", &linear_bn_train_kernel<cuda::kernels>);
  m.impl("linear_bn_train_backward", &linear_bn_train_backward_kernel<cuda::kernels>);
}

} // namespace convbn
