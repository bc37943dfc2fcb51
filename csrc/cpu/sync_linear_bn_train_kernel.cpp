// CPU registration of sync_linear_bn_train and its backward: the
// device-generic driver with the CPU kernel table; the exchange between
// ranks goes through torch.distributed (gloo for CPU tensors).
#include "../train_driver.h"

#include <torch/library.h>

namespace convbn {

TORCH_LIBRARY_IMPL(convbn, CPU, m) {
  m.impl("sync_linear_bn_train", &sync_linear_bn_train_kernel<cpu::kernels>);
  m.impl(
      "sync_linear_bn_train_backward",
      &sync_linear_bn_train_backward_kernel<cpu::kernels>);
}

} // namespace convbn
