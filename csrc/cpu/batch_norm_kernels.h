// CPU batch-norm math on a conv output, without any bookkeeping: no argument
// checks and no allocation of results (the kernel file does that).
//
// A 4-D tensor is walked in one of two layouts, whichever it is dense in:
//   NCHW           channel c of image n is one contiguous plane of H*W values
//   channels_last  each of the N*H*W positions is one row of C values
// Reductions accumulate in at::opmath_type (float for float16/bfloat16,
// otherwise the type itself) over one plane or one block of rows, and in
// double across planes/blocks, so that long channels keep their precision.
// Statistics are Welford-style: exact per-part mean and M2, merged (Chan);
// each part's mean is taken of the values less the part's first value (a
// shifted sum), so that a part of equal values has exactly that mean and an
// M2 of exactly 0 however large they are (see batch_mean_var).
// The order of every sum is fixed (blocks do not depend on the thread
// count), so results are deterministic.
//
// This header is compiled once per instruction set, like ATen's cpu/
// kernels: the includer defines CONVBN_CPU_ISA (the namespace of this copy)
// and, for AVX2, ATen's CPU_CAPABILITY macros before any include (see
// kernels_default.cpp and kernels_avx2.cpp). kernel_table.h picks a copy at
// run time.
#pragma once

#ifndef CONVBN_CPU_ISA
#error "define CONVBN_CPU_ISA before including batch_norm_kernels.h"
#endif

#include "../kernel_table.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

namespace convbn {
namespace cpu {
namespace CONVBN_CPU_ISA {

template <typename T>
using opmath_t = at::opmath_type<T>;

// float and double are vectorized directly; float16/bfloat16 are converted
// element by element to float.
template <typename T>
constexpr bool kVectorized = std::is_same_v<T, opmath_t<T>>;

struct ChannelLayout {
  bool channels_last;
  int64_t batch;
  int64_t channels;
  int64_t spatial; // H * W
  int64_t values_per_channel() const {
    return batch * spatial;
  }
};

// The layout `t` is walked in (walks_channels_last, kernel_table.h).
inline ChannelLayout channel_layout(const at::Tensor& t) {
  return {walks_channels_last(t), t.size(0), t.size(1), t.size(2) * t.size(3)};
}

// Sums one vector register's lanes in a fixed order.
template <typename T>
T lane_sum(const at::vec::Vectorized<T>& v) {
  std::array<T, at::vec::Vectorized<T>::size()> lanes;
  v.store(lanes.data());
  T s = 0;
  for (T x : lanes) {
    s += x;
  }
  return s;
}

// ---------------------------------------------------------------------------
// Activations (activation.h) on vector registers of float or double, the
// same formulas as the scalar ones there. The kind is a template argument
// (dispatch_activation), so the loops carry no branch per element.

template <typename T>
at::vec::Vectorized<T> vec_sigmoid(const at::vec::Vectorized<T>& z) {
  using Vec = at::vec::Vectorized<T>;
  return Vec(T(1)) / (Vec(T(1)) + z.neg().exp());
}

// f(z); maximum/minimum propagate NaN, as torch.relu and clamp do. (z by
// reference: a 32-byte-aligned Vectorized passed by value makes GCC print
// an ABI note on the portable build.)
template <ActivationKind K, typename T>
at::vec::Vectorized<T> vec_activation(const at::vec::Vectorized<T>& z, T slope) {
  using Vec = at::vec::Vectorized<T>;
  const Vec zero(T(0));
  if constexpr (K == ActivationKind::identity) {
    return z;
  } else if constexpr (K == ActivationKind::relu) {
    return at::vec::maximum(z, zero);
  } else if constexpr (K == ActivationKind::relu6) {
    return at::vec::minimum(at::vec::maximum(z, zero), Vec(T(6)));
  } else if constexpr (K == ActivationKind::leaky_relu) {
    return Vec::blendv(z * Vec(slope), z, z > zero);
  } else if constexpr (K == ActivationKind::silu) {
    return z / (Vec(T(1)) + z.neg().exp());
  } else if constexpr (K == ActivationKind::hardswish) {
    return z *
        at::vec::minimum(at::vec::maximum(z + Vec(T(3)), zero), Vec(T(6))) /
        Vec(T(6));
  } else if constexpr (K == ActivationKind::sigmoid) {
    return vec_sigmoid(z);
  } else {
    return Vec(T(0.5)) * z *
        (Vec(T(1)) + (z * Vec(T(0.7071067811865476))).erf());
  }
}

// f'(z), with activation_derivative's values at the kinks and for NaN.
template <ActivationKind K, typename T>
at::vec::Vectorized<T> vec_activation_derivative(
    const at::vec::Vectorized<T>& z,
    T slope) {
  using Vec = at::vec::Vectorized<T>;
  const Vec zero(T(0)), one(T(1));
  if constexpr (K == ActivationKind::identity) {
    return one;
  } else if constexpr (K == ActivationKind::relu) {
    return Vec::blendv(one, zero, z <= zero);
  } else if constexpr (K == ActivationKind::relu6) {
    return Vec::blendv(one, zero, (z <= zero) | (z >= Vec(T(6))));
  } else if constexpr (K == ActivationKind::leaky_relu) {
    return Vec::blendv(Vec(slope), one, z > zero);
  } else if constexpr (K == ActivationKind::silu) {
    const Vec s = vec_sigmoid(z);
    return s * (one + z * (one - s));
  } else if constexpr (K == ActivationKind::hardswish) {
    const Vec middle = z / Vec(T(3)) + Vec(T(0.5));
    return Vec::blendv(
        Vec::blendv(one, middle, z < Vec(T(3))), zero, z <= Vec(T(-3)));
  } else if constexpr (K == ActivationKind::sigmoid) {
    const Vec s = vec_sigmoid(z);
    return s * (one - s);
  } else {
    const Vec cdf =
        Vec(T(0.5)) * (one + (z * Vec(T(0.7071067811865476))).erf());
    const Vec pdf = (Vec(T(-0.5)) * z * z).exp() * Vec(T(0.3989422804014327));
    return cdf + z * pdf;
  }
}

// ---------------------------------------------------------------------------
// Contiguous spans: one (image, channel) plane in NCHW.

// sum(x - pivot)
template <typename T>
opmath_t<T> span_sum_shifted(const T* x, int64_t n, opmath_t<T> pivot) {
  using acc_t = opmath_t<T>;
  int64_t i = 0;
  acc_t s = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    const Vec p(pivot);
    Vec acc0(T(0)), acc1(T(0));
    for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
      acc0 += Vec::loadu(x + i) - p;
      acc1 += Vec::loadu(x + i + Vec::size()) - p;
    }
    for (; i + Vec::size() <= n; i += Vec::size()) {
      acc0 += Vec::loadu(x + i) - p;
    }
    s = lane_sum(acc0 + acc1);
  }
  for (; i < n; ++i) {
    s += acc_t(x[i]) - pivot;
  }
  return s;
}

// sum((x - mean)^2)
template <typename T>
opmath_t<T> span_sum_sq_centered(const T* x, int64_t n, opmath_t<T> mean) {
  using acc_t = opmath_t<T>;
  int64_t i = 0;
  acc_t s = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    const Vec m(mean);
    Vec acc0(T(0)), acc1(T(0));
    for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
      const Vec d0 = Vec::loadu(x + i) - m;
      const Vec d1 = Vec::loadu(x + i + Vec::size()) - m;
      acc0 = at::vec::fmadd(d0, d0, acc0);
      acc1 = at::vec::fmadd(d1, d1, acc1);
    }
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec d = Vec::loadu(x + i) - m;
      acc0 = at::vec::fmadd(d, d, acc0);
    }
    s = lane_sum(acc0 + acc1);
  }
  for (; i < n; ++i) {
    const acc_t d = acc_t(x[i]) - mean;
    s += d * d;
  }
  return s;
}

// (sum(dy), sum(dy * (y - mean)))
template <typename T>
std::array<opmath_t<T>, 2> span_sum_and_dot_centered(
    const T* dy,
    const T* y,
    int64_t n,
    opmath_t<T> mean) {
  using acc_t = opmath_t<T>;
  int64_t i = 0;
  acc_t s_dy = 0, s_dot = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    const Vec m(mean);
    Vec acc_dy(T(0)), acc_dot(T(0));
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec g = Vec::loadu(dy + i);
      acc_dy += g;
      acc_dot = at::vec::fmadd(g, Vec::loadu(y + i) - m, acc_dot);
    }
    s_dy = lane_sum(acc_dy);
    s_dot = lane_sum(acc_dot);
  }
  for (; i < n; ++i) {
    const acc_t g = acc_t(dy[i]);
    s_dy += g;
    s_dot += g * (acc_t(y[i]) - mean);
  }
  return {s_dy, s_dot};
}

// out = f(a * ((u - mu) + b * (v - m)) + c) (the v term only when HasV), in
// this order (see channel_affine), f the activation K. out may be u or v.
template <typename T, bool HasV, ActivationKind K>
void span_affine(
    T* out,
    const T* u,
    opmath_t<T> a,
    opmath_t<T> mu,
    const T* v,
    opmath_t<T> b,
    opmath_t<T> m,
    opmath_t<T> c,
    opmath_t<T> slope,
    int64_t n) {
  using acc_t = opmath_t<T>;
  int64_t i = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    const Vec va(a), vmu(mu), vb(b), vm(m), vc(c);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec t = Vec::loadu(u + i) - vmu;
      if constexpr (HasV) {
        t = at::vec::fmadd(Vec::loadu(v + i) - vm, vb, t);
      }
      vec_activation<K>(at::vec::fmadd(t, va, vc), slope).store(out + i);
    }
  }
  for (; i < n; ++i) {
    acc_t t = acc_t(u[i]) - mu;
    if constexpr (HasV) {
      t += b * (acc_t(v[i]) - m);
    }
    out[i] = T(activation_forward(K, slope, a * t + c));
  }
}

// dz = dy * f'(a * (y - mean) + c), z computed with span_affine's
// expression. (Its coefficients are the forward's up to rounding: the
// backward's mean is save_mean less the conv bias.)
template <typename T, ActivationKind K>
void span_activation_grad(
    T* dz,
    const T* dy,
    const T* y,
    opmath_t<T> a,
    opmath_t<T> mean,
    opmath_t<T> c,
    opmath_t<T> slope,
    int64_t n) {
  using acc_t = opmath_t<T>;
  int64_t i = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    const Vec va(a), vmean(mean), vc(c);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec z = at::vec::fmadd(Vec::loadu(y + i) - vmean, va, vc);
      (Vec::loadu(dy + i) * vec_activation_derivative<K>(z, slope))
          .store(dz + i);
    }
  }
  for (; i < n; ++i) {
    const acc_t z = a * (acc_t(y[i]) - mean) + c;
    dz[i] = T(acc_t(dy[i]) * activation_derivative(K, slope, z));
  }
}

// ---------------------------------------------------------------------------
// Rows: one position of a channels_last tensor, C channels side by side.

// s[c] += x[c] - pivot[c]
template <typename T>
void row_add_shifted(opmath_t<T>* s, const T* x, const T* pivot, int64_t C) {
  int64_t c = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    for (; c + Vec::size() <= C; c += Vec::size()) {
      (Vec::loadu(s + c) + (Vec::loadu(x + c) - Vec::loadu(pivot + c)))
          .store(s + c);
    }
  }
  for (; c < C; ++c) {
    s[c] += opmath_t<T>(x[c]) - opmath_t<T>(pivot[c]);
  }
}

// s[c] += (x[c] - mean[c])^2
template <typename T>
void row_add_sq_centered(
    opmath_t<T>* s,
    const T* x,
    const opmath_t<T>* mean,
    int64_t C) {
  int64_t c = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    for (; c + Vec::size() <= C; c += Vec::size()) {
      const Vec d = Vec::loadu(x + c) - Vec::loadu(mean + c);
      at::vec::fmadd(d, d, Vec::loadu(s + c)).store(s + c);
    }
  }
  for (; c < C; ++c) {
    const opmath_t<T> d = opmath_t<T>(x[c]) - mean[c];
    s[c] += d * d;
  }
}

// s_dy[c] += dy[c]; s_dot[c] += dy[c] * (y[c] - mean[c])
template <typename T>
void row_add_sum_and_dot_centered(
    opmath_t<T>* s_dy,
    opmath_t<T>* s_dot,
    const T* dy,
    const T* y,
    const opmath_t<T>* mean,
    int64_t C) {
  int64_t c = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    for (; c + Vec::size() <= C; c += Vec::size()) {
      const Vec g = Vec::loadu(dy + c);
      (Vec::loadu(s_dy + c) + g).store(s_dy + c);
      at::vec::fmadd(
          g, Vec::loadu(y + c) - Vec::loadu(mean + c), Vec::loadu(s_dot + c))
          .store(s_dot + c);
    }
  }
  for (; c < C; ++c) {
    const opmath_t<T> g = opmath_t<T>(dy[c]);
    s_dy[c] += g;
    s_dot[c] += g * (opmath_t<T>(y[c]) - mean[c]);
  }
}

// out[c] = f(a[c] * ((u[c] - mu[c]) + b[c] * (v[c] - m[c])) + c0[c]) (the v
// term only when HasV), as span_affine.
template <typename T, bool HasV, ActivationKind K>
void row_affine(
    T* out,
    const T* u,
    const opmath_t<T>* a,
    const opmath_t<T>* mu,
    const T* v,
    const opmath_t<T>* b,
    const opmath_t<T>* m,
    const opmath_t<T>* c0,
    opmath_t<T> slope,
    int64_t C) {
  int64_t c = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    for (; c + Vec::size() <= C; c += Vec::size()) {
      Vec t = Vec::loadu(u + c) - Vec::loadu(mu + c);
      if constexpr (HasV) {
        t = at::vec::fmadd(
            Vec::loadu(v + c) - Vec::loadu(m + c), Vec::loadu(b + c), t);
      }
      vec_activation<K>(
          at::vec::fmadd(t, Vec::loadu(a + c), Vec::loadu(c0 + c)), slope)
          .store(out + c);
    }
  }
  for (; c < C; ++c) {
    opmath_t<T> t = opmath_t<T>(u[c]) - mu[c];
    if constexpr (HasV) {
      t += b[c] * (opmath_t<T>(v[c]) - m[c]);
    }
    out[c] = T(activation_forward(K, slope, a[c] * t + c0[c]));
  }
}

// dz[c] = dy[c] * f'(a[c] * (y[c] - mean[c]) + c0[c]), z with row_affine's
// expression.
template <typename T, ActivationKind K>
void row_activation_grad(
    T* dz,
    const T* dy,
    const T* y,
    const opmath_t<T>* a,
    const opmath_t<T>* mean,
    const opmath_t<T>* c0,
    opmath_t<T> slope,
    int64_t C) {
  using acc_t = opmath_t<T>;
  int64_t c = 0;
  if constexpr (kVectorized<T>) {
    using Vec = at::vec::Vectorized<T>;
    for (; c + Vec::size() <= C; c += Vec::size()) {
      const Vec z = at::vec::fmadd(
          Vec::loadu(y + c) - Vec::loadu(mean + c), Vec::loadu(a + c),
          Vec::loadu(c0 + c));
      (Vec::loadu(dy + c) * vec_activation_derivative<K>(z, slope))
          .store(dz + c);
    }
  }
  for (; c < C; ++c) {
    const acc_t z = a[c] * (acc_t(y[c]) - mean[c]) + c0[c];
    dz[c] = T(acc_t(dy[c]) * activation_derivative(K, slope, z));
  }
}

// ---------------------------------------------------------------------------
// Drivers over a whole tensor.

// Channels-last reductions walk rows in blocks of about 32K values (128 KiB
// of float): small enough to stay in cache for a second look, large enough
// to amortize the per-block work. The block size depends only on C, so the
// order of every sum is fixed.
inline int64_t rows_per_block(int64_t channels) {
  return std::clamp<int64_t>(32768 / std::max<int64_t>(channels, 1), 8, 1024);
}

// Channels-last reduction: `block_fn(acc, r_begin, r_end)` reduces rows
// [r_begin, r_end) into `width` opmath values (e.g. K values per channel).
// Returns the per-block results, block after block, in double.
template <typename acc_t, typename BlockFn>
std::vector<double> reduce_row_blocks(
    int64_t rows,
    int64_t block_rows,
    int64_t width,
    const BlockFn& block_fn) {
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  std::vector<double> partial(blocks * width);
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> acc(width);
    for (int64_t b = b_begin; b < b_end; ++b) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      block_fn(acc.data(), b * block_rows, std::min(rows, (b + 1) * block_rows));
      std::copy(acc.begin(), acc.end(), partial.begin() + b * width);
    }
  });
  return partial;
}

// Running (count, mean, M2) of one channel, merged with Chan et al.'s
// parallel formula: the exact statistics of the union of two parts.
struct MeanM2 {
  double count = 0, mean = 0, m2 = 0;
  void merge(double n, double part_mean, double part_m2) {
    const double total = count + n;
    const double delta = part_mean - mean;
    mean += delta * n / total;
    m2 += part_m2 + delta * delta * count * n / total;
    count = total;
  }
};

// Per-channel mean and biased variance of y, in one pass over memory: each
// plane (NCHW) or block of rows (channels_last) gets its exact two-pass mean
// and sum of squared deviations while it is in cache, and the parts are
// merged in double. This keeps the accuracy of a two-pass variance (no
// E[x^2] - E[x]^2 cancellation) at the memory traffic of one pass.
//
// A part's mean is its first value plus the mean of the values less it.
// Summing the values themselves rounds the sum (in float for float32), so
// the mean of equal values x could come out an ulp or so off x: then every
// deviation is ~1e-7 * |x|, whose square overflows float32 once |x| is
// above ~1e19 (a constant 1e30 channel got var = inf, invstd = 0 and an
// infinite running_var, where nn.BatchNorm2d gives 0). With the shift,
// equal values give their exact mean and deviations of exactly 0, and the
// sum of the deviations is as accurate as the spread, not the magnitude.
template <typename T>
void batch_mean_var(const at::Tensor& y, at::Tensor& mean, at::Tensor& var) {
  using acc_t = opmath_t<T>;
  const ChannelLayout L = channel_layout(y);
  const int64_t C = L.channels, HW = L.spatial;
  const T* data = y.const_data_ptr<T>();
  acc_t* mean_out = mean.data_ptr<acc_t>();
  acc_t* var_out = var.data_ptr<acc_t>();

  if (!L.channels_last) {
    at::parallel_for(0, C, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        MeanM2 stats;
        for (int64_t n = 0; n < L.batch; ++n) {
          const T* plane = data + (n * C + c) * HW;
          const acc_t pivot = acc_t(plane[0]);
          const acc_t plane_mean =
              pivot + span_sum_shifted(plane, HW, pivot) / acc_t(HW);
          stats.merge(
              HW, plane_mean, span_sum_sq_centered(plane, HW, plane_mean));
        }
        mean_out[c] = static_cast<acc_t>(stats.mean);
        var_out[c] = static_cast<acc_t>(stats.m2 / stats.count);
      }
    });
    return;
  }

  const int64_t rows = L.values_per_channel();
  const int64_t block_rows = rows_per_block(C);
  // Per block: C means, then C sums of squared deviations from them. The
  // block's first row is the pivot of its shifted sums.
  const std::vector<double> partial = reduce_row_blocks<acc_t>(
      rows, block_rows, 2 * C, [&](acc_t* acc, int64_t r0, int64_t r1) {
        acc_t* block_mean = acc;
        acc_t* block_m2 = acc + C;
        const T* pivot = data + r0 * C;
        for (int64_t r = r0 + 1; r < r1; ++r) {
          row_add_shifted(block_mean, data + r * C, pivot, C);
        }
        const acc_t inv_rows = acc_t(1) / acc_t(r1 - r0);
        for (int64_t c = 0; c < C; ++c) {
          block_mean[c] = acc_t(pivot[c]) + block_mean[c] * inv_rows;
        }
        for (int64_t r = r0; r < r1; ++r) {
          row_add_sq_centered(block_m2, data + r * C, block_mean, C);
        }
      });
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  for (int64_t c = 0; c < C; ++c) {
    MeanM2 stats;
    for (int64_t b = 0; b < blocks; ++b) {
      const double n = static_cast<double>(
          std::min(rows, (b + 1) * block_rows) - b * block_rows);
      stats.merge(n, partial[b * 2 * C + c], partial[b * 2 * C + C + c]);
    }
    mean_out[c] = static_cast<acc_t>(stats.mean);
    var_out[c] = static_cast<acc_t>(stats.m2 / stats.count);
  }
}

// Per-channel sum(dy) and sum(dy * (y - mean)), one pass over dy and y (both
// in the same layout). Results are opmath tensors of y.size(1) elements.
template <typename T>
void batch_grad_sums(
    const at::Tensor& dy,
    const at::Tensor& y,
    const at::Tensor& mean,
    at::Tensor& sum_dy,
    at::Tensor& sum_dy_xmu) {
  using acc_t = opmath_t<T>;
  const ChannelLayout L = channel_layout(y);
  check_walks_like(dy, L.channels_last, "dy");
  const int64_t C = L.channels, HW = L.spatial;
  const T* dy_data = dy.const_data_ptr<T>();
  const T* y_data = y.const_data_ptr<T>();
  const acc_t* mean_data = mean.const_data_ptr<acc_t>();
  acc_t* sum_dy_out = sum_dy.data_ptr<acc_t>();
  acc_t* sum_dot_out = sum_dy_xmu.data_ptr<acc_t>();

  if (!L.channels_last) {
    at::parallel_for(0, C, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        double s_dy = 0, s_dot = 0;
        for (int64_t n = 0; n < L.batch; ++n) {
          const int64_t offset = (n * C + c) * HW;
          const auto s = span_sum_and_dot_centered(
              dy_data + offset, y_data + offset, HW, mean_data[c]);
          s_dy += s[0];
          s_dot += s[1];
        }
        sum_dy_out[c] = static_cast<acc_t>(s_dy);
        sum_dot_out[c] = static_cast<acc_t>(s_dot);
      }
    });
    return;
  }

  const int64_t rows = L.values_per_channel();
  const int64_t block_rows = rows_per_block(C);
  const std::vector<double> partial = reduce_row_blocks<acc_t>(
      rows, block_rows, 2 * C, [&](acc_t* acc, int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          row_add_sum_and_dot_centered(
              acc, acc + C, dy_data + r * C, y_data + r * C, mean_data, C);
        }
      });
  std::vector<double> sums(2 * C, 0.0);
  for (size_t i = 0; i < partial.size(); ++i) {
    sums[i % (2 * C)] += partial[i];
  }
  for (int64_t c = 0; c < C; ++c) {
    sum_dy_out[c] = static_cast<acc_t>(sums[c]);
    sum_dot_out[c] = static_cast<acc_t>(sums[C + c]);
  }
}

// The elementwise passes' walk, in parallel: plane_fn(p, c) for each
// (image, channel) plane p = n * C + c of an NCHW tensor, or row_fn(r) for
// each row r of a channels_last one.
template <typename PlaneFn, typename RowFn>
void for_each_plane_or_row(
    const ChannelLayout& L,
    const PlaneFn& plane_fn,
    const RowFn& row_fn) {
  if (!L.channels_last) {
    const int64_t grain =
        std::max<int64_t>(1, at::internal::GRAIN_SIZE / L.spatial);
    at::parallel_for(0, L.batch * L.channels, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        plane_fn(p, p % L.channels);
      }
    });
  } else {
    const int64_t grain =
        std::max<int64_t>(1, at::internal::GRAIN_SIZE / L.channels);
    at::parallel_for(
        0, L.values_per_channel(), grain, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            row_fn(r);
          }
        });
  }
}

// Per channel, elementwise: out = f(a[c] * ((u - mu[c]) + b[c] * (v - m[c]))
// + c0[c]), the b term when `centered` = {v, b, m} is given (kernel_table.h
// says why in this order), f the activation (identity with the b term: the
// backward's grad-input pass). a, mu, b, m, c0 are 1-D opmath tensors; out
// may alias u or v.
template <typename T>
void channel_affine(
    at::Tensor& out,
    const at::Tensor& u,
    const at::Tensor& a,
    const at::Tensor& mu,
    const at::Tensor& c0,
    const CenteredTerm* centered,
    const Activation& act) {
  using acc_t = opmath_t<T>;
  const ChannelLayout L = channel_layout(u);
  check_walks_like(out, L.channels_last, "out");
  if (centered != nullptr) {
    check_walks_like(centered->v, L.channels_last, "v");
    TORCH_INTERNAL_ASSERT(act.is_identity());
  }
  const int64_t C = L.channels, HW = L.spatial;
  T* out_data = out.data_ptr<T>();
  const T* u_data = u.const_data_ptr<T>();
  const T* v_data = centered ? centered->v.const_data_ptr<T>() : nullptr;
  const acc_t* a_data = a.const_data_ptr<acc_t>();
  const acc_t* mu_data = mu.const_data_ptr<acc_t>();
  const acc_t* b_data = centered ? centered->b.const_data_ptr<acc_t>() : nullptr;
  const acc_t* m_data = centered ? centered->m.const_data_ptr<acc_t>() : nullptr;
  const acc_t* c_data = c0.const_data_ptr<acc_t>();
  const acc_t slope = static_cast<acc_t>(act.negative_slope);

  auto run = [&](auto has_v, auto kind) {
    constexpr bool HasV = decltype(has_v)::value;
    constexpr ActivationKind K = decltype(kind)::value;
    for_each_plane_or_row(
        L,
        [&](int64_t p, int64_t c) {
          span_affine<T, HasV, K>(
              out_data + p * HW, u_data + p * HW, a_data[c], mu_data[c],
              HasV ? v_data + p * HW : nullptr, HasV ? b_data[c] : acc_t(0),
              HasV ? m_data[c] : acc_t(0), c_data[c], slope, HW);
        },
        [&](int64_t r) {
          row_affine<T, HasV, K>(
              out_data + r * C, u_data + r * C, a_data, mu_data,
              HasV ? v_data + r * C : nullptr, b_data, m_data, c_data, slope,
              C);
        });
  };
  if (centered != nullptr) {
    run(std::true_type{}, ActivationTag<ActivationKind::identity>{});
  } else {
    dispatch_activation(
        act.kind, [&](auto kind) { run(std::false_type{}, kind); });
  }
}

// Per channel, elementwise: dz = dy * f'(a[c] * (y - mean[c]) + c0[c]), the
// activation's input z computed as channel_affine computes it. dy, y and dz
// are dense in one layout; dz may alias dy.
template <typename T>
void activation_grad(
    at::Tensor& dz,
    const at::Tensor& dy,
    const at::Tensor& y,
    const at::Tensor& a,
    const at::Tensor& mean,
    const at::Tensor& c0,
    const Activation& act) {
  using acc_t = opmath_t<T>;
  const ChannelLayout L = channel_layout(y);
  check_walks_like(dy, L.channels_last, "dy");
  check_walks_like(dz, L.channels_last, "dz");
  const int64_t C = L.channels, HW = L.spatial;
  T* dz_data = dz.data_ptr<T>();
  const T* dy_data = dy.const_data_ptr<T>();
  const T* y_data = y.const_data_ptr<T>();
  const acc_t* a_data = a.const_data_ptr<acc_t>();
  const acc_t* mean_data = mean.const_data_ptr<acc_t>();
  const acc_t* c_data = c0.const_data_ptr<acc_t>();
  const acc_t slope = static_cast<acc_t>(act.negative_slope);

  dispatch_activation(act.kind, [&](auto kind) {
    constexpr ActivationKind K = decltype(kind)::value;
    for_each_plane_or_row(
        L,
        [&](int64_t p, int64_t c) {
          span_activation_grad<T, K>(
              dz_data + p * HW, dy_data + p * HW, y_data + p * HW, a_data[c],
              mean_data[c], c_data[c], slope, HW);
        },
        [&](int64_t r) {
          row_activation_grad<T, K>(
              dz_data + r * C, dy_data + r * C, y_data + r * C, a_data,
              mean_data, c_data, slope, C);
        });
  });
}

// ---------------------------------------------------------------------------
// Entry points of this copy: dtype dispatch over the templates above.

#define CONVBN_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

inline void dispatch_batch_mean_var(
    const at::Tensor& y,
    at::Tensor& mean,
    at::Tensor& var) {
  CONVBN_DISPATCH_FLOATING(y.scalar_type(), "convbn_batch_mean_var", [&] {
    batch_mean_var<scalar_t>(y, mean, var);
  });
}

inline void dispatch_batch_grad_sums(
    const at::Tensor& dy,
    const at::Tensor& y,
    const at::Tensor& mean,
    at::Tensor& sum_dy,
    at::Tensor& sum_dy_xmu) {
  CONVBN_DISPATCH_FLOATING(y.scalar_type(), "convbn_batch_grad_sums", [&] {
    batch_grad_sums<scalar_t>(dy, y, mean, sum_dy, sum_dy_xmu);
  });
}

inline void dispatch_channel_affine(
    at::Tensor& out,
    const at::Tensor& u,
    const at::Tensor& a,
    const at::Tensor& mu,
    const at::Tensor& c0,
    const CenteredTerm* centered,
    const Activation& act) {
  CONVBN_DISPATCH_FLOATING(u.scalar_type(), "convbn_channel_affine", [&] {
    channel_affine<scalar_t>(out, u, a, mu, c0, centered, act);
  });
}

inline void dispatch_activation_grad(
    at::Tensor& dz,
    const at::Tensor& dy,
    const at::Tensor& y,
    const at::Tensor& a,
    const at::Tensor& mean,
    const at::Tensor& c0,
    const Activation& act) {
  CONVBN_DISPATCH_FLOATING(y.scalar_type(), "convbn_activation_grad", [&] {
    activation_grad<scalar_t>(dz, dy, y, a, mean, c0, act);
  });
}

#undef CONVBN_DISPATCH_FLOATING

inline const KernelTable& kernel_table() {
  static const KernelTable table{
      &dispatch_batch_mean_var, &dispatch_batch_grad_sums,
      &dispatch_channel_affine, &dispatch_activation_grad};
  return table;
}

} // namespace CONVBN_CPU_ISA
} // namespace cpu
} // namespace convbn
