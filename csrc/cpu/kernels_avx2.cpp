// The AVX2 + FMA build of the CPU kernels, as ATen builds its cpu/ kernels
// per capability: at::vec's 256-bit vectors (CPU_CAPABILITY_AVX2) in a
// namespace of their own, code generation for AVX2/FMA enabled by pragma
// (setuptools cannot give one file its own flags). Only called after the
// processor said it has AVX2 and FMA. Build files list this file last, so
// that the portable objects provide any inline function both define.
#if defined(__x86_64__) && defined(__GNUC__)

#pragma GCC target("avx,avx2,fma,f16c")
// The pragma enables the instructions but, unlike -mavx2, does not define
// the feature macros that headers (Sleef's vector declarations) test.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define CONVBN_CPU_ISA isa_avx2
#include "batch_norm_kernels.h"

namespace convbn {
namespace cpu {

const bool avx2_kernels_built = true;

const KernelTable* avx2_kernels() {
  static const bool supported = __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return supported ? &isa_avx2::kernel_table() : nullptr;
}

} // namespace cpu
} // namespace convbn

#else

#include "../kernel_table.h"

namespace convbn {
namespace cpu {

const bool avx2_kernels_built = false;

const KernelTable* avx2_kernels() {
  return nullptr;
}

} // namespace cpu
} // namespace convbn

#endif
