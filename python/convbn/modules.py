"""convbn.ConvBN1d/2d/3d (nn.Conv1d/2d/3d followed by nn.BatchNorm1d/2d/3d),
convbn.ConvTransposeBN1d/2d/3d (nn.ConvTranspose1d/2d/3d followed by the
batch norm) and convbn.LinearBN1d (nn.Linear followed by nn.BatchNorm1d),
each one operator."""

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activation import DEFAULT_NEGATIVE_SLOPE, activation_module, activation_of, activation_repr, check_activation
from .functional import (
    _conv_bn_prepared, _is_fx_tracing, _is_in_onnx_export, _linear_bn_prepared, _ntuple, _refuse_onnx_export_of_updates,
    check_momentum, same_padding,
)

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# The fused modules' batch norm attributes (parameters and buffers), and
# nn.BatchNorm's name for each.
_BN_ATTRIBUTES = ("bn_weight", "bn_bias", "running_mean", "running_var", "num_batches_tracked")
_BATCH_NORM_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def default_num_batches_tracked(state_dict, prefix: str, local_metadata, tracked: Optional[Tensor]) -> None:
    """nn.BatchNorm's loading rule: state dicts older than version 2 (or
    without version metadata) may lack num_batches_tracked; they load with
    the current count (0 on the meta device)."""
    version = local_metadata.get("version", None)
    key = prefix + "num_batches_tracked"
    if (version is None or version < 2) and tracked is not None and key not in state_dict:
        state_dict[key] = tracked if tracked.device.type != "meta" else torch.tensor(0, dtype=torch.long)


class _FusedBatchNorm(nn.Module):
    """What ConvBN2d and LinearBN1d share: batch norm's parameters
    (bn_weight, bn_bias), its running statistics, their initialization, and
    their state_dict form. Subclasses own `weight` and `bias`."""

    def _init_batch_norm(
        self, num_features: int, eps: float, momentum: Optional[float], affine: bool,
        track_running_stats: bool, factory,
    ) -> None:
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"convbn: eps must be a positive finite number, got {eps}")
        check_momentum(momentum)
        self.eps = eps
        self.momentum = momentum
        # True when convbn.fuse made this module: the batch norm's state then
        # appears in state_dict under the batch norm's old keys, saved by the
        # FusedBatchNormSlot left at its place.
        self._bn_state_in_slot = False
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.bn_weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bn_bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bn_weight", None)
            self.register_parameter("bn_bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def _statistics(self) -> Tuple[bool, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """nn.BatchNorm's rule: batch statistics in training, and in eval when
        no running statistics are tracked. Returns (use batch statistics,
        running_mean, running_var, num_batches_tracked) as the functional
        forms take them: the running statistics to update (training) or to
        normalize with (eval), None where there are none to use."""
        use_batch_stats = self.training or self.running_mean is None
        update_stats = self.training and self.track_running_stats
        keep = update_stats or not use_batch_stats
        return (
            use_batch_stats,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.num_batches_tracked if update_stats else None,
        )

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        # The same initialization as nn.Conv2d / nn.Linear and nn.BatchNorm.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            if fan_in != 0:
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)
        self._reset_batch_norm()

    def _reset_batch_norm(self) -> None:
        """nn.BatchNorm.reset_parameters on the batch norm's part."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.bn_weight)
            nn.init.zeros_(self.bn_bias)

    # Eval mode folds on every call (a per-channel computation and one pass
    # over the weight) rather than caching the fold: no cache can see changes
    # made through .data or vector_to_parameters, and tracing must record the
    # fold, not a constant.

    _version = 2  # as nn.BatchNorm: older state dicts may lack num_batches_tracked

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._bn_state_in_slot:
            # Made by convbn.fuse: the FusedBatchNormSlot at the batch norm's
            # old place saves these under the batch norm's keys.
            for name in _BN_ATTRIBUTES:
                destination.pop(prefix + name, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        default_num_batches_tracked(state_dict, prefix, local_metadata, self.num_batches_tracked)
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self._bn_state_in_slot:
            kept = [k for k in missing_keys[before:] if k[len(prefix):] not in _BN_ATTRIBUTES]
            del missing_keys[before:]
            missing_keys.extend(kept)

    def _batch_norm_repr(self) -> str:
        return (f", eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, memory_efficient={self.memory_efficient}")

    def _take_batch_norm_from(self, bn: nn.Module, take) -> None:
        """bn's parameters and statistics, through take (_copy_tensor, or
        _share_tensor for convbn.fuse), and its train/eval mode."""
        for name, attr in zip(_BATCH_NORM_NAMES, _BN_ATTRIBUTES):
            setattr(self, attr, take(getattr(bn, name)))
        self.train(bn.training)

    def _give_batch_norm_to(self, bn: nn.Module, take) -> None:
        for name, attr in zip(_BATCH_NORM_NAMES, _BN_ATTRIBUTES):
            setattr(bn, name, take(getattr(self, attr)))
        bn.train(self.training)


class _ConvBNNd(_FusedBatchNorm):
    """What every conv + batch norm module shares, whatever its rank and
    whether its conv is transposed: one operator family (conv_bn_train,
    conv_bn_eval, ...) with aten::convolution's arguments serves them all.
    Subclasses set the class attributes below and the constructor's
    signature (the pair's)."""

    _spatial_dims = 2
    _transposed = False
    _conv_type: type = nn.Conv2d
    _bn_type: type = nn.BatchNorm2d

    __constants__ = [
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
        "groups", "padding_mode", "eps", "momentum", "affine", "track_running_stats",
        "memory_efficient", "transposed", "output_padding", "_input_dim", "_input_expected", "activation",
        "negative_slope",
    ]

    def _init_conv_bn(
        self, in_channels: int, out_channels: int, kernel_size, stride, padding, output_padding, dilation,
        groups: int, bias: bool, padding_mode: str, eps: float, momentum: Optional[float], affine: bool,
        track_running_stats: bool, memory_efficient: bool, device, dtype, activation: str = "identity",
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        n = self._spatial_dims
        check_activation(activation, negative_slope)
        # Applied to the normalized output in the same pass (activation.py).
        self.activation = activation
        self.negative_slope = float(negative_slope)
        if groups <= 0:
            raise ValueError(f"convbn: groups must be a positive integer, got {groups}")
        if in_channels % groups != 0:
            raise ValueError(f"convbn: in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups != 0:
            raise ValueError(f"convbn: out_channels ({out_channels}) must be divisible by groups ({groups})")
        modes = ("zeros",) if self._transposed else _PADDING_MODES
        if padding_mode not in modes:
            raise ValueError(
                f"convbn: padding_mode must be one of {modes} for {type(self).__name__}, got {padding_mode!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.transposed = self._transposed
        # For forward's check of the input (TorchScript reads instance attributes).
        self._input_dim = n + 2
        self._input_expected = (
            f"convbn: {type(self).__name__} expected a {n + 2}-D input {_INPUT_SHAPES[n + 2]}"
        )
        self.kernel_size = tuple(_ntuple(kernel_size, n, "kernel_size"))
        self.stride = tuple(_ntuple(stride, n, "stride"))
        self.dilation = tuple(_ntuple(dilation, n, "dilation"))
        self.output_padding = tuple(_ntuple(output_padding, n, "output_padding"))
        if isinstance(padding, str):
            if padding not in ("same", "valid") or self._transposed:
                forms = "an int or a tuple" if self._transposed else "an int, a tuple, 'same' or 'valid'"
                raise ValueError(f"convbn: padding must be {forms} for {type(self).__name__}, got {padding!r}")
            if padding == "same" and self.stride != (1,) * n:
                raise ValueError("convbn: padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = tuple(_ntuple(padding, n, "padding"))
        if self._transposed:
            for op, s, d in zip(self.output_padding, self.stride, self.dilation):
                if not 0 <= op < max(s, d):
                    raise ValueError(
                        f"convbn: output_padding {self.output_padding} must be smaller than either the stride "
                        f"{self.stride} or the dilation {self.dilation} in each dimension"
                    )
        self.groups = groups
        self.padding_mode = padding_mode
        self.memory_efficient = memory_efficient

        # How the input is padded before the conv: (F.pad amounts, mode) and
        # the symmetric padding the conv itself applies, as nn.Conv2d does.
        self._conv_padding, self._input_pad = self._plan_padding()
        # The conv's arguments as lists, the type the operators take.
        self._stride = list(self.stride)
        self._dilation = list(self.dilation)
        self._output_padding = list(self.output_padding)

        weight_shape = ((in_channels, out_channels // groups) if self._transposed
                        else (out_channels, in_channels // groups))
        self.weight = nn.Parameter(torch.empty((*weight_shape, *self.kernel_size), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self._init_batch_norm(out_channels, eps, momentum, affine, track_running_stats, factory)
        self.reset_parameters()

    def _plan_padding(self) -> Tuple[List[int], List[int]]:
        n = self._spatial_dims
        if self.padding == "valid":
            return [0] * n, [0] * (2 * n)
        if self.padding == "same":
            symmetric, extra = same_padding(list(self.kernel_size), list(self.dilation))
        else:
            symmetric, extra = list(self.padding), [0] * (2 * n)
        if self.padding_mode == "zeros":
            return symmetric, extra
        # Non-zero padding modes pad the input explicitly and convolve with
        # no padding, as nn.Conv2d does; F.pad lists the last dimension
        # first: (W_left, W_right, H_top, H_bottom, ...).
        pad = []
        for i in reversed(range(n)):
            j = 2 * (n - 1 - i)
            pad += [symmetric[i] + extra[j], symmetric[i] + extra[j + 1]]
        return [0] * n, pad

    def forward(self, input: Tensor) -> Tensor:
        # TorchScript compiles this method: it sticks to typed attributes
        # (lists, Optional tensors, constants) and calls the operators through
        # functional._conv_bn_prepared.
        return self._normalize(self._checked_input(input))

    def _checked_input(self, input: Tensor) -> Tensor:
        """input, checked, with the padding the conv does not apply itself
        (non-zero padding modes, the odd remainder of 'same')."""
        fx_tracing = not torch.jit.is_scripting() and _is_fx_tracing()
        if not fx_tracing and input.dim() != self._input_dim:
            hint = " (add the batch dimension with input.unsqueeze(0))" if input.dim() == self._input_dim - 1 else ""
            raise ValueError(
                f"{self._input_expected}, got a {input.dim()}-D input of shape {list(input.shape)}{hint}"
            )
        if any(self._input_pad):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = F.pad(input, self._input_pad, mode=mode)
        return input

    def _normalize(self, input: Tensor, group_name: Optional[str] = None, group_size: int = 1) -> Tensor:
        """conv + batch norm of the padded input; in training with the batch
        statistics of the process group group_name when given
        (the Sync* variants), else of this process's batch."""
        use_batch_stats, running_mean, running_var, num_batches_tracked = self._statistics()
        if use_batch_stats and not torch.jit.is_scripting() and _is_in_onnx_export():
            # _conv_bn_prepared refuses too, but does not know the layer's class (SyncConvBN2d).
            _refuse_onnx_export_of_updates(type(self).__name__, "conv_bn", running_mean, group_name)
        output = _conv_bn_prepared(
            input, self.weight, self.bias, self.bn_weight, self.bn_bias,
            running_mean, running_var, num_batches_tracked, use_batch_stats, self.momentum, self.eps,
            self._stride, self._conv_padding, self._dilation, self.groups, self.memory_efficient,
            group_name, group_size, self.transposed, self._output_padding, self.activation, self.negative_slope,
        )
        return output

    def extra_repr(self) -> str:
        n = self._spatial_dims
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding!r}")
        if self.output_padding != (0,) * n:
            s += f", output_padding={self.output_padding}"
        if self.dilation != (1,) * n:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is not None:
            s += ", bias=True"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + self._batch_norm_repr() + activation_repr(self.activation, self.negative_slope)

    @classmethod
    def from_modules(cls, conv: nn.Module, bn: nn.Module, memory_efficient: bool = True,
                     activation: Optional[nn.Module] = None) -> "_ConvBNNd":
        """A module of this class holding copies of conv's and bn's
        parameters, buffers and hyper-parameters; it computes what
        bn(conv(x)) computes (activation(bn(conv(x))) with an activation
        module: nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish,
        nn.Sigmoid, nn.GELU() or nn.Identity), and starts in bn's train/eval
        mode."""
        if type(conv) is not cls._conv_type:
            raise TypeError(
                f"convbn: {cls.__name__}.from_modules expects an nn.{cls._conv_type.__name__}, "
                f"got {type(conv).__name__}"
            )
        if not isinstance(bn, cls._bn_type):
            raise TypeError(
                f"convbn: {cls.__name__}.from_modules expects an nn.{cls._bn_type.__name__}, "
                f"got {type(bn).__name__}"
            )
        if conv.out_channels != bn.num_features:
            raise ValueError(
                f"convbn: the conv has {conv.out_channels} output channels but the batch norm has "
                f"num_features={bn.num_features}"
            )
        fused_activation = activation_of(activation)
        if fused_activation is None:
            raise TypeError(
                f"convbn: {cls.__name__}.from_modules cannot fuse the activation {activation!r}; it takes "
                "nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.GELU() "
                "(approximate='none') or nn.Identity; apply any other after the fused module"
            )
        return cls._holding(conv, bn, memory_efficient, _copy_tensor, fused_activation)

    @classmethod
    def _holding(cls, conv: nn.Module, bn: nn.Module, memory_efficient: bool, take,
                 activation: Tuple[str, float] = ("identity", DEFAULT_NEGATIVE_SLOPE)) -> "_ConvBNNd":
        """The module for (conv, bn), holding take(tensor) of each of theirs,
        with the fused activation (name, negative_slope)."""
        fused = cls(**_conv_arguments(conv), **_batch_norm_arguments(bn), memory_efficient=memory_efficient,
                    device="meta", activation=activation[0], negative_slope=activation[1])
        fused.weight, fused.bias = take(conv.weight), take(conv.bias)
        fused._take_batch_norm_from(bn, take)
        return fused

    def to_modules(self) -> Tuple[nn.Module, ...]:
        """(the conv, the batch norm) (nn.Conv2d and nn.BatchNorm2d for a
        ConvBN2d, ...) holding copies of this module's parameters, buffers
        and hyper-parameters, in its train/eval mode; with a fused
        activation, (conv, batch norm, activation module)."""
        modules = self._split(_copy_tensor)
        if self.activation == "identity":
            return modules
        return (*modules, self.activation_module())

    def activation_module(self) -> nn.Module:
        """The nn module of the fused activation (nn.Identity when none)."""
        act = activation_module(self.activation, self.negative_slope)
        act.train(self.training)
        return act

    def _split(self, take) -> Tuple[nn.Module, nn.Module]:
        conv = self._conv_type(**_conv_arguments(self), device="meta")
        bn = self._bn_type(
            self.out_channels, self.eps, self.momentum, self.affine, self.track_running_stats,
            device="meta",
        )
        conv.weight, conv.bias = take(self.weight), take(self.bias)
        conv.train(self.training)
        self._give_batch_norm_to(bn, take)
        return conv, bn


_INPUT_SHAPES = {3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


def _conv_arguments(conv: nn.Module) -> dict:
    """The constructor arguments a conv (nn.Conv2d, nn.ConvTranspose3d, ...)
    and its fused module share, read from either."""
    args = dict(
        in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    if conv.transposed:
        args["output_padding"] = conv.output_padding
    return args


def _batch_norm_arguments(bn: nn.Module) -> dict:
    """The constructor arguments a batch norm and a fused module share, read
    from either."""
    return dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats)


class _ConvBN(_ConvBNNd):
    """The constructor of nn.ConvNd's arguments, then nn.BatchNormNd's."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, ...]],
        stride: Union[int, Tuple[int, ...]] = 1,
        padding: Union[int, Tuple[int, ...], str] = 0,
        dilation: Union[int, Tuple[int, ...]] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        memory_efficient: bool = True,
        device=None,
        dtype=None,
        activation: str = "identity",
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    ) -> None:
        super().__init__()
        self._init_conv_bn(
            in_channels, out_channels, kernel_size, stride, padding, 0, dilation, groups, bias, padding_mode,
            eps, momentum, affine, track_running_stats, memory_efficient, device, dtype, activation, negative_slope,
        )


class _ConvTransposeBN(_ConvBNNd):
    """The constructor of nn.ConvTransposeNd's arguments (in their order:
    output_padding, groups, bias, dilation), then nn.BatchNormNd's."""

    _transposed = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, ...]],
        stride: Union[int, Tuple[int, ...]] = 1,
        padding: Union[int, Tuple[int, ...]] = 0,
        output_padding: Union[int, Tuple[int, ...]] = 0,
        groups: int = 1,
        bias: bool = False,
        dilation: Union[int, Tuple[int, ...]] = 1,
        padding_mode: str = "zeros",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        memory_efficient: bool = True,
        device=None,
        dtype=None,
        activation: str = "identity",
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    ) -> None:
        super().__init__()
        self._init_conv_bn(
            in_channels, out_channels, kernel_size, stride, padding, output_padding, dilation, groups, bias,
            padding_mode, eps, momentum, affine, track_running_stats, memory_efficient, device, dtype,
            activation, negative_slope,
        )


class ConvBN2d(_ConvBN):
    """``nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(out_channels, ...))`` as
    one operator, with the same arguments, numbers, train/eval behaviour and
    running statistics as that pair.

    Parameters and buffers (state_dict keys):
      weight, bias        the conv's (bias only when bias=True)
      bn_weight, bn_bias  batch norm's affine gamma and beta (affine=True)
      running_mean, running_var, num_batches_tracked
                          batch norm's statistics (track_running_stats=True)

    memory_efficient=True (default) keeps only the input, the weights and
    per-channel statistics for backward and recomputes the convolution there;
    False keeps the conv output, trading memory for one convolution less.
    Eval mode folds the statistics into the convolution.

    activation ('identity' by default, 'relu', 'relu6', 'leaky_relu' with
    negative_slope, 'silu', 'hardswish', 'sigmoid', 'gelu'; the last
    constructor arguments) makes it ``nn.Sequential(conv, bn, act)``: the
    activation is applied in the normalization's pass and differentiated in
    the backward's, and no output-sized tensor is kept for it.

    Models holding it script with torch.jit.script, compile with
    torch.compile(fullgraph=True) and export with torch.export.
    """

    _spatial_dims = 2
    _conv_type = nn.Conv2d
    _bn_type = nn.BatchNorm2d


class ConvBN1d(_ConvBN):
    """``nn.Sequential(nn.Conv1d(...), nn.BatchNorm1d(out_channels, ...))`` on
    (N, C, L) input as one operator: ConvBN2d's arguments, state_dict keys,
    memory modes and eval folding, for one spatial dimension."""

    _spatial_dims = 1
    _conv_type = nn.Conv1d
    _bn_type = nn.BatchNorm1d


class ConvBN3d(_ConvBN):
    """``nn.Sequential(nn.Conv3d(...), nn.BatchNorm3d(out_channels, ...))`` on
    (N, C, D, H, W) input as one operator: ConvBN2d's arguments, state_dict
    keys, memory modes and eval folding, for three spatial dimensions."""

    _spatial_dims = 3
    _conv_type = nn.Conv3d
    _bn_type = nn.BatchNorm3d


class ConvTransposeBN1d(_ConvTransposeBN):
    """``nn.Sequential(nn.ConvTranspose1d(...), nn.BatchNorm1d(out_channels,
    ...))`` on (N, C, L) input as one operator, with nn.ConvTranspose1d's
    arguments (output_padding; padding_mode 'zeros'; weight of shape
    (in_channels, out_channels / groups, k)). Eval mode folds the statistics
    into the transposed conv's weight along its output channels. forward
    takes no output_size: give the output_padding it implies instead."""

    _spatial_dims = 1
    _conv_type = nn.ConvTranspose1d
    _bn_type = nn.BatchNorm1d


class ConvTransposeBN2d(_ConvTransposeBN):
    """``nn.Sequential(nn.ConvTranspose2d(...), nn.BatchNorm2d(out_channels,
    ...))`` as one operator, as ConvTransposeBN1d for two spatial
    dimensions."""

    _spatial_dims = 2
    _conv_type = nn.ConvTranspose2d
    _bn_type = nn.BatchNorm2d


class ConvTransposeBN3d(_ConvTransposeBN):
    """``nn.Sequential(nn.ConvTranspose3d(...), nn.BatchNorm3d(out_channels,
    ...))`` as one operator, as ConvTransposeBN1d for three spatial
    dimensions."""

    _spatial_dims = 3
    _conv_type = nn.ConvTranspose3d
    _bn_type = nn.BatchNorm3d


# Every conv + batch norm module, by its (conv type, batch norm type).
CONV_BN_TYPES = {
    (cls._conv_type, cls._bn_type): cls
    for cls in (ConvBN1d, ConvBN2d, ConvBN3d, ConvTransposeBN1d, ConvTransposeBN2d, ConvTransposeBN3d)
}


class LinearBN1d(_FusedBatchNorm):
    """``nn.Sequential(nn.Linear(in_features, out_features, bias),
    nn.BatchNorm1d(out_features, ...))`` on (N, in_features) input, as one
    operator, with the same arguments, numbers, train/eval behaviour and
    running statistics as that pair.

    Parameters and buffers (state_dict keys): weight, bias (bias=True only),
    bn_weight, bn_bias (affine=True), running_mean, running_var,
    num_batches_tracked (track_running_stats=True). memory_efficient as in
    ConvBN2d: keep only the input, the weights and per-channel statistics for
    backward and recompute the matmul there. Eval mode folds the statistics
    into the linear layer.
    """

    __constants__ = [
        "in_features", "out_features", "eps", "momentum", "affine", "track_running_stats",
        "memory_efficient",
    ]

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
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"convbn: in_features and out_features must be positive, got {in_features} and {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.memory_efficient = memory_efficient
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._init_batch_norm(out_features, eps, momentum, affine, track_running_stats, factory)
        self.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(self._checked_input(input))

    def _checked_input(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and _is_fx_tracing():
            return input
        if input.dim() != 2 and not (self._bn_state_in_slot and input.dim() == 3):
            raise ValueError(
                f"convbn: LinearBN1d expects a 2-D input (N, in_features), got a {input.dim()}-D input "
                f"of shape {list(input.shape)}"
            )
        return input

    def _normalize(self, input: Tensor, group_name: Optional[str] = None, group_size: int = 1) -> Tensor:
        """linear + batch norm of the input; in training with the batch
        statistics of the process group group_name when given
        (SyncLinearBN1d), else of this process's batch."""
        use_batch_stats, running_mean, running_var, num_batches_tracked = self._statistics()
        if use_batch_stats and not torch.jit.is_scripting() and _is_in_onnx_export():
            # Updates cannot be exported (the 3-D form below would export
            # them as nothing). Refused here, naming the layer's class
            # (SyncLinearBN1d), before _linear_bn_prepared's own refusal.
            _refuse_onnx_export_of_updates(type(self).__name__, "linear_bn", running_mean, group_name)
        # (torch.fx.symbolic_trace records the 2-D form: a Proxy has no dim.)
        fx_tracing = not torch.jit.is_scripting() and _is_fx_tracing()
        if self._bn_state_in_slot and not fx_tracing and input.dim() == 3:
            # Only a LinearBN1d made by fuse gets here (see _checked_input):
            # nn.BatchNorm1d on (N, C, L) normalizes over N and L, the
            # operators over N; compute the pair as nn does.
            output = F.batch_norm(
                F.linear(input, self.weight, self.bias), running_mean, running_var, self.bn_weight,
                self.bn_bias, use_batch_stats, self._batch_norm_momentum(num_batches_tracked), self.eps,
            )
        else:
            output = _linear_bn_prepared(
                input, self.weight, self.bias, self.bn_weight, self.bn_bias,
                running_mean, running_var, num_batches_tracked, use_batch_stats, self.momentum, self.eps,
                self.memory_efficient, group_name, group_size,
            )
        return output

    def _batch_norm_momentum(self, num_batches_tracked: Optional[Tensor]) -> float:
        """nn.BatchNorm.forward's exponential average factor, counting this
        batch in num_batches_tracked as it does."""
        if num_batches_tracked is None:
            return 0.0 if self.momentum is None else self.momentum
        num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
        return momentum

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.bias is not None:
            s += ", bias=True"
        return s + self._batch_norm_repr()

    @classmethod
    def from_modules(cls, linear: nn.Linear, bn: nn.BatchNorm1d, memory_efficient: bool = True) -> "LinearBN1d":
        """A LinearBN1d holding copies of linear's and bn's parameters,
        buffers and hyper-parameters; it computes what bn(linear(x))
        computes on (N, in_features) input, and starts in bn's train/eval
        mode."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"convbn: from_modules expects an nn.Linear, got {type(linear).__name__}")
        if not isinstance(bn, nn.BatchNorm1d):
            raise TypeError(f"convbn: from_modules expects an nn.BatchNorm1d, got {type(bn).__name__}")
        if linear.out_features != bn.num_features:
            raise ValueError(
                f"convbn: the linear layer has {linear.out_features} output features but the batch norm "
                f"has num_features={bn.num_features}"
            )
        return cls._holding(linear, bn, memory_efficient, _copy_tensor)

    @classmethod
    def _holding(cls, linear: nn.Linear, bn: nn.BatchNorm1d, memory_efficient: bool, take) -> "LinearBN1d":
        """The module for (linear, bn), holding take(tensor) of each of theirs."""
        fused = cls(
            linear.in_features, linear.out_features, linear.bias is not None, bn.eps, bn.momentum,
            bn.affine, bn.track_running_stats, memory_efficient, device="meta",
        )
        fused.weight, fused.bias = take(linear.weight), take(linear.bias)
        fused._take_batch_norm_from(bn, take)
        return fused

    def to_modules(self) -> Tuple[nn.Linear, nn.BatchNorm1d]:
        """(nn.Linear, nn.BatchNorm1d) holding copies of this module's
        parameters, buffers and hyper-parameters, in its train/eval mode."""
        return self._split(_copy_tensor)

    def _split(self, take) -> Tuple[nn.Linear, nn.BatchNorm1d]:
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        bn = nn.BatchNorm1d(
            self.out_features, self.eps, self.momentum, self.affine, self.track_running_stats,
            device="meta",
        )
        linear.weight, linear.bias = take(self.weight), take(self.bias)
        linear.train(self.training)
        self._give_batch_norm_to(bn, take)
        return linear, bn


def _copy_tensor(t: Optional[Tensor]) -> Optional[Tensor]:
    """A copy of a parameter (still a Parameter, same requires_grad) or buffer."""
    if t is None:
        return None
    if isinstance(t, nn.Parameter):
        return nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
    return t.detach().clone()


def _share_tensor(t: Optional[Tensor]) -> Optional[Tensor]:
    """The tensor itself: convbn.fuse moves tensors between modules."""
    return t
