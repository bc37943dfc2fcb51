// CUDA registration of sync_linear_bn_train and its backward: the
// device-generic driver (csrc/train_driver.cpp) with the CUDA kernel table
// (batch_norm_kernels.cu); the exchange between ranks goes through
// torch.distributed (NCCL for CUDA tensors).
#include "train_driver.h"

#include <torch/library.h>

namespace convbn {

TORCH_LIBRARY_IMPL(convbn, CUDA, m) {
  m.impl("sync_linear_bn_train", &sync_linear_bn_train_kernel<cuda::kernels>);
  m.impl(
      "sync_linear_bn_train_backward",
      &sync_linear_bn_train_backward_kernel<cuda::kernels>);
}

} // namespace convbn
