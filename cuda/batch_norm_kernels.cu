// The CUDA batch-norm kernels: the kernel table (kernel_table.h) that the
// device-generic driver (csrc/train_driver.cpp) runs for conv_bn_train,
// linear_bn_train and their backwards on CUDA. conv_bn_train_kernel.cu and
// linear_bn_train_kernel.cu register those ops. The convolution and the
// matmul themselves are cuDNN's and cuBLAS's (ATen).
//
//   batch_mean_var    per-channel Welford statistics, warp-shuffle merges
//   batch_grad_sums   per-channel sum(dy), sum(dy * (y - mean)), one pass
//   channel_affine    elementwise a*u + c (+ b*(v - m)), in place where the
//                     driver asks (normalization into the conv output's
//                     buffer; grad-input into the recomputed conv output)
//
// Each reduction has an NCHW kernel (a block walks a contiguous stretch of
// one channel) and a channels_last kernel (a block's lanes span adjacent
// channels, so every load is coalesced). Blocks reduce chunks of a channel
// into partials that a second kernel merges in a fixed order: results do
// not depend on scheduling. Accumulation is in at::acc_type (float for
// float16/bfloat16/float32, double for float64).
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
#include <limits>

namespace convbn {
namespace cuda {
namespace {

constexpr int kWarp = 32;

// (c10 rather than ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE
// headers this file does not need.)
cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

int64_t multiprocessor_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
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

// --- NCHW: grid (C, chunks); block b of channel c walks values
// [b * chunk, (b + 1) * chunk) of the channel's N * HW, plane by plane. ----

constexpr int kNchwThreads = 512;

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
  const int64_t begin = blockIdx.y * chunk;
  const int64_t end = std::min<int64_t>(begin + chunk, batch * spatial);
  State s = op.identity();
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t n = i / spatial;
    const int64_t hw = i - n * spatial;
    op.push(s, (n * channels + c) * spatial + hw, c);
  }
  // State is a trivial aggregate, so a typed __shared__ array is allowed
  // and correctly aligned (a reinterpreted char buffer would not be).
  __shared__ State shared[kNchwThreads / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  s = warp_reduce(op, s);
  if (lane == 0) {
    shared[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarp;
    s = lane < warps ? shared[lane] : op.identity();
    s = warp_reduce(op, s);
    if (lane == 0) {
      partial[blockIdx.y * channels + c] = s;
    }
  }
}

// --- channels_last: grid (ceil(C / 32), chunks); block (32, kRowThreads):
// lane x owns channel 32 * blockIdx.x + x, lanes y stride over the rows of
// chunk blockIdx.y. ------------------------------------------------------------

constexpr int kRowThreads = 16;

template <typename Op>
__global__ void reduce_channels_last_kernel(
    Op op,
    int64_t rows,
    int64_t channels,
    int64_t chunk,
    typename Op::State* partial) {
  using State = typename Op::State;
  const int64_t c = blockIdx.x * kWarp + threadIdx.x;
  const int64_t begin = blockIdx.y * chunk;
  const int64_t end = std::min<int64_t>(begin + chunk, rows);
  State s = op.identity();
  if (c < channels) {
    for (int64_t r = begin + threadIdx.y; r < end; r += kRowThreads) {
      op.push(s, r * channels + c, c);
    }
  }
  __shared__ State shared[kWarp * kRowThreads];
  shared[threadIdx.y * kWarp + threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    for (int y = 1; y < kRowThreads; ++y) {
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
  const int64_t per_channel = batch * spatial;
  const bool channels_last =
      t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const cudaStream_t stream = current_stream();
  const int64_t sms = multiprocessor_count();

  const int64_t channel_blocks =
      channels_last ? (channels + kWarp - 1) / kWarp : channels;
  const int64_t values_per_block_min =
      channels_last ? kRowThreads * 32 : kNchwThreads * 8;
  // About four waves of blocks, each with enough values to be worth it.
  const int64_t chunks = std::max<int64_t>(
      1,
      std::min<int64_t>(
          (4 * sms + channel_blocks - 1) / channel_blocks,
          (per_channel + values_per_block_min - 1) / values_per_block_min));
  TORCH_CHECK(chunks <= 65535, "convbn: too many chunks for a CUDA grid");
  const int64_t chunk = (per_channel + chunks - 1) / chunks;

  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(chunks * channels * sizeof(State))},
      t.options().dtype(at::kByte));
  State* partial = reinterpret_cast<State*>(workspace.data_ptr());
  if (channels_last) {
    const dim3 grid(channel_blocks, chunks);
    const dim3 block(kWarp, kRowThreads);
    reduce_channels_last_kernel<<<grid, block, 0, stream>>>(
        op, per_channel, channels, chunk, partial);
  } else {
    const dim3 grid(channels, chunks);
    reduce_nchw_kernel<<<grid, kNchwThreads, 0, stream>>>(
        op, batch, channels, spatial, chunk, partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  constexpr int kMergeThreads = 128;
  merge_partials_kernel<<<
      (channels + kMergeThreads - 1) / kMergeThreads, kMergeThreads, 0,
      stream>>>(op, partial, chunks, channels, finish);
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

template <typename scalar_t, typename acc_t, typename index_t, bool HasV, bool ChannelsLast>
__global__ void channel_affine_kernel(
    scalar_t* out,
    const scalar_t* u,
    const acc_t* a,
    const scalar_t* v,
    const acc_t* b,
    const acc_t* m,
    const acc_t* c0,
    index_t numel,
    index_t channels,
    index_t spatial) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < numel; i += stride) {
    const index_t c = ChannelsLast ? i % channels : (i / spatial) % channels;
    acc_t r = a[c] * static_cast<acc_t>(u[i]) + c0[c];
    if constexpr (HasV) {
      r += b[c] * (static_cast<acc_t>(v[i]) - m[c]);
    }
    out[i] = static_cast<scalar_t>(r);
  }
}

void channel_affine(
    at::Tensor& out,
    const at::Tensor& u,
    const at::Tensor& a,
    const at::Tensor& c0,
    const CenteredTerm* centered) {
  const int64_t numel = u.numel();
  const int64_t channels = u.size(1);
  const int64_t spatial = u.size(2) * u.size(3);
  const bool channels_last =
      u.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const cudaStream_t stream = current_stream();
  constexpr int kThreads = 256;
  const int64_t sms = multiprocessor_count();
  const int64_t blocks = std::min<int64_t>(
      (numel + kThreads - 1) / kThreads, sms * 32);
  CONVBN_CUDA_DISPATCH(u.scalar_type(), "convbn_channel_affine_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    auto launch = [&](auto index_tag, auto has_v, auto cl) {
      using index_t = decltype(index_tag);
      constexpr bool HasV = decltype(has_v)::value;
      constexpr bool CL = decltype(cl)::value;
      channel_affine_kernel<scalar_t, acc_t, index_t, HasV, CL>
          <<<blocks, kThreads, 0, stream>>>(
              out.data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
              a.const_data_ptr<acc_t>(),
              HasV ? centered->v.const_data_ptr<scalar_t>() : nullptr,
              HasV ? centered->b.const_data_ptr<acc_t>() : nullptr,
              HasV ? centered->m.const_data_ptr<acc_t>() : nullptr,
              c0.const_data_ptr<acc_t>(), static_cast<index_t>(numel),
              static_cast<index_t>(channels), static_cast<index_t>(spatial));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto with_layout = [&](auto index_tag, auto has_v) {
      if (channels_last) {
        launch(index_tag, has_v, std::true_type{});
      } else {
        launch(index_tag, has_v, std::false_type{});
      }
    };
    auto with_centered = [&](auto index_tag) {
      if (centered != nullptr) {
        with_layout(index_tag, std::true_type{});
      } else {
        with_layout(index_tag, std::false_type{});
      }
    };
    // 32-bit indexing where every index fits, 64-bit past 2^31 elements.
    if (numel <= std::numeric_limits<int32_t>::max()) {
      with_centered(int32_t{0});
    } else {
      with_centered(int64_t{0});
    }
  });
}

#undef CONVBN_CUDA_DISPATCH

} // namespace

const KernelTable& kernels() {
  static const KernelTable table{&batch_mean_var, &batch_grad_sums, &channel_affine};
  return table;
}

} // namespace cuda
} // namespace convbn
