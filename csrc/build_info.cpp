// What this library was compiled with: convbn::build_info() for C++
// programs, convbn.build_info() in Python (through convbn_build_info).
#include "convbn.h"
#include "kernel_table.h"

#include <torch/version.h>

namespace convbn {
namespace detail {

// Set by cuda/batch_norm_kernels.cu's static initializer in builds that
// compile CUDA. A pointer initialized with nullptr is constant-initialized,
// so it holds nullptr before any static initializer runs, in any order.
const char* cuda_build_info = nullptr;

} // namespace detail

std::string build_info() {
  std::string info = "torch=" TORCH_VERSION "\n";
  info += cpu::avx2_kernels_built ? "cpu_kernels=default,avx2\n" : "cpu_kernels=default\n";
  const bool avx2_used = cpu::avx2_kernels() != nullptr && &cpu::kernels() == cpu::avx2_kernels();
  info += avx2_used ? "cpu_kernels_used=avx2\n" : "cpu_kernels_used=default\n";
  if (detail::cuda_build_info != nullptr) {
    info += detail::cuda_build_info;
  }
  return info;
}

} // namespace convbn

extern "C" const char* convbn_build_info() {
  static const std::string info = convbn::build_info();
  return info.c_str();
}
