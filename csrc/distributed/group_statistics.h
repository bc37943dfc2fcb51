// Batch statistics over the processes of a torch.distributed process group:
// what the synchronized ops (sync_conv_bn_train and its backward) exchange.
// The only place convbn communicates. It calls torch.distributed's own
// functional collectives (the `_c10d_functional` operators behind
// torch.distributed._functional_collectives) through the dispatcher, so any
// backend torch.distributed has (gloo, NCCL, ...) works and convbn links
// against nothing of c10d.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace convbn {

// A process group as the functional collectives name it: its registered
// name (ProcessGroup.group_name in Python; "0" for the default group) and
// its number of ranks.
struct ProcessGroupRef {
  const std::string& name;
  int64_t size;
};

struct GroupStatistics {
  at::Tensor mean; // per channel, in the dtype of the local mean
  at::Tensor var; // biased
  int64_t count; // values per channel over the whole group
};

// All-gathers every rank's (mean, biased var, count) and merges them
// exactly: count-weighted mean, and the within-rank variances plus the
// spread of the rank means around the group mean. Ranks may hold different
// counts; a rank with count 0 (an empty batch) takes part and weighs
// nothing. Every rank merges the same gathered values in the same order, so
// all get the same result. The exchange and the merge are in float64.
GroupStatistics gather_batch_statistics(
    const at::Tensor& mean,
    const at::Tensor& var,
    int64_t count,
    const ProcessGroupRef& group);

// Sums the backward's two per-channel sums over the group, in one message.
// Returns new tensors, so the caller keeps its own (the gradients of
// bn_weight and bn_bias are the rank's own sums, as in nn.SyncBatchNorm:
// DistributedDataParallel reduces parameter gradients itself).
struct GroupGradSums {
  at::Tensor sum_dy;
  at::Tensor sum_dy_xmu;
};
GroupGradSums all_reduce_grad_sums(
    const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xmu,
    const ProcessGroupRef& group);

} // namespace convbn
