// The CUDA batch-norm kernels: the kernel table (kernel_table.h) that the
// device-generic driver (csrc/train_driver.cpp) runs for conv_bn_train,
// linear_bn_train and their backwards on CUDA. conv_bn_train_kernel.cu and
// linear_bn_train_kernel.cu register those ops. The convolution and the
// matmul themselves are cuDNN's and cuBLAS's (ATen).
//
//   batch_mean_var    per-channel Welford statistics, warp-shuffle merges
//   batch_grad_sums   per-channel sum(dy), sum(dy * (y - mean)), one pass
//   channel_affine    elementwise f(a*((u - mu) + b*(v - m)) + c), in place
//                     where the driver asks (normalization and activation
//                     into the conv output's buffer; grad-input into the
//                     recomputed conv output)
//   activation_grad   elementwise dy * f'(a*(y - mean) + c): the gradient
//                     at the activation's input, from the conv output
//
// Each reduction has an NCHW kernel (a block walks a chunk of one channel,
// plane by plane) and a channels_last kernel (a block's lanes span adjacent
// channels, so every load is coalesced). Blocks reduce chunks of a channel
// into partials that a second kernel merges in a fixed order: results do
// not depend on scheduling. Accumulation is in at::acc_type (float for
// float16/bfloat16/float32, double for float64). Launch geometry and the
// per-thread walks are in index_walk.h (64-bit counters, no division per
// element), which tests/cpp checks on the CPU.
#include "index_walk.h"
#include "kernel_table.h"

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <string>

namespace convbn {
namespace detail {
// csrc/build_info.cpp: this build's CUDA lines of convbn::build_info().
extern const char* cuda_build_info;
} // namespace detail
namespace cuda {
namespace {

constexpr int kWarp = static_cast<int>(kWarpSize);

// (c10 rather than ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE
// headers this file does not need.)
cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

// The current device's multiprocessor count, asked of the driver once per
// device (0 = not asked yet; two threads asking at once store the same).
int64_t multiprocessor_count() {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> counts{};
  const c10::DeviceIndex device = c10::cuda::current_device();
  TORCH_INTERNAL_ASSERT(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS);
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(
        &count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

__device__ ThreadCoord this_thread() {
  return {threadIdx.x, threadIdx.y, blockIdx.x, blockIdx.y};
}

// --- Reduction states ------------------------------------------------------

// Welford's running (count, mean, M2), merged with Chan's formula.
template <typename acc_t>
struct WelfordState {
  acc_t mean;
  acc_t m2;
  int64_t count;
};

template <typename scalar_t, typename acc_t>
struct WelfordOp {
  using State = WelfordState<acc_t>;
  const scalar_t* y;

  __device__ State identity() const {
    return {acc_t(0), acc_t(0), 0};
  }
  __device__ void push(State& s, int64_t offset, int64_t /*channel*/) const {
    const acc_t x = static_cast<acc_t>(y[offset]);
    s.count += 1;
    const acc_t delta = x - s.mean;
    s.mean += delta / static_cast<acc_t>(s.count);
    s.m2 += delta * (x - s.mean);
  }
  __device__ State combine(const State& a, const State& b) const {
    if (b.count == 0) {
      return a;
    }
    if (a.count == 0) {
      return b;
    }
    const int64_t n = a.count + b.count;
    const acc_t fraction = static_cast<acc_t>(b.count) / static_cast<acc_t>(n);
    const acc_t delta = b.mean - a.mean;
    return {
        a.mean + delta * fraction,
        a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.count) * fraction,
        n};
  }
  __device__ State shfl_down(const State& s, int offset) const {
    return {
        __shfl_down_sync(0xffffffff, s.mean, offset),
        __shfl_down_sync(0xffffffff, s.m2, offset),
        __shfl_down_sync(0xffffffff, static_cast<long long>(s.count), offset)};
  }
};

// (sum(dy), sum(dy * (y - mean[c]))).
template <typename acc_t>
struct GradSumsState {
  acc_t sum_dy;
  acc_t sum_dy_xmu;
};

template <typename scalar_t, typename acc_t>
struct GradSumsOp {
  using State = GradSumsState<acc_t>;
  const scalar_t* dy;
  const scalar_t* y;
  const acc_t* mean;

  __device__ State identity() const {
    return {acc_t(0), acc_t(0)};
  }
  __device__ void push(State& s, int64_t offset, int64_t channel) const {
    const acc_t g = static_cast<acc_t>(dy[offset]);
    s.sum_dy += g;
    s.sum_dy_xmu += g * (static_cast<acc_t>(y[offset]) - mean[channel]);
  }
  __device__ State combine(const State& a, const State& b) const {
    return {a.sum_dy + b.sum_dy, a.sum_dy_xmu + b.sum_dy_xmu};
  }
  __device__ State shfl_down(const State& s, int offset) const {
    return {
        __shfl_down_sync(0xffffffff, s.sum_dy, offset),
        __shfl_down_sync(0xffffffff, s.sum_dy_xmu, offset)};
  }
};

template <typename Op>
__device__ typename Op::State warp_reduce(const Op& op, typename Op::State s) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    s = op.combine(s, op.shfl_down(s, offset));
  }
  return s;
}

// Reduces the flat thread's state over the block; thread 0 of warp 0 gets
// the block's result. (State is a trivial aggregate, so a typed __shared__
// array is allowed and correctly aligned; a reinterpreted char buffer would
// not be.)
template <typename Op, int kMaxThreads>
__device__ typename Op::State block_reduce(const Op& op, typename Op::State s) {
  using State = typename Op::State;
  __shared__ State shared[kMaxThreads / kWarp];
  const int flat = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = flat % kWarp;
  const int warp = flat / kWarp;
  s = warp_reduce(op, s);
  if (lane == 0) {
    shared[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x * blockDim.y / kWarp;
    s = lane < warps ? shared[lane] : op.identity();
    s = warp_reduce(op, s);
  }
  return s;
}

// NCHW: grid (C, chunks); block (x, y) reduces values
// [blockIdx.y * chunk, (blockIdx.y + 1) * chunk) of channel blockIdx.x's
// N * HW, threads y over its planes, threads x over a plane's values.
template <typename Op>
__global__ void reduce_nchw_kernel(
    Op op,
    int64_t batch,
    int64_t channels,
    int64_t spatial,
    int64_t chunk,
    typename Op::State* partial) {
  using State = typename Op::State;
  const int64_t c = blockIdx.x;
  const ChunkRange range = chunk_range(blockIdx.y, chunk, batch * spatial);
  State s = op.identity();
  walk_channel_chunk_nchw(
      range.begin, range.end, c, channels, spatial, threadIdx.x, threadIdx.y, blockDim.x,
      blockDim.y, [&](int64_t offset) { op.push(s, offset, c); });
  s = block_reduce<Op, kNchwReduceThreads>(op, s);
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    partial[blockIdx.y * channels + c] = s;
  }
}

// channels_last: grid (ceil(C / 32), chunks); block (32, kRowsPerBlock):
// lane x owns channel 32 * blockIdx.x + x, lanes y stride over the rows of
// chunk blockIdx.y.
template <typename Op>
__global__ void reduce_channels_last_kernel(
    Op op,
    int64_t rows,
    int64_t channels,
    int64_t chunk,
    typename Op::State* partial) {
  using State = typename Op::State;
  const int64_t c = lane_channel(blockIdx.x, threadIdx.x);
  const ChunkRange range = chunk_range(blockIdx.y, chunk, rows);
  State s = op.identity();
  if (c < channels) {
    walk_channel_chunk_rows(
        range.begin, range.end, c, channels, threadIdx.y, kRowsPerBlock,
        [&](int64_t offset) { op.push(s, offset, c); });
  }
  __shared__ State shared[kWarp * kRowsPerBlock];
  shared[threadIdx.y * kWarp + threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    for (int y = 1; y < kRowsPerBlock; ++y) {
      s = op.combine(s, shared[y * kWarp + threadIdx.x]);
    }
    partial[blockIdx.y * channels + c] = s;
  }
}

// One thread per channel merges its chunks in order.
template <typename Op, typename Finish>
__global__ void merge_partials_kernel(
    Op op,
    const typename Op::State* partial,
    int64_t chunks,
    int64_t channels,
    Finish finish) {
  const int64_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) {
    return;
  }
  typename Op::State s = op.identity();
  for (int64_t k = 0; k < chunks; ++k) {
    s = op.combine(s, partial[k * channels + c]);
  }
  finish(c, s);
}

template <typename acc_t>
struct FinishMeanVar {
  acc_t* mean;
  acc_t* var;
  __device__ void operator()(int64_t c, const WelfordState<acc_t>& s) const {
    mean[c] = s.mean;
    var[c] = s.m2 / static_cast<acc_t>(s.count);
  }
};

template <typename acc_t>
struct FinishGradSums {
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;
  __device__ void operator()(int64_t c, const GradSumsState<acc_t>& s) const {
    sum_dy[c] = s.sum_dy;
    sum_dy_xmu[c] = s.sum_dy_xmu;
  }
};

// Runs the two-stage reduction of `op` over the 4-D tensor `t` (its layout
// decides the kernel) and hands each channel's result to `finish`.
template <typename Op, typename Finish>
void reduce_per_channel(const at::Tensor& t, const Op& op, const Finish& finish) {
  using State = typename Op::State;
  const int64_t batch = t.size(0), channels = t.size(1);
  const int64_t spatial = t.size(2) * t.size(3);
  const bool channels_last = walks_channels_last(t);
  const cudaStream_t stream = current_stream();
  const ReductionLaunch geometry = reduction_launch(
      batch, channels, spatial, channels_last, multiprocessor_count());
  const Launch2d& l = geometry.launch;
  TORCH_CHECK(
      l.grid_y <= kMaxGridY && l.grid_x <= std::numeric_limits<int32_t>::max(),
      "convbn: a CUDA grid of ", l.grid_x, " x ", l.grid_y, " blocks is "
      "over CUDA's limits (", channels, " channels)");
  const int64_t chunks = l.grid_y;

  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(chunks * channels * sizeof(State))},
      t.options().dtype(at::kByte));
  State* partial = reinterpret_cast<State*>(workspace.data_ptr());
  const dim3 grid(l.grid_x, l.grid_y);
  const dim3 block(l.block_x, l.block_y);
  if (channels_last) {
    reduce_channels_last_kernel<<<grid, block, 0, stream>>>(
        op, batch * spatial, channels, geometry.chunk, partial);
  } else {
    reduce_nchw_kernel<<<grid, block, 0, stream>>>(
        op, batch, channels, spatial, geometry.chunk, partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  constexpr int kMergeThreads = 128;
  merge_partials_kernel<<<
      ceil_div(channels, kMergeThreads), kMergeThreads, 0, stream>>>(
      op, partial, chunks, channels, finish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// --- Kernel table entries --------------------------------------------------

#define CONVBN_CUDA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

void batch_mean_var(const at::Tensor& y, at::Tensor& mean, at::Tensor& var) {
  CONVBN_CUDA_DISPATCH(y.scalar_type(), "convbn_batch_mean_var_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    reduce_per_channel(
        y, WelfordOp<scalar_t, acc_t>{y.const_data_ptr<scalar_t>()},
        FinishMeanVar<acc_t>{mean.data_ptr<acc_t>(), var.data_ptr<acc_t>()});
  });
}

void batch_grad_sums(
    const at::Tensor& dy,
    const at::Tensor& y,
    const at::Tensor& mean,
    at::Tensor& sum_dy,
    at::Tensor& sum_dy_xmu) {
  // dy is read at y's offsets.
  check_walks_like(dy, walks_channels_last(y), "dy");
  CONVBN_CUDA_DISPATCH(y.scalar_type(), "convbn_batch_grad_sums_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    reduce_per_channel(
        y,
        GradSumsOp<scalar_t, acc_t>{
            dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
            mean.const_data_ptr<acc_t>()},
        FinishGradSums<acc_t>{
            sum_dy.data_ptr<acc_t>(), sum_dy_xmu.data_ptr<acc_t>()});
  });
}

// out = f(a[c] * ((u - mu[c]) (+ b[c] * (v - m[c]))) + c0[c]), elementwise,
// in this order: every intermediate stays of the size of an input or of the
// result (kernel_table.h, CenteredTerm); f is the activation K. The walk
// (index_walk.h) says when the channel changes, and the coefficients are
// loaded then: once per plane (NCHW) or per thread (channels_last).
template <typename scalar_t, typename acc_t, bool HasV, ActivationKind K>
__global__ void channel_affine_kernel(
    ElementwiseLaunch walk,
    scalar_t* out,
    const scalar_t* u,
    const acc_t* a,
    const acc_t* mu,
    const scalar_t* v,
    const acc_t* b,
    const acc_t* m,
    const acc_t* c0,
    acc_t slope) {
  acc_t channel_a = 0, channel_mu = 0, channel_b = 0, channel_m = 0,
        channel_c0 = 0;
  walk_elementwise(
      walk, this_thread(),
      [&](int64_t c) {
        channel_a = a[c];
        channel_mu = mu[c];
        channel_c0 = c0[c];
        if constexpr (HasV) {
          channel_b = b[c];
          channel_m = m[c];
        }
      },
      [&](int64_t offset) {
        acc_t t = static_cast<acc_t>(u[offset]) - channel_mu;
        if constexpr (HasV) {
          t += channel_b * (static_cast<acc_t>(v[offset]) - channel_m);
        }
        out[offset] = static_cast<scalar_t>(
            activation_forward(K, slope, channel_a * t + channel_c0));
      });
}

void channel_affine(
    at::Tensor& out,
    const at::Tensor& u,
    const at::Tensor& a,
    const at::Tensor& mu,
    const at::Tensor& c0,
    const CenteredTerm* centered,
    const Activation& act) {
  const bool channels_last = walks_channels_last(u);
  check_walks_like(out, channels_last, "out");
  if (centered != nullptr) {
    check_walks_like(centered->v, channels_last, "v");
    TORCH_INTERNAL_ASSERT(act.is_identity());
  }
  const cudaStream_t stream = current_stream();
  const ElementwiseLaunch walk = elementwise_launch(
      u.size(0), u.size(1), u.size(2) * u.size(3), channels_last,
      multiprocessor_count());
  const Launch2d& l = walk.launch;
  CONVBN_CUDA_DISPATCH(u.scalar_type(), "convbn_channel_affine_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    auto launch = [&](auto has_v, auto kind) {
      constexpr bool HasV = decltype(has_v)::value;
      constexpr ActivationKind K = decltype(kind)::value;
      channel_affine_kernel<scalar_t, acc_t, HasV, K>
          <<<dim3(l.grid_x, l.grid_y), dim3(l.block_x, l.block_y), 0, stream>>>(
              walk, out.data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
              a.const_data_ptr<acc_t>(), mu.const_data_ptr<acc_t>(),
              HasV ? centered->v.const_data_ptr<scalar_t>() : nullptr,
              HasV ? centered->b.const_data_ptr<acc_t>() : nullptr,
              HasV ? centered->m.const_data_ptr<acc_t>() : nullptr,
              c0.const_data_ptr<acc_t>(),
              static_cast<acc_t>(act.negative_slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (centered != nullptr) {
      launch(std::true_type{}, ActivationTag<ActivationKind::identity>{});
    } else {
      dispatch_activation(
          act.kind, [&](auto kind) { launch(std::false_type{}, kind); });
    }
  });
}

// dz = dy * f'(a[c] * (y - mean[c]) + c0[c]), elementwise, z computed as
// channel_affine_kernel computes it.
template <typename scalar_t, typename acc_t, ActivationKind K>
__global__ void activation_grad_kernel(
    ElementwiseLaunch walk,
    scalar_t* dz,
    const scalar_t* dy,
    const scalar_t* y,
    const acc_t* a,
    const acc_t* mean,
    const acc_t* c0,
    acc_t slope) {
  acc_t channel_a = 0, channel_mean = 0, channel_c0 = 0;
  walk_elementwise(
      walk, this_thread(),
      [&](int64_t c) {
        channel_a = a[c];
        channel_mean = mean[c];
        channel_c0 = c0[c];
      },
      [&](int64_t offset) {
        const acc_t z =
            channel_a * (static_cast<acc_t>(y[offset]) - channel_mean) +
            channel_c0;
        dz[offset] = static_cast<scalar_t>(
            static_cast<acc_t>(dy[offset]) *
            activation_derivative(K, slope, z));
      });
}

void activation_grad(
    at::Tensor& dz,
    const at::Tensor& dy,
    const at::Tensor& y,
    const at::Tensor& a,
    const at::Tensor& mean,
    const at::Tensor& c0,
    const Activation& act) {
  const bool channels_last = walks_channels_last(y);
  check_walks_like(dy, channels_last, "dy");
  check_walks_like(dz, channels_last, "dz");
  const cudaStream_t stream = current_stream();
  const ElementwiseLaunch walk = elementwise_launch(
      y.size(0), y.size(1), y.size(2) * y.size(3), channels_last,
      multiprocessor_count());
  const Launch2d& l = walk.launch;
  CONVBN_CUDA_DISPATCH(y.scalar_type(), "convbn_activation_grad_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    dispatch_activation(act.kind, [&](auto kind) {
      constexpr ActivationKind K = decltype(kind)::value;
      activation_grad_kernel<scalar_t, acc_t, K>
          <<<dim3(l.grid_x, l.grid_y), dim3(l.block_x, l.block_y), 0, stream>>>(
              walk, dz.data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
              y.const_data_ptr<scalar_t>(), a.const_data_ptr<acc_t>(),
              mean.const_data_ptr<acc_t>(), c0.const_data_ptr<acc_t>(),
              static_cast<acc_t>(act.negative_slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

#undef CONVBN_CUDA_DISPATCH

} // namespace

const KernelTable& kernels() {
  static const KernelTable table{
      &batch_mean_var, &batch_grad_sums, &channel_affine, &activation_grad};
  return table;
}

namespace {

#define CONVBN_STRINGIFY(...) #__VA_ARGS__
#define CONVBN_EXPAND_STRINGIFY(...) CONVBN_STRINGIFY(__VA_ARGS__)
#ifdef __CUDA_ARCH_LIST__ // nvcc >= 11.5: the architectures of this file, e.g. 800,900
#define CONVBN_CUDA_ARCHITECTURES CONVBN_EXPAND_STRINGIFY(__CUDA_ARCH_LIST__)
#else
#define CONVBN_CUDA_ARCHITECTURES "unknown"
#endif

// This build's CUDA lines of convbn::build_info() (csrc/build_info.cpp).
const std::string cuda_build_info = "cuda=" + std::to_string(CUDART_VERSION / 1000) + "." +
    std::to_string(CUDART_VERSION % 1000 / 10) + "\ncuda_architectures=" CONVBN_CUDA_ARCHITECTURES "\n";
[[maybe_unused]] const bool cuda_build_info_registered = (detail::cuda_build_info = cuda_build_info.c_str(), true);

#undef CONVBN_CUDA_ARCHITECTURES
#undef CONVBN_EXPAND_STRINGIFY
#undef CONVBN_STRINGIFY

} // namespace
} // namespace cuda
} // namespace convbn
