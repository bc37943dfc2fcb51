// The CUDA kernels' launch geometry and per-thread walks (cuda/index_walk.h),
// run on the CPU for every thread of each launch: every element is visited
// exactly once, by a thread of its own channel, and no offset leaves the
// tensor, for odd small shapes and for tensors just below and past 2^31
// elements (where a 32-bit grid-stride counter wraps).
#include "index_walk.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace {

using convbn::cuda::chunk_range;
using convbn::cuda::elementwise_launch;
using convbn::cuda::lane_channel;
using convbn::cuda::ElementwiseLaunch;
using convbn::cuda::ElementwiseWalk;
using convbn::cuda::Launch2d;
using convbn::cuda::reduction_launch;
using convbn::cuda::ThreadCoord;
using convbn::cuda::walk_channel_chunk_nchw;
using convbn::cuda::walk_channel_chunk_rows;
using convbn::cuda::walk_elementwise;

struct Shape {
  int64_t batch, channels, spatial;
  int64_t numel() const {
    return batch * channels * spatial;
  }
};

std::string describe(const Shape& s, bool channels_last, int64_t sms) {
  return "shape (" + std::to_string(s.batch) + ", " +
      std::to_string(s.channels) + ", " + std::to_string(s.spatial) + ") " +
      (channels_last ? "channels_last" : "NCHW") + ", " +
      std::to_string(sms) + " multiprocessors";
}

// What the visits add up to. Small tensors count each element's visits;
// large ones (no room for a count per element) compare the number of
// visits and the sums of the offsets and of their squares (mod 2^64) with
// those of 0 .. numel-1, which a missed or repeated offset changes.
class Coverage {
 public:
  explicit Coverage(int64_t numel, bool per_element)
      : numel_(numel), per_element_(per_element) {
    if (per_element_) {
      visits_.assign(static_cast<size_t>(numel), 0);
    }
  }

  void visit(int64_t offset) {
    if (offset < 0 || offset >= numel_) {
      ++out_of_range_;
      return;
    }
    ++count_;
    sum_ += static_cast<uint64_t>(offset);
    sum_sq_ += static_cast<uint64_t>(offset) * static_cast<uint64_t>(offset);
    if (per_element_ && visits_[offset] < 255) {
      ++visits_[offset];
    }
  }

  void expect_each_element_once(const std::string& what) const {
    EXPECT_EQ(out_of_range_, 0) << what << ": offsets outside the tensor";
    EXPECT_EQ(count_, static_cast<uint64_t>(numel_)) << what;
    using u128 = unsigned __int128;
    const u128 n = static_cast<u128>(numel_);
    EXPECT_EQ(sum_, static_cast<uint64_t>(n * (n - 1) / 2)) << what;
    EXPECT_EQ(sum_sq_, static_cast<uint64_t>((n - 1) * n * (2 * n - 1) / 6))
        << what;
    if (per_element_) {
      for (int64_t i = 0; i < numel_; ++i) {
        if (visits_[i] != 1) {
          ADD_FAILURE() << what << ": element " << i << " visited "
                        << int(visits_[i]) << " times";
          return;
        }
      }
    }
  }

 private:
  int64_t numel_;
  bool per_element_;
  std::vector<uint8_t> visits_;
  uint64_t count_ = 0, sum_ = 0, sum_sq_ = 0;
  int64_t out_of_range_ = 0;
};

int64_t channel_of(const Shape& s, bool channels_last, int64_t offset) {
  return channels_last ? offset % s.channels
                       : (offset / s.spatial) % s.channels;
}

// Every thread of channel_affine's launch, as batch_norm_kernels.cu sets it
// up, with the walk it picks for the layout.
void check_elementwise(
    const Shape& s,
    bool channels_last,
    int64_t sms,
    std::optional<ElementwiseWalk> expected_walk = std::nullopt) {
  const bool small = s.numel() <= (int64_t(1) << 24);
  const ElementwiseLaunch w =
      elementwise_launch(s.batch, s.channels, s.spatial, channels_last, sms);
  const Launch2d& l = w.launch;
  const std::string what = "elementwise, " + describe(s, channels_last, sms);
  if (expected_walk) {
    ASSERT_EQ(w.walk, *expected_walk) << what;
  }
  ASSERT_LE(l.grid_y, 65535) << what;
  ASSERT_LE(l.grid_x, INT32_MAX) << what;
  ASSERT_EQ(l.block_x * l.block_y, 256) << what;
  if (w.walk == ElementwiseWalk::kStridedChannels) {
    // What makes a thread's channel fixed.
    ASSERT_EQ((l.grid_x * l.block_x) % s.channels, 0) << what;
  }
  Coverage coverage(s.numel(), small);
  int64_t misplaced = 0;
  for (int64_t by = 0; by < l.grid_y; ++by) {
    for (int64_t bx = 0; bx < l.grid_x; ++bx) {
      for (int64_t ty = 0; ty < l.block_y; ++ty) {
        for (int64_t tx = 0; tx < l.block_x; ++tx) {
          int64_t channel = -1;
          walk_elementwise(
              w, ThreadCoord{tx, ty, bx, by},
              [&](int64_t c) { channel = c; },
              [&](int64_t offset) {
                coverage.visit(offset);
                // The coefficients the kernel uses are those of the last
                // channel it was told: it must be the element's.
                if (small) {
                  misplaced += channel != channel_of(s, channels_last, offset);
                } else {
                  misplaced += channel < 0 || channel >= s.channels;
                }
              });
        }
      }
    }
  }
  EXPECT_EQ(misplaced, 0) << what << ": elements given another channel";
  coverage.expect_each_element_once(what);
}

// Every thread of every block of batch_mean_var/batch_grad_sums's launch.
void check_reduction(const Shape& s, bool channels_last, int64_t sms) {
  const bool small = s.numel() <= (int64_t(1) << 24);
  const auto geometry =
      reduction_launch(s.batch, s.channels, s.spatial, channels_last, sms);
  const Launch2d& l = geometry.launch;
  const std::string what = "reduction, " + describe(s, channels_last, sms);
  ASSERT_LE(l.grid_y, 65535) << what;
  ASSERT_LE(l.grid_x, INT32_MAX) << what;
  ASSERT_LE(l.block_x * l.block_y, 512) << what;
  ASSERT_EQ((l.block_x * l.block_y) % convbn::cuda::kWarpSize, 0) << what;
  const int64_t per_channel = s.batch * s.spatial;
  ASSERT_GE(geometry.chunk * l.grid_y, per_channel) << what;
  Coverage coverage(s.numel(), small);
  int64_t misplaced = 0;
  for (int64_t chunk = 0; chunk < l.grid_y; ++chunk) {
    const auto [begin, end] = chunk_range(chunk, geometry.chunk, per_channel);
    for (int64_t bx = 0; bx < l.grid_x; ++bx) {
      for (int64_t ty = 0; ty < l.block_y; ++ty) {
        for (int64_t tx = 0; tx < l.block_x; ++tx) {
          auto visit = [&](int64_t c) {
            return [&, c](int64_t offset) {
              coverage.visit(offset);
              if (small) {
                misplaced += c != channel_of(s, channels_last, offset);
              }
            };
          };
          if (channels_last) {
            const int64_t c = lane_channel(bx, tx);
            if (c < s.channels) {
              walk_channel_chunk_rows(
                  begin, end, c, s.channels, ty, l.block_y, visit(c));
            }
          } else {
            walk_channel_chunk_nchw(
                begin, end, bx, s.channels, s.spatial, tx, ty, l.block_x,
                l.block_y, visit(bx));
          }
        }
      }
    }
  }
  EXPECT_EQ(misplaced, 0) << what << ": values reduced into another channel";
  coverage.expect_each_element_once(what);
}

const Shape kSmallShapes[] = {
    {1, 1, 2},     {2, 1, 1},      {3, 5, 7},     {8, 16, 49},
    {1, 3, 1000},  {7, 33, 31},    {5, 64, 1},    {128, 3, 33},
    {2, 257, 12},  {64, 64, 196},  {1, 8, 40000}, {300, 2, 5},
    {4, 100, 64},  {9, 1000, 1},   {1, 65, 257},  {2, 2, 123457},
};

TEST(IndexWalk, ElementwiseVisitsEveryElementOnceSmallShapes) {
  for (const Shape& s : kSmallShapes) {
    for (bool cl : {false, true}) {
      for (int64_t sms : {1, 108, 114, 132}) {
        check_elementwise(s, cl, sms);
      }
    }
  }
}

TEST(IndexWalk, ElementwiseWalkFitsTheLayout) {
  check_elementwise({3, 5, 7}, false, 132, ElementwiseWalk::kPlanes);
  // channels_last: any C whose period fits the grid walks with a fixed
  // channel per thread, however small or odd C is...
  for (int64_t c : {1, 3, 16, 96, 1000, 2048}) {
    check_elementwise({5, c, 9}, true, 132, ElementwiseWalk::kStridedChannels);
  }
  // ...and a large odd C (period 4229 > 32 * 4 blocks) walks rows.
  check_elementwise({3, 4229, 5}, true, 4, ElementwiseWalk::kRows);
  check_elementwise({2, 4229, 1}, true, 1, ElementwiseWalk::kRows);
}

TEST(IndexWalk, ReductionVisitsEveryElementOnceSmallShapes) {
  for (const Shape& s : kSmallShapes) {
    for (bool cl : {false, true}) {
      for (int64_t sms : {1, 108, 114, 132}) {
        check_reduction(s, cl, sms);
      }
    }
  }
}

// 2 * 3 * 357913941 = 2^31 - 2 elements: one grid stride short of 2^31,
// where a 32-bit counter would wrap. H200: 132 multiprocessors.
constexpr Shape kJustBelow2Pow31{2, 3, 357913941};
// Many small planes, 2^31 - 2^19 elements.
constexpr Shape kManyPlanesBelow2Pow31{4095, 512, 1024};
// Past 2^31 (the CUDA test's shape): 2 * 16 * 8192 * 8193 elements.
constexpr Shape kPast2Pow31{2, 16, 8192 * 8193};

TEST(IndexWalk, ElementwiseNear2Pow31Elements) {
  ASSERT_EQ(kJustBelow2Pow31.numel(), (int64_t(1) << 31) - 2);
  for (bool cl : {false, true}) {
    check_elementwise(kJustBelow2Pow31, cl, 132);
  }
  check_elementwise(kManyPlanesBelow2Pow31, false, 132);
  check_elementwise(kManyPlanesBelow2Pow31, true, 132);
  check_elementwise(kPast2Pow31, true, 132);
}

TEST(IndexWalk, ReductionNear2Pow31Elements) {
  for (bool cl : {false, true}) {
    check_reduction(kJustBelow2Pow31, cl, 132);
  }
  check_reduction(kPast2Pow31, false, 132);
}

} // namespace
