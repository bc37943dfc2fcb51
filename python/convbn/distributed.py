"""convbn.SyncConvBN2d: ConvBN2d whose training statistics are those of the
whole batch spread over the processes of a torch.distributed group, as
nn.SyncBatchNorm computes them; and convbn.convert_sync_batchnorm, which
converts a model's ConvBN2d layers the way
nn.SyncBatchNorm.convert_sync_batchnorm converts its BatchNorm layers.

All communication is torch.distributed's (its functional collectives, called
by the operators sync_conv_bn_train and sync_conv_bn_train_backward), so the
process group's backend decides how: gloo for CPU tensors, NCCL for CUDA."""

import warnings
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .functional import _conv_bn_prepared
from .modules import ConvBN2d, LinearBN1d


class SyncConvBN2d(ConvBN2d):
    """ConvBN2d with synchronized batch statistics: in training, every rank of
    `process_group` (default: the whole world) normalizes with the mean and
    variance of all ranks' batches together, as if one process had run the
    concatenated batch. Per-rank batch sizes may differ, and a rank's batch
    may be empty. The backward sums the normalization's two per-channel
    gradient sums over the group; parameter gradients stay per rank, for
    DistributedDataParallel to reduce. Every rank updates its running
    statistics with the group's statistics, so they stay identical.

    In eval mode, with one rank, or without an initialized torch.distributed,
    it is exactly ConvBN2d and does not communicate. Every rank of the group
    must call forward (and backward) the same number of times, as with
    nn.SyncBatchNorm. TorchScript compiles the unsynchronized ConvBN2d
    behaviour: script a model for deployment, not for distributed training.

    Arguments are ConvBN2d's, plus process_group, as nn.SyncBatchNorm's.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        memory_efficient: bool = True,
        process_group: Optional[dist.ProcessGroup] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, eps, momentum, affine, track_running_stats, memory_efficient,
            device=device, dtype=dtype,
        )
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        input = self._padded(input)
        if not torch.jit.is_scripting():
            group = self._group_to_synchronize()
            if group is not None:
                return self._synchronized(input, *group)
        return self._normalize(input)

    @torch.jit.unused
    def _group_to_synchronize(self) -> Optional[Tuple[str, int]]:
        """(group name, number of ranks) when this forward synchronizes:
        training, torch.distributed initialized and more than one rank, as
        in nn.SyncBatchNorm. None otherwise."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        if not isinstance(group, dist.ProcessGroup):
            raise RuntimeError(
                f"convbn: SyncConvBN2d: this process (rank {dist.get_rank()}) is not a member of "
                "its process_group; give each process a group it belongs to, as "
                "nn.SyncBatchNorm.convert_sync_batchnorm's example does"
            )
        size = dist.get_world_size(group)
        return (group.group_name, size) if size > 1 else None

    @torch.jit.unused
    def _synchronized(self, input: Tensor, group_name: str, group_size: int) -> Tensor:
        _, running_mean, running_var, num_batches_tracked = self._statistics()
        return _conv_bn_prepared(
            input, self.weight, self.bias, self.bn_weight, self.bn_bias,
            running_mean, running_var, num_batches_tracked, True, self.momentum, self.eps,
            self._stride, self._conv_padding, self._dilation, self.groups, self.memory_efficient,
            group_name, group_size,
        )

    @classmethod
    def from_conv_bn(cls, module: ConvBN2d, process_group: Optional[dist.ProcessGroup] = None) -> "SyncConvBN2d":
        """A SyncConvBN2d with module's hyper-parameters that shares its
        parameters and buffers (the same tensors, as
        nn.SyncBatchNorm.convert_sync_batchnorm shares them), in its
        train/eval mode."""
        if type(module) is not ConvBN2d:
            raise TypeError(f"convbn: from_conv_bn expects a ConvBN2d, got {type(module).__name__}")
        sync = cls(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.bias is not None, module.padding_mode, module.eps,
            module.momentum, module.affine, module.track_running_stats, module.memory_efficient,
            process_group, device="meta",
        )
        sync._parameters = dict(module._parameters)
        sync._buffers = dict(module._buffers)
        sync._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
        # Where fuse found the pair, for unfuse and the pair's state_dict keys.
        if "_unfused_names" in module.__dict__:
            sync._unfused_names = module._unfused_names
        sync.train(module.training)
        return sync

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.process_group is None else ", process_group=...")


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Replaces every ConvBN2d in module by a SyncConvBN2d that shares its
    parameters and buffers, synchronizing over process_group (default: the
    whole world), like nn.SyncBatchNorm.convert_sync_batchnorm. Returns
    module (a new SyncConvBN2d when module itself is a ConvBN2d).

    Other batch norms are left as they are: convert nn.BatchNorm layers with
    nn.SyncBatchNorm.convert_sync_batchnorm (it runs on CUDA only).
    LinearBN1d layers keep per-process statistics; a warning names them."""
    unsynchronized = [name for name, m in module.named_modules() if isinstance(m, LinearBN1d)]
    if unsynchronized:
        warnings.warn(
            f"convbn.convert_sync_batchnorm: LinearBN1d layers keep per-process batch statistics "
            f"(there is no synchronized LinearBN1d): {', '.join(n or '(the model)' for n in unsynchronized)}",
            stacklevel=2,
        )
    return _convert(module, process_group)


def _convert(module: nn.Module, process_group: Optional[dist.ProcessGroup]) -> nn.Module:
    if type(module) is ConvBN2d:
        return SyncConvBN2d.from_conv_bn(module, process_group)
    for name, child in module.named_children():
        converted = _convert(child, process_group)
        if converted is not child:
            module.add_module(name, converted)
    return module
