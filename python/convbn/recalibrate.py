"""convbn.recalibrate: exact population statistics for every batch norm of a
model (ConvBN2d, LinearBN1d, nn.BatchNorm1d/2d/3d)."""

from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .distributed import SyncLinearBN1d, _SyncConvBNNd, synchronizing_group
from .modules import LinearBN1d, _ConvBNNd

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, _ConvBNNd, LinearBN1d)


class _Moments:
    """Count, mean and sum of squared deviations of one layer's values per
    channel, in float64, merged batch by batch (Chan et al.): exact for any
    number of batches of any sizes."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def add(self, count: int, mean: Tensor, biased_var: Tensor) -> None:
        # A copy: `mean` may be the layer's running_mean, which the next batch overwrites.
        mean, m2 = mean.to(torch.float64, copy=True), biased_var.double() * count
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total


def _observe(moments: _Moments, layer: nn.Module, output: Tensor) -> None:
    # The layer ran in training mode with momentum 1, so its running
    # statistics now hold this batch's mean and unbiased variance, exactly as
    # the layer itself computed them: over this process's batch, or over all
    # ranks' batches when the layer synchronizes.
    count = output.numel() // output.shape[1]
    group = _synchronizing_group(layer)
    if group is not None:
        values = torch.tensor([float(count)], dtype=torch.float64, device=output.device)
        dist.all_reduce(values, group=group)
        count = int(values.item())
    moments.add(count, layer.running_mean, layer.running_var * ((count - 1) / count))


def _synchronizing_group(layer: nn.Module):
    if isinstance(layer, (_SyncConvBNNd, SyncLinearBN1d, nn.SyncBatchNorm)):
        return synchronizing_group(layer, layer.process_group)
    return None


def recalibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    device=None,
    num_batches: Optional[int] = None,
    progress: bool = True,
) -> nn.Module:
    """Replaces the running_mean and running_var of every batch norm in
    `model` (ConvBN2d, LinearBN1d and nn.BatchNorm1d/2d/3d that track running
    statistics) with the exact statistics of its input over all of `batches`:
    the mean over every value seen, and the unbiased variance over every
    value seen (what one training step with momentum=1 would record if all
    the batches were one batch), not a moving average.

    The forward passes run in training mode, as the model was trained: each
    batch norm normalizes with its batch's statistics, so later layers see
    what they saw in training. Dropout and other random layers therefore
    act as in training too. Runs under torch.no_grad(); parameters,
    num_batches_tracked, momentum and every module's train/eval mode are
    left as they were. If anything fails, the statistics are restored.

    `batches` yields input tensors, or tuples/lists whose first element is
    the input (as a DataLoader of (input, target) does); `device` moves each
    input there. `num_batches` sizes the progress bar when `batches` has no
    len(). Returns model.

    Under torch.distributed, the layers that synchronize (SyncConvBN2d,
    SyncLinearBN1d, nn.SyncBatchNorm) get the statistics of all ranks'
    batches together, the same on every rank; every rank must then pass the
    same number of batches (a rank's batch may be empty). The other layers
    get the statistics of their own process's batches.
    """
    layers = [m for m in model.modules()
              if isinstance(m, _NORM_TYPES) and m.track_running_stats and m.running_mean is not None]
    if not layers:
        return model
    saved = {
        m: (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in layers
    }
    modes = {m: m.training for m in model.modules()}
    moments: Dict[nn.Module, _Moments] = {m: _Moments() for m in layers}
    hooks = [m.register_forward_hook(lambda layer, args, output: _observe(moments[layer], layer, output))
             for m in layers]
    if num_batches is None and hasattr(batches, "__len__"):
        num_batches = len(batches)
    done = False
    try:
        for m in layers:
            m.momentum = 1.0
        model.train()
        seen = 0
        with torch.no_grad():
            for batch in tqdm(batches, total=num_batches, disable=not progress,
                              desc="recalibrate", unit="batch"):
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(inputs if device is None else inputs.to(device))
                seen += 1
        if seen == 0:
            raise ValueError("convbn.recalibrate: `batches` yielded no batch")
        for m in layers:
            if moments[m].count < 2:
                raise ValueError(
                    f"convbn.recalibrate: a {type(m).__name__} saw {moments[m].count} value per channel; "
                    "the variance needs at least 2"
                )
        done = True
    finally:
        for hook in hooks:
            hook.remove()
        for m, (momentum, mean, var, nbt) in saved.items():
            m.momentum = momentum
            m.num_batches_tracked.copy_(nbt)
            if done:
                stats = moments[m]
                m.running_mean.copy_(stats.mean)
                m.running_var.copy_(stats.m2 / (stats.count - 1))
            else:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        for m, training in modes.items():
            m.training = training
    return model
