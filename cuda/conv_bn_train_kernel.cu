// CUDA registration of conv_bn_train and its backward: the device-generic
// driver (csrc/train_driver.cpp) with the CUDA kernel table
// (batch_norm_kernels.cu).
#include "train_driver.h"

#include <torch/library.h>

namespace convbn {

TORCH_LIBRARY_IMPL(convbn, CUDA, m) {
  m.impl("conv_bn_train", &conv_bn_train_kernel<cuda::kernels>);
  m.impl("conv_bn_train_backward", &conv_bn_train_backward_kernel<cuda::kernels>);
}

} // namespace convbn
