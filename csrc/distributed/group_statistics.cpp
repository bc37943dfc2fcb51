#include "group_statistics.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

namespace convbn {
namespace {

// The functional collective `name`, looked up at the first call. Boxed
// calls: the group argument's schema type changed across PyTorch releases
// (str, then Any), and a string IValue fits both.
c10::OperatorHandle collective(const char* name) {
  auto op = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(
      op.has_value(),
      "convbn: synchronized batch norm needs torch.distributed's functional "
      "collectives (", name, "), which this PyTorch build does not have; use "
      "a build with distributed support (USE_DISTRIBUTED=1), or the "
      "unsynchronized ConvBN2d");
  return *op;
}

// Runs a collective that returns one tensor and waits for it.
at::Tensor run_and_wait(const c10::OperatorHandle& op, torch::jit::Stack stack) {
  static const c10::OperatorHandle wait =
      collective("_c10d_functional::wait_tensor");
  op.callBoxed(&stack);
  torch::jit::Stack waited{std::move(stack.at(0))};
  wait.callBoxed(&waited);
  return waited.at(0).toTensor();
}

} // namespace

GroupStatistics gather_batch_statistics(
    const at::Tensor& mean,
    const at::Tensor& var,
    int64_t count,
    const ProcessGroupRef& group) {
  static const c10::OperatorHandle all_gather =
      collective("_c10d_functional::all_gather_into_tensor");
  const int64_t channels = mean.numel();
  const auto wide = mean.options().dtype(at::kDouble);
  // One message per rank: [mean (C), var (C), count]. Counts travel as
  // float64, exact up to 2^53.
  const at::Tensor local = at::cat(
      {mean.to(at::kDouble), var.to(at::kDouble),
       at::full({1}, static_cast<double>(count), wide)});
  const at::Tensor gathered =
      run_and_wait(all_gather, {local, group.size, group.name})
          .view({group.size, 2 * channels + 1});
  const at::Tensor means = gathered.narrow(1, 0, channels);
  const at::Tensor vars = gathered.narrow(1, channels, channels);
  const at::Tensor counts = gathered.narrow(1, 2 * channels, 1);

  // The counts are needed on the host anyway (the unbiased-variance factor
  // and the checks of the caller); reading them is the one synchronization.
  const double total = counts.sum().item<double>();
  GroupStatistics result;
  result.count = static_cast<int64_t>(total);
  if (result.count == 0) {
    result.mean = at::zeros_like(mean);
    result.var = at::zeros_like(var);
    return result;
  }
  const at::Tensor weights = counts / total;
  const at::Tensor group_mean = (weights * means).sum(0);
  const at::Tensor spread = (means - group_mean).square_();
  const at::Tensor group_var = (weights * (vars + spread)).sum(0);
  result.mean = group_mean.to(mean.scalar_type());
  result.var = group_var.to(var.scalar_type());
  return result;
}

GroupGradSums all_reduce_grad_sums(
    const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xmu,
    const ProcessGroupRef& group) {
  static const c10::OperatorHandle all_reduce =
      collective("_c10d_functional::all_reduce");
  const int64_t channels = sum_dy.numel();
  const at::Tensor local =
      at::cat({sum_dy.to(at::kDouble), sum_dy_xmu.to(at::kDouble)});
  const at::Tensor summed =
      run_and_wait(all_reduce, {local, std::string("sum"), group.name});
  GroupGradSums result;
  result.sum_dy = summed.narrow(0, 0, channels).to(sum_dy.scalar_type());
  result.sum_dy_xmu =
      summed.narrow(0, channels, channels).to(sum_dy_xmu.scalar_type());
  return result;
}

} // namespace convbn
