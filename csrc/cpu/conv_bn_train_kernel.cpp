// CPU registration of conv_bn_train and its backward: the device-generic
// driver with the CPU kernel table (AVX2 or portable, chosen at run time).
#include "../train_driver.h"

#include <torch/library.h>

namespace convbn {

TORCH_LIBRARY_IMPL(convbn, CPU, m) {
  m.impl("conv_bn_train", &conv_bn_train_kernel<cpu::kernels>);
  m.impl("conv_bn_train_backward", &conv_bn_train_backward_kernel<cpu::kernels>);
}

} // namespace convbn
