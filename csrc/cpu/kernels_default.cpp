// The portable build of the CPU kernels (at::vec's DEFAULT vectors) and the
// run-time choice of kernel table.
#define CONVBN_CPU_ISA isa_default
#include "batch_norm_kernels.h"

#include <cstdlib>
#include <cstring>

namespace convbn {
namespace cpu {

const KernelTable& default_kernels() {
  return isa_default::kernel_table();
}

const KernelTable& kernels() {
  static const KernelTable& chosen = [&]() -> const KernelTable& {
    const char* forced = std::getenv("CONVBN_CPU_CAPABILITY");
    const bool force_default =
        forced != nullptr && std::strcmp(forced, "default") == 0;
    const KernelTable* avx2 = force_default ? nullptr : avx2_kernels();
    return avx2 != nullptr ? *avx2 : default_kernels();
  }();
  return chosen;
}

} // namespace cpu
} // namespace convbn
