// update_running_stats: a handful of ops on per-channel vectors, written with
// ATen so that one implementation serves every device. It is registered for
// CPU and CUDA; fake tensors use the Python fake in convbn/_fake.py.
//
// Every argument is checked and every new value computed before the first
// write, so an error leaves the running statistics exactly as they were.
#include "../checks.h"

#include <torch/library.h>

#include <cmath>

namespace convbn {
namespace {

constexpr const char* kOp = "convbn.update_running_stats";

void update_running_stats_impl(
    at::Tensor& running_mean,
    at::Tensor& running_var,
    at::Tensor& num_batches_tracked,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    double eps,
    std::optional<double> momentum,
    c10::SymInt count_sym) {
  const int64_t count = count_sym.expect_int();
  TORCH_CHECK(
      save_mean.dim() == 1,
      kOp, ": expected `save_mean` to be 1-D, got shape ", save_mean.sizes());
  const int64_t channels = save_mean.size(0);
  check_channel_vector(kOp, "save_mean", save_mean, channels, save_mean);
  check_channel_vector(kOp, "save_invstd", save_invstd, channels, save_mean);
  check_channel_vector(kOp, "running_mean", running_mean, channels, save_mean);
  check_channel_vector(kOp, "running_var", running_var, channels, save_mean);
  TORCH_CHECK(
      num_batches_tracked.numel() == 1 &&
          at::isIntegralType(num_batches_tracked.scalar_type(), false),
      kOp, ": `num_batches_tracked` must be an integer tensor with one "
      "element, got dtype ", num_batches_tracked.scalar_type(), " and shape ",
      num_batches_tracked.sizes());
  TORCH_CHECK(
      num_batches_tracked.device() == save_mean.device(),
      kOp, ": `num_batches_tracked` is on ", num_batches_tracked.device(),
      " but the statistics are on ", save_mean.device());
  // ValueError in Python, as nn.BatchNorm raises it.
  TORCH_CHECK_VALUE(
      count > 1,
      "Expected more than 1 value per channel when training, got ", count,
      " values per channel");
  check_eps(kOp, eps);
  TORCH_CHECK(
      !momentum.has_value() || std::isfinite(*momentum),
      kOp, ": `momentum` must be a finite number, or None for a cumulative "
      "moving average, got ", momentum.value_or(0.0));

  // The batch variance from save_invstd = 1 / sqrt(var + eps), made
  // unbiased (count / (count - 1)) as nn.BatchNorm2d's running_var is.
  // Blending in double keeps float32 statistics as exact as ATen's. (An
  // infinite running_var here came from an infinite batch variance,
  // save_invstd = 0: see batch_mean_var in cpu/batch_norm_kernels.h.)
  // save_invstd is rounded to the statistics' dtype, so invstd^-2 - eps can
  // come out a rounding error below 0 when var is 0 (a constant channel):
  // clamped, the variance is 0 as the pair's, never negative.
  const at::Tensor batch_var =
      (save_invstd.to(at::kDouble).pow(-2) - eps).clamp_min_(0) *
      (static_cast<double>(count) / static_cast<double>(count - 1));
  const at::Tensor new_count = num_batches_tracked + 1;
  // momentum=None: factor 1 / num_batches_tracked, kept on the device (no
  // host synchronization).
  const at::Tensor factor = momentum.has_value()
      ? at::scalar_tensor(*momentum, save_mean.options().dtype(at::kDouble))
      : new_count.to(at::kDouble).reciprocal();
  auto blend = [&](const at::Tensor& running, const at::Tensor& batch) {
    return running.to(at::kDouble).lerp(batch.to(at::kDouble), factor);
  };
  const at::Tensor new_mean = blend(running_mean, save_mean);
  const at::Tensor new_var = blend(running_var, batch_var);

  running_mean.copy_(new_mean);
  running_var.copy_(new_var);
  num_batches_tracked.copy_(new_count);
}

} // namespace

TORCH_LIBRARY_IMPL(convbn, CPU, m) {
  m.impl("update_running_stats", &update_running_stats_impl);
}

TORCH_LIBRARY_IMPL(convbn, CUDA, m) {
  m.impl("update_running_stats", &update_running_stats_impl);
}

} // namespace convbn
