"""convbn.SyncConvBN2d (and SyncConvBN1d/3d, SyncConvTransposeBN1d/2d/3d)
and convbn.SyncLinearBN1d: the conv + batch norm modules and LinearBN1d
whose training statistics are those of the whole batch spread over the
processes of a torch.distributed group, as nn.SyncBatchNorm computes them;
and convbn.convert_sync_batchnorm, which converts a model's ConvBN2d and
LinearBN1d layers the way nn.SyncBatchNorm.convert_sync_batchnorm converts
its BatchNorm layers.

All communication is torch.distributed's (its functional collectives, called
by the operators sync_conv_bn_train, sync_linear_bn_train and their
backwards), so the process group's backend decides how: gloo for CPU
tensors, NCCL for CUDA."""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .activation import DEFAULT_NEGATIVE_SLOPE
from .modules import (
    ConvBN1d, ConvBN2d, ConvBN3d, ConvTransposeBN1d, ConvTransposeBN2d, ConvTransposeBN3d, LinearBN1d,
    _batch_norm_arguments, _conv_arguments,
)


def synchronizing_group(
    layer: nn.Module, process_group: Optional[dist.ProcessGroup]
) -> Optional[dist.ProcessGroup]:
    """The group a synchronized batch norm (SyncConvBN2d, SyncLinearBN1d,
    nn.SyncBatchNorm) exchanges its statistics over in this forward, with
    nn.SyncBatchNorm's rule: training, torch.distributed initialized, and
    more than one rank in process_group (default: the whole world). None
    when it computes alone."""
    if not (layer.training and dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    if not isinstance(group, dist.ProcessGroup):
        raise RuntimeError(
            f"convbn: {type(layer).__name__}: this process (rank {dist.get_rank()}) is not a member of "
            "its process_group; give each process a group it belongs to, as "
            "nn.SyncBatchNorm.convert_sync_batchnorm's example does"
        )
    return group if dist.get_world_size(group) > 1 else None


class _Synchronized:
    """What SyncConvBN2d and SyncLinearBN1d share: forward (synchronized when
    it should be), and taking over an unsynchronized module's state.
    Subclasses set self.process_group."""

    @torch.jit.unused
    def _group_to_synchronize(self) -> Optional[dist.ProcessGroup]:
        """The process group this forward synchronizes over, or None."""
        return synchronizing_group(self, self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        input = self._checked_input(input)
        # TorchScript compiles the unsynchronized module.
        if not torch.jit.is_scripting():
            group = self._group_to_synchronize()
            if group is not None:
                return self._normalize(input, group.group_name, dist.get_world_size(group))
        return self._normalize(input)

    def _share_state_of(self, module: nn.Module) -> None:
        """Takes module's parameters and buffers (the same tensors, as
        nn.SyncBatchNorm.convert_sync_batchnorm shares them), its train/eval
        mode, and whether fuse made it (its batch norm's state is then saved
        by a FusedBatchNormSlot, which convert_sync_batchnorm points here)."""
        self._parameters = dict(module._parameters)
        self._buffers = dict(module._buffers)
        self._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
        self._bn_state_in_slot = module._bn_state_in_slot
        self.train(module.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.process_group is None else ", process_group=...")


class _SyncConvBNNd(_Synchronized):
    """A conv + batch norm module (ConvBN1d/2d/3d, ConvTransposeBN1d/2d/3d)
    with synchronized batch statistics: in training, every rank of
    `process_group` (default: the whole world) normalizes with the mean and
    variance of all ranks' batches together, as if one process had run the
    concatenated batch. Per-rank batch sizes may differ, and a rank's batch
    may be empty. The backward sums the normalization's two per-channel
    gradient sums over the group; parameter gradients stay per rank, for
    DistributedDataParallel to reduce. Every rank updates its running
    statistics with the group's statistics, so they stay identical.

    In eval mode, with one rank, or without an initialized torch.distributed,
    it is exactly the unsynchronized module and does not communicate. Every
    rank of the group must call forward (and backward) the same number of
    times, as with nn.SyncBatchNorm. TorchScript compiles the unsynchronized
    behaviour: script a model for deployment, not for distributed training.

    Arguments are the unsynchronized module's, plus process_group (keyword),
    as nn.SyncBatchNorm's. Subclasses name the module they synchronize in
    _unsynchronized."""

    _unsynchronized: type

    def __init__(self, *args, process_group: Optional[dist.ProcessGroup] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    @classmethod
    def from_conv_bn(cls, module: nn.Module, process_group: Optional[dist.ProcessGroup] = None):
        """The synchronized module with module's hyper-parameters that shares
        its parameters and buffers, in its train/eval mode."""
        if type(module) is not cls._unsynchronized:
            raise TypeError(
                f"convbn: {cls.__name__}.from_conv_bn expects a {cls._unsynchronized.__name__}, "
                f"got {type(module).__name__}"
            )
        sync = cls(
            **_conv_arguments(module), **_batch_norm_arguments(module), memory_efficient=module.memory_efficient,
            process_group=process_group, device="meta", activation=module.activation,
            negative_slope=module.negative_slope,
        )
        sync._share_state_of(module)
        return sync


class SyncConvBN2d(_SyncConvBNNd, ConvBN2d):
    """ConvBN2d with synchronized batch statistics (see _SyncConvBNNd:
    training normalizes with the statistics of all ranks of process_group,
    as nn.SyncBatchNorm does). Arguments are ConvBN2d's, plus process_group,
    as nn.SyncBatchNorm's."""

    _unsynchronized = ConvBN2d

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
        activation: str = "identity",
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, eps, momentum, affine, track_running_stats, memory_efficient,
            process_group=process_group, device=device, dtype=dtype, activation=activation,
            negative_slope=negative_slope,
        )


class SyncConvBN1d(_SyncConvBNNd, ConvBN1d):
    """ConvBN1d with synchronized batch statistics, as SyncConvBN2d."""

    _unsynchronized = ConvBN1d


class SyncConvBN3d(_SyncConvBNNd, ConvBN3d):
    """ConvBN3d with synchronized batch statistics, as SyncConvBN2d."""

    _unsynchronized = ConvBN3d


class SyncConvTransposeBN1d(_SyncConvBNNd, ConvTransposeBN1d):
    """ConvTransposeBN1d with synchronized batch statistics, as SyncConvBN2d."""

    _unsynchronized = ConvTransposeBN1d


class SyncConvTransposeBN2d(_SyncConvBNNd, ConvTransposeBN2d):
    """ConvTransposeBN2d with synchronized batch statistics, as SyncConvBN2d."""

    _unsynchronized = ConvTransposeBN2d


class SyncConvTransposeBN3d(_SyncConvBNNd, ConvTransposeBN3d):
    """ConvTransposeBN3d with synchronized batch statistics, as SyncConvBN2d."""

    _unsynchronized = ConvTransposeBN3d


# The synchronized module of each conv + batch norm module.
_SYNCHRONIZED = {
    cls._unsynchronized: cls
    for cls in (SyncConvBN1d, SyncConvBN2d, SyncConvBN3d, SyncConvTransposeBN1d, SyncConvTransposeBN2d,
                SyncConvTransposeBN3d)
}


class SyncLinearBN1d(_Synchronized, LinearBN1d):
    """LinearBN1d with synchronized batch statistics, as SyncConvBN2d: in
    training, every rank of `process_group` (default: the whole world)
    normalizes its (N, in_features) batch with the statistics of all ranks'
    batches together. Arguments are LinearBN1d's, plus process_group."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
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
            in_features, out_features, bias, eps, momentum, affine, track_running_stats, memory_efficient,
            device=device, dtype=dtype,
        )
        self.process_group = process_group

    @classmethod
    def from_linear_bn(
        cls, module: LinearBN1d, process_group: Optional[dist.ProcessGroup] = None
    ) -> "SyncLinearBN1d":
        """A SyncLinearBN1d with module's hyper-parameters that shares its
        parameters and buffers, in its train/eval mode."""
        if type(module) is not LinearBN1d:
            raise TypeError(f"convbn: from_linear_bn expects a LinearBN1d, got {type(module).__name__}")
        sync = cls(
            module.in_features, module.out_features, module.bias is not None, module.eps, module.momentum,
            module.affine, module.track_running_stats, module.memory_efficient, process_group, device="meta",
        )
        sync._share_state_of(module)
        return sync


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Replaces every ConvBN2d by a SyncConvBN2d (ConvBN1d/3d and
    ConvTransposeBN1d/2d/3d by theirs) and every LinearBN1d by a
    SyncLinearBN1d that share its parameters and buffers, synchronizing over
    process_group (default: the whole world), like
    nn.SyncBatchNorm.convert_sync_batchnorm. Returns module (a new layer when
    module itself is one of them).

    nn.BatchNorm layers are left as they are: convert them with
    nn.SyncBatchNorm.convert_sync_batchnorm (it runs on CUDA only)."""
    converted = {}
    module = _convert(module, process_group, converted)
    # The batch norm slots convbn.fuse left save the new modules' state.
    from .fuse import FusedBatchNormSlot

    for slot in module.modules():
        if isinstance(slot, FusedBatchNormSlot) and id(slot.fused) in converted:
            slot._relink(converted[id(slot.fused)])
    return module


def _convert(module: nn.Module, process_group, converted: dict) -> nn.Module:
    if id(module) in converted:
        return converted[id(module)]
    if type(module) in _SYNCHRONIZED:
        converted[id(module)] = _SYNCHRONIZED[type(module)].from_conv_bn(module, process_group)
        return converted[id(module)]
    if type(module) is LinearBN1d:
        converted[id(module)] = SyncLinearBN1d.from_linear_bn(module, process_group)
        return converted[id(module)]
    for name, child in list(module._modules.items()):
        if child is not None:
            new = _convert(child, process_group, converted)
            if new is not child:
                module.add_module(name, new)
    return module
