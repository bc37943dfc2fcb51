// How the CUDA batch-norm kernels (batch_norm_kernels.cu) lay out their
// launches and which elements each thread visits. Plain C++ as well as
// CUDA, so tests/cpp/test_index_walk.cpp runs the same loops on the CPU for
// every thread of a launch and checks that each element is visited exactly
// once, by the thread that owns its channel, at sizes past 2^31 too.
//
// Two rules keep the kernels safe and memory-bound:
// - Every counter is 64-bit. A 32-bit grid-stride counter `i += stride`
//   wraps when numel is within one stride of 2^31, and the wrapped index
//   reads and writes out of bounds.
// - No division per element. An NCHW tensor is walked plane by plane
//   (sample n, channel c), as ATen's Normalization.cuh does: the channel is
//   found once per plane, and the values of a plane are contiguous.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#define CONVBN_HOST_DEVICE __host__ __device__
#else
#define CONVBN_HOST_DEVICE
#endif

namespace convbn {
namespace cuda {

constexpr int64_t kWarpSize = 32;
// CUDA's limit on gridDim.y.
constexpr int64_t kMaxGridY = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The smallest power of two >= n, clamped to [lo, hi] (both powers of two).
inline int64_t pow2_at_least(int64_t n, int64_t lo, int64_t hi) {
  int64_t p = lo;
  while (p < n && p < hi) {
    p *= 2;
  }
  return p;
}

// A 2-D launch: blocks of block_x * block_y threads, grid_x * grid_y blocks.
struct Launch2d {
  int64_t block_x, block_y, grid_x, grid_y;
};

// One thread of a Launch2d: threadIdx.{x,y} and blockIdx.{x,y}.
struct ThreadCoord {
  int64_t tx, ty, bx, by;
};

// --- Elementwise passes (channel_affine) ------------------------------------
// Each thread tells the kernel an element's channel through on_channel(c)
// (where it loads that channel's coefficients) before on_element(offset)
// for elements of that channel. Three walks:
//   kPlanes (NCHW): runs of H * W contiguous values, one per (sample,
//     channel) plane; threads y take planes, threads x a plane's values.
//     The channel is found once per plane.
//   kStridedChannels (channels_last): a flat grid-stride loop whose stride
//     is a multiple of C, so a thread's elements all have its first one's
//     channel: one modulo per thread, and every lane busy however small C.
//   kRows (channels_last, when no grid of a sensible size has a multiple of
//     C threads, i.e. C large and odd): rows of C values, the channel being
//     the position in the row.

constexpr int64_t kElementwiseThreads = 256;

enum class ElementwiseWalk { kPlanes, kStridedChannels, kRows };

struct ElementwiseLaunch {
  ElementwiseWalk walk;
  Launch2d launch;
  int64_t numel, channels;
  int64_t outer, inner; // kPlanes and kRows: runs and values per run
};

inline int64_t gcd(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  return a;
}

inline ElementwiseLaunch elementwise_launch(
    int64_t batch,
    int64_t channels,
    int64_t spatial,
    bool channels_last,
    int64_t multiprocessors) {
  const int64_t numel = batch * channels * spatial;
  // At most 32 blocks of 256 threads per multiprocessor; the loops stride
  // over the rest.
  const int64_t max_blocks = std::max<int64_t>(multiprocessors, 1) * 32;
  auto runs = [&](ElementwiseWalk walk, int64_t outer, int64_t inner) {
    const int64_t block_x =
        pow2_at_least(inner, kWarpSize, kElementwiseThreads);
    const int64_t block_y = kElementwiseThreads / block_x;
    const int64_t grid_x =
        std::max<int64_t>(std::min(ceil_div(inner, block_x), max_blocks), 1);
    const int64_t grid_y = std::min(
        {std::max<int64_t>(ceil_div(outer, block_y), 1),
         std::max<int64_t>(max_blocks / grid_x, 1), kMaxGridY});
    return ElementwiseLaunch{
        walk, {block_x, block_y, grid_x, grid_y}, numel, channels, outer,
        inner};
  };
  if (!channels_last) {
    return runs(ElementwiseWalk::kPlanes, batch * channels, spatial);
  }
  // Blocks per period: the fewest blocks whose threads number a multiple
  // of C.
  const int64_t period = channels / gcd(channels, kElementwiseThreads);
  if (period > max_blocks) {
    return runs(ElementwiseWalk::kRows, batch * spatial, channels);
  }
  const int64_t blocks = ceil_div(
      std::max<int64_t>(std::min(ceil_div(numel, kElementwiseThreads), max_blocks), 1),
      period) * period;
  return ElementwiseLaunch{
      ElementwiseWalk::kStridedChannels,
      {kElementwiseThreads, 1, blocks, 1}, numel, channels, 0, 0};
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename OnChannel, typename OnElement>
CONVBN_HOST_DEVICE inline void walk_elementwise(
    const ElementwiseLaunch& w,
    const ThreadCoord& thread,
    OnChannel&& on_channel,
    OnElement&& on_element) {
  const Launch2d& l = w.launch;
  const int64_t first = thread.bx * l.block_x + thread.tx;
  const int64_t x_step = l.grid_x * l.block_x;
  if (w.walk == ElementwiseWalk::kStridedChannels) {
    if (first >= w.numel) {
      return;
    }
    on_channel(first % w.channels); // x_step is a multiple of C
    for (int64_t i = first; i < w.numel; i += x_step) {
      on_element(i);
    }
    return;
  }
  if (first >= w.inner) {
    return; // no value of any run is this thread's
  }
  const int64_t y_step = l.grid_y * l.block_y;
  for (int64_t run = thread.by * l.block_y + thread.ty; run < w.outer;
       run += y_step) {
    const int64_t base = run * w.inner;
    if (w.walk == ElementwiseWalk::kPlanes) {
      on_channel(run % w.channels);
      for (int64_t i = first; i < w.inner; i += x_step) {
        on_element(base + i);
      }
    } else { // kRows
      for (int64_t i = first; i < w.inner; i += x_step) {
        on_channel(i);
        on_element(base + i);
      }
    }
  }
}

// --- Per-channel reductions (batch_mean_var, batch_grad_sums) ---------------
// Each channel's N * H * W values are split into `chunks` ranges of `chunk`
// values; each (channel block, chunk) block reduces its range into one
// partial per channel, and a second kernel merges the partials in order.
//   NCHW: grid (C, chunks), one channel per block; a chunk's values lie in
//     consecutive planes: threads y take planes, threads x a plane's values.
//   channels_last: grid (ceil(C / 32), chunks), block (32, 16): lane x owns
//     channel 32 * blockIdx.x + x (adjacent channels: coalesced loads),
//     lanes y stride over the chunk's rows.

constexpr int64_t kNchwReduceThreads = 512;
constexpr int64_t kRowsPerBlock = 16; // channels_last: block (32, 16)

struct ReductionLaunch {
  Launch2d launch; // grid_x: channel blocks; grid_y: chunks
  int64_t chunk; // values of a channel per chunk
};

inline ReductionLaunch reduction_launch(
    int64_t batch,
    int64_t channels,
    int64_t spatial,
    bool channels_last,
    int64_t multiprocessors) {
  const int64_t per_channel = batch * spatial;
  const int64_t channel_blocks =
      channels_last ? ceil_div(channels, kWarpSize) : channels;
  const int64_t min_values_per_block =
      channels_last ? kRowsPerBlock * 32 : kNchwReduceThreads * 8;
  // About four waves of blocks, each with enough values to be worth it.
  int64_t chunks = std::max<int64_t>(
      1,
      std::min(
          ceil_div(4 * std::max<int64_t>(multiprocessors, 1), channel_blocks),
          ceil_div(per_channel, min_values_per_block)));
  int64_t chunk = ceil_div(per_channel, chunks);
  if (!channels_last && chunks <= batch) {
    // Whole planes per chunk: no block starts or ends inside a plane.
    chunk = ceil_div(batch, chunks) * spatial;
  }
  chunks = std::max<int64_t>(ceil_div(per_channel, chunk), 1);
  Launch2d launch;
  if (channels_last) {
    launch = {kWarpSize, kRowsPerBlock, channel_blocks, chunks};
  } else {
    const int64_t block_x =
        pow2_at_least(spatial, kWarpSize, kNchwReduceThreads);
    launch = {block_x, kNchwReduceThreads / block_x, channel_blocks, chunks};
  }
  return {launch, chunk};
}

// The values [begin, end) of each channel that chunk `index` reduces.
struct ChunkRange {
  int64_t begin, end;
};

CONVBN_HOST_DEVICE inline ChunkRange chunk_range(
    int64_t index,
    int64_t chunk,
    int64_t per_channel) {
  const int64_t begin = index * chunk;
  return {begin, begin + chunk < per_channel ? begin + chunk : per_channel};
}

// channels_last: the channel that lane x of channel block `block` owns (the
// lane has nothing to do where it is >= C).
CONVBN_HOST_DEVICE inline int64_t lane_channel(int64_t block, int64_t lane) {
  return block * kWarpSize + lane;
}

// NCHW: the values [begin, end) of `channel` (of the channel's N * spatial),
// for thread (tx, ty) of a block_x * block_y block.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename OnElement>
CONVBN_HOST_DEVICE inline void walk_channel_chunk_nchw(
    int64_t begin,
    int64_t end,
    int64_t channel,
    int64_t channels,
    int64_t spatial,
    int64_t tx,
    int64_t ty,
    int64_t block_x,
    int64_t block_y,
    OnElement&& on_element) {
  if (begin >= end) {
    return;
  }
  const int64_t last_plane = (end - 1) / spatial;
  for (int64_t n = begin / spatial + ty; n <= last_plane; n += block_y) {
    const int64_t plane_start = n * spatial;
    const int64_t lo = begin > plane_start ? begin - plane_start : 0;
    const int64_t hi = end - plane_start < spatial ? end - plane_start : spatial;
    const int64_t base = (n * channels + channel) * spatial;
    for (int64_t hw = lo + tx; hw < hi; hw += block_x) {
      on_element(base + hw);
    }
  }
}

// channels_last: rows [begin, end) of `channel`, for lane y of block_y.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename OnElement>
CONVBN_HOST_DEVICE inline void walk_channel_chunk_rows(
    int64_t begin,
    int64_t end,
    int64_t channel,
    int64_t channels,
    int64_t ty,
    int64_t block_y,
    OnElement&& on_element) {
  for (int64_t r = begin + ty; r < end; r += block_y) {
    on_element(r * channels + channel);
  }
}

} // namespace cuda
} // namespace convbn
