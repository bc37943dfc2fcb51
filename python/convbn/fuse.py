"""convbn.fuse and convbn.unfuse: replace a model's nn.Conv2d -> nn.BatchNorm2d
and nn.Linear -> nn.BatchNorm1d pairs by ConvBN2d / LinearBN1d in place in
its own module tree, and back.

How fuse decides. torch.fx traces the model's forward (or, where the whole
forward does not trace, each block that does) three times: with every module
in training mode, in eval mode, and in the modes they have now, because
forwards branch on self.training. A conv (or linear) layer and a batch norm
are fused only when, in every one of those graphs that can see them, each
call of the layer feeds its output to that batch norm and to nothing else,
and each call of the batch norm takes such an output; and when nothing else
could change what they compute or how they are saved: exact nn types (a
subclass may have its own forward), no hooks, eps > 0, matching channels,
dtypes and devices. Everything else is left alone and listed, with the
reason, in the FuseReport (fuse(..., report=True)).

How fuse replaces. The layer's slot gets the fused module, holding the very
same parameter and buffer tensors (so optimizers and references built
before an in-place fuse still see them); the batch norm's slot gets a
FusedBatchNormSlot, which passes the fused output through and stands in for
the batch norm in the model's state_dict. The fused model's state_dict
therefore has exactly the original's keys: checkpoints load both ways as
they are, through pickling and deepcopy, and unfuse only swaps modules
back. The model keeps its class, its forward, its hooks elsewhere, its
shared and its unused modules.

Activations. A fused conv pair also takes the activation module after it
(nn.SiLU, nn.ReLU, ...: what convbn.activation.activation_of maps) when,
in every graph that sees the batch norm, each of its calls feeds its
output to one call of that module and to nothing else, as its sole
argument, under the same grad and autocast modes, and every call of the
module takes such an output: a module shared by several places is left
alone, as are modules with hooks. (Where the example runs decided the
pair, they decide the activation too.) The fused module then applies the
activation in its normalization pass, and the activation's place holds a
FusedActivationSlot, which passes its input through and remembers the
module for unfuse. Activations hold no tensors: the state_dict keys stay
the original's. Activations called as functions (F.relu(x)) stay in forward."""

import contextlib
import copy
import logging
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .activation import activation_of
from .modules import (
    _BATCH_NORM_NAMES, _BN_ATTRIBUTES, CONV_BN_TYPES, ConvBN2d, LinearBN1d, _ConvBNNd, _FusedBatchNorm, _share_tensor,
    default_num_batches_tracked,
)

_log = logging.getLogger("convbn.fuse")

# The pairs fuse converts: (layer type, batch norm type) -> fused type. Exact
# types only: a subclass may have its own forward.
_FUSED_TYPE = {**CONV_BN_TYPES, (nn.Linear, nn.BatchNorm1d): LinearBN1d}
_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)

# A batch norm's state_dict keys and the fused module's attribute for each.
_BN_STATE = dict(zip(_BATCH_NORM_NAMES, _BN_ATTRIBUTES))
_BN_PARAMETERS = ("weight", "bias")


class FusedBatchNormSlot(nn.Module):
    """What convbn.fuse leaves where a batch norm was: forward passes the
    fused layer's output through (the fused module before it already
    normalized it), and the batch norm's state lives on under its old names.

    - state_dict / load_state_dict use the batch norm's keys (weight, bias,
      running_mean, running_var, num_batches_tracked), reading and writing
      the fused module's tensors, so checkpoints interchange with the
      original model.
    - weight, bias, running_mean, running_var, num_batches_tracked, eps,
      momentum read and assign the fused module's.
    - train()/eval() on the slot set the fused module's mode too, as they
      set the batch norm's before (code that freezes batch norms by name
      keeps working).
    """

    _version = 2  # nn.BatchNorm's: version 2 added num_batches_tracked
    __jit_unused_properties__ = [
        "fused", "weight", "bias", "running_mean", "running_var", "num_batches_tracked", "eps",
        "momentum", "num_features", "affine", "track_running_stats",
    ]

    def __init__(self, fused: _FusedBatchNorm) -> None:
        super().__init__()
        # A plain reference, not a submodule: the fused module lives (and is
        # saved, moved, trained) at the layer's slot.
        self.__dict__["_fused"] = fused

    @property
    def fused(self) -> _FusedBatchNorm:
        """The fused module (ConvBN2d, LinearBN1d or a Sync variant) holding
        this batch norm."""
        return self.__dict__["_fused"]

    def _relink(self, fused: _FusedBatchNorm) -> None:
        self.__dict__["_fused"] = fused

    def forward(self, input: Tensor) -> Tensor:
        return input

    # The batch norm's attributes, read from and written to the fused module.
    weight = property(lambda self: self.fused.bn_weight, lambda self, v: setattr(self.fused, "bn_weight", v))
    bias = property(lambda self: self.fused.bn_bias, lambda self, v: setattr(self.fused, "bn_bias", v))
    running_mean = property(lambda self: self.fused.running_mean,
                            lambda self, v: setattr(self.fused, "running_mean", v))
    running_var = property(lambda self: self.fused.running_var,
                           lambda self, v: setattr(self.fused, "running_var", v))
    num_batches_tracked = property(lambda self: self.fused.num_batches_tracked,
                                   lambda self, v: setattr(self.fused, "num_batches_tracked", v))
    eps = property(lambda self: self.fused.eps, lambda self, v: setattr(self.fused, "eps", v))
    momentum = property(lambda self: self.fused.momentum, lambda self, v: setattr(self.fused, "momentum", v))
    num_features = property(lambda self: self.fused.running_mean.numel() if self.fused.running_mean is not None
                            else self.fused.weight.shape[0])
    affine = property(lambda self: self.fused.affine)
    track_running_stats = property(lambda self: self.fused.track_running_stats)

    def __setattr__(self, name: str, value) -> None:
        # nn.Module.__setattr__ would register a Parameter or tensor on the
        # slot itself; the batch norm's belong to the fused module.
        if name in _BN_STATE or name in ("eps", "momentum"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def train(self, mode: bool = True) -> "FusedBatchNormSlot":
        super().train(mode)
        self.fused.training = mode
        return self

    # The slot registers no parameters of its own (the fused module does), so
    # that per-module parameter walks (optimizer param groups, DDP) never see
    # one twice; what nn.BatchNorm's methods do on them is forwarded here.
    def requires_grad_(self, requires_grad: bool = True) -> "FusedBatchNormSlot":
        for name in _BN_PARAMETERS:
            p = getattr(self.fused, _BN_STATE[name])
            if p is not None:
                p.requires_grad_(requires_grad)
        return self

    def reset_running_stats(self) -> None:
        self.fused.reset_running_stats()

    def reset_parameters(self) -> None:
        self.fused._reset_batch_norm()

    def _bn_tensors(self) -> Dict[str, Optional[Tensor]]:
        return {name: getattr(self.fused, attr) for name, attr in _BN_STATE.items()}

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for name, tensor in self._bn_tensors().items():
            if tensor is not None:
                destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        default_num_batches_tracked(state_dict, prefix, local_metadata, self.fused.num_batches_tracked)
        # nn.Module's own loader (shape checks, copy or assign, messages),
        # run on the fused module's tensors under the batch norm's names.
        tensors = self._bn_tensors()
        self._parameters = {name: tensors[name] for name in _BN_PARAMETERS}
        self._buffers = {name: t for name, t in tensors.items() if name not in _BN_PARAMETERS}
        # load_state_dict(assign=True) assigns through this class's
        # __setattr__, that is onto the fused module.
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            self._parameters, self._buffers = {}, {}

    def extra_repr(self) -> str:
        return f"fused into the preceding {type(self.fused).__name__}"


class FusedActivationSlot(nn.Module):
    """What convbn.fuse leaves where an activation module was (nn.SiLU,
    nn.ReLU, ...) whose work the fused module before it now does in its
    normalization pass: forward passes its input through. `activation` is
    the original module, which convbn.unfuse puts back. Activations hold no
    tensors, so the model's state_dict keys do not change."""

    __jit_unused_properties__ = ["activation"]

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        # A plain reference, not a submodule: it no longer runs, and must not
        # show in the model's modules() (nor be fused again).
        self.__dict__["_activation"] = activation
        self.training = activation.training

    @property
    def activation(self) -> nn.Module:
        """The activation module this slot stands for."""
        return self.__dict__["_activation"]

    def forward(self, input: Tensor) -> Tensor:
        return input

    def train(self, mode: bool = True) -> "FusedActivationSlot":
        super().train(mode)
        self.activation.train(mode)
        return self

    def extra_repr(self) -> str:
        return f"{self.activation!r}, applied by the preceding fused module"


# ---------------------------------------------------------------------------
# The report.

@dataclass
class FusedPair:
    layer: str
    bn: str
    kind: str        # "ConvBN2d" or "LinearBN1d"
    found_in: str    # "the model's forward" or "block `name`'s forward"
    # The activation module fused with the pair (its name) and the activation
    # the fused module applies ("silu", "leaky_relu", ...); None when none.
    activation: Optional[str] = None
    fused_activation: Optional[str] = None

    def __str__(self) -> str:
        text = f"{self.layer} -> {self.bn}"
        if self.activation is not None:
            text += f" -> {self.activation}"
        text += f" as {self.kind}"
        if self.fused_activation is not None:
            text += f"(activation={self.fused_activation!r})"
        return f"{text} (seen in {self.found_in})"


@dataclass
class LeftAlone:
    layer: str
    bn: str
    reason: str


@dataclass
class ActivationLeftAlone:
    """An activation module after a fused pair's batch norm that fuse did
    not fuse with the pair (it still runs at its place)."""

    activation: str  # the activation module's name
    bn: str          # the batch norm whose output it takes
    reason: str


@dataclass
class FuseReport:
    """What convbn.fuse did: the pairs it fused (with the activation module
    fused with each, if any), every layer -> batch norm pair it saw and left
    alone with the reason, the activation modules after fused pairs it did
    not fuse and why, and the forwards it could not trace (pairs in them, if
    any, were left alone)."""

    fused: List[FusedPair] = field(default_factory=list)
    left_alone: List[LeftAlone] = field(default_factory=list)
    untraced: List[Tuple[str, str]] = field(default_factory=list)
    activations_left_alone: List[ActivationLeftAlone] = field(default_factory=list)

    def __str__(self) -> str:
        with_activation = sum(p.activation is not None for p in self.fused)
        lines = [f"convbn.fuse: fused {len(self.fused)} pair(s), left {len(self.left_alone)} alone; "
                 f"fused {with_activation} activation(s), left {len(self.activations_left_alone)} alone"]
        lines += [f"  fused       {p}" for p in self.fused]
        lines += [f"  left alone  {p.layer} -> {p.bn}: {p.reason}" for p in self.left_alone]
        lines += [f"  activation left alone  {p.activation} after {p.bn}: {p.reason}"
                  for p in self.activations_left_alone]
        lines += [f"  not traced  {name or '(the model)'}: {error}" for name, error in self.untraced]
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Finding the pairs.

class _Tracer(torch.fx.Tracer):
    """Keeps layers, batch norms of any class, convbn's modules and the
    modules in `opaque` as single calls, so the graph shows which module's
    output feeds which. A module built inside forward (seq[1:]) is traced
    through. Remembers the innermost module whose forward failed."""

    def __init__(self, opaque: set) -> None:
        super().__init__()
        self.opaque = opaque
        self.failed_in: Optional[nn.Module] = None
        # Per module-call node: grad mode and autocast state around the call
        # (fx runs `with torch.no_grad():` for real but records no trace of
        # it), and the values hooks of traced-through modules observe.
        self.context: Dict[torch.fx.Node, Tuple] = {}
        self.observed: Dict[torch.fx.Node, str] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (id(m) in self.opaque
                or isinstance(m, (_LAYER_TYPES, _BatchNorm, _FusedBatchNorm, FusedBatchNormSlot))
                or super().is_leaf_module(m, qualname))

    def call_module(self, m, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:  # not registered anywhere: made in forward
            return forward(*args, **kwargs)
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost: its handler runs first
                self.failed_in = m
            raise
        if isinstance(result, torch.fx.Proxy) and result.node.op == "call_module":
            self.context[result.node] = _call_context()
        if _has_hooks(m):  # a hook may keep or change what goes in and out
            for value in (args, kwargs, result):
                for node in _nodes_in(value):
                    self.observed.setdefault(node, f"hooks of {type(m).__name__}")
        return result


def _call_context() -> Tuple:
    autocast = tuple(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")) if _AUTOCAST_BY_DEVICE else ()
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) + autocast


try:
    torch.is_autocast_enabled("cpu")
    _AUTOCAST_BY_DEVICE = True
except TypeError:  # older torch
    _AUTOCAST_BY_DEVICE = False

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, name, None) for name in _HOOK_DICTS)


def _found_in(value, kind: type, levels: Optional[int] = None) -> list:
    """The objects of type kind in value: value itself, or in the lists,
    tuples, sets and dicts it nests (at most `levels` deep, when given)."""
    if isinstance(value, kind):
        return [value]
    if levels == 0:
        return []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple, set)):
        inner = None if levels is None else levels - 1
        return [found for v in value for found in _found_in(v, kind, inner)]
    return []


def _nodes_in(value) -> List[torch.fx.Node]:
    """The fx nodes of the Proxies in value (any module attribute may hold
    one, so only a few levels of nesting are searched)."""
    return [proxy.node for proxy in _found_in(value, torch.fx.Proxy, levels=4)]


def _stored_values(root: nn.Module):
    """(label, value) of every plain attribute of root's modules: what
    forward may have stored there (self.features = x)."""
    for name, m in root.named_modules():
        for attr, value in m.__dict__.items():
            if attr not in ("_parameters", "_buffers", "_modules"):
                yield f"the attribute {name + '.' if name else ''}{attr}", value


def _mode_settings(modules: List[nn.Module]) -> List[List[bool]]:
    """Training flags for modules to analyse forward under: as they are now,
    all in training mode, all in eval mode (without repeats)."""
    settings = []
    for flags in ([m.training for m in modules], [True] * len(modules), [False] * len(modules)):
        if flags not in settings:
            settings.append(flags)
    return settings


@dataclass
class _Traced:
    """What one mode setting's traces saw. graphs: (name of the traced
    module, module, graph). covered: the ids of every module some graph
    would show a call of."""

    graphs: List[Tuple[str, nn.Module, torch.fx.Graph]] = field(default_factory=list)
    covered: set = field(default_factory=set)
    untraced: List[Tuple[str, str]] = field(default_factory=list)
    context: Dict[torch.fx.Node, Tuple] = field(default_factory=dict)
    # Other uses of a node than its graph users: a module attribute forward
    # stored it in, a hook that sees it.
    observed: Dict[torch.fx.Node, str] = field(default_factory=dict)
    # Modules whose parameters or buffers forward reads directly (get_attr):
    # self.conv.forward(x), F.batch_norm(x, self.bn.running_mean, ...).
    read_directly: Dict[int, str] = field(default_factory=dict)
    # Activation modules whose forward runs other than by calling the module
    # (self.act.forward(x)): the graph shows no call of them, and they hold
    # no tensor whose read would show.
    called_directly: set = field(default_factory=set)
    # Every graph's module calls: module id -> its call nodes, and node -> module.
    calls: Dict[int, List[torch.fx.Node]] = field(default_factory=dict)
    owner: Dict[torch.fx.Node, nn.Module] = field(default_factory=dict)


def _error_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _trace(module: nn.Module, name: str, traced: _Traced, seen: set) -> None:
    """Traces module's forward, each submodule whose forward does not trace
    kept as one opaque call (and traced on its own, recursively). Where
    module's own forward does not trace, its children are traced on their
    own (code in that forward may then use their submodules unseen: see
    _unseen_callers_reason)."""
    if id(module) in seen:
        return
    seen.add(id(module))
    opaque: Dict[int, nn.Module] = {}
    while True:
        tracer = _Tracer(set(opaque))
        try:
            graph = tracer.trace(module)
            traced.context.update(tracer.context)
            traced.observed.update(tracer.observed)
            _record_stored_proxies(module, traced)
            break
        except Exception as error:  # fx cannot trace data-dependent Python
            failed = tracer.failed_in
            if failed is None or failed is module or id(failed) in opaque:
                traced.untraced.append((name, _error_line(error)))
                for child_name, child in module.named_children():
                    if child._modules and not isinstance(child, (_FusedBatchNorm, FusedBatchNormSlot)):
                        _trace(child, f"{name}.{child_name}" if name else child_name, traced, seen)
                return
            opaque[id(failed)] = failed
    traced.graphs.append((name, module, graph))
    for node in graph.nodes:
        if node.op == "get_attr":
            owner_name = node.target.rpartition(".")[0]
            owner = module.get_submodule(owner_name) if owner_name else module
            traced.read_directly.setdefault(id(owner), node.target)
    inside_opaque = {id(sub) for m in opaque.values() for sub in m.modules() if sub is not m}
    traced.covered.update(id(sub) for sub in module.modules() if id(sub) not in inside_opaque)
    names = {id(m): n for n, m in module.named_modules()}
    for m in opaque.values():
        full = f"{name}.{names[id(m)]}" if name else names[id(m)]
        _trace(m, full, traced, seen)


def _record_stored_proxies(root: nn.Module, traced: _Traced) -> None:
    """Values forward stored on a module (self.features = x) are uses fx's
    graph does not show; fuse restores the attributes afterwards."""
    for label, value in _stored_values(root):
        for node in _nodes_in(value):
            traced.observed.setdefault(node, label)


@contextlib.contextmanager
def _model_state_restored(model: nn.Module):
    """Tracing and example runs execute forward's Python: put back every
    module attribute it assigns (counters, cached tensors, fx Proxies) and
    the random generators it draws from."""
    saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
             for m in model.modules()]
    try:
        with _random_state_restored():
            yield
    finally:
        for m, attributes, parameters, buffers, modules in saved:
            m.__dict__.clear()
            m.__dict__.update(attributes)
            for live, kept in ((m._parameters, parameters), (m._buffers, buffers), (m._modules, modules)):
                live.clear()
                live.update(kept)


@contextlib.contextmanager
def _random_state_restored():
    """Python's, torch's CPU and (initialized) CUDA generators as they were."""
    python_random = random.getstate()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python_random)


def _trace_in_modes(model: nn.Module) -> List[_Traced]:
    """Traces with every module in training mode, in eval mode, and in the
    modes they have now; restores every module's flag afterwards."""
    modules = list(model.modules())
    results = []
    with _model_state_restored(model):  # the flags too, and the forwards _watch_forwards sets
        called_directly: set = set()
        # fx records a call of an activation module (a leaf) without running
        # its forward: whatever runs it is a direct call.
        _watch_forwards(model, lambda m: called_directly.add(id(m)))
        for flags in _mode_settings(modules):
            for m, flag in zip(modules, flags):
                m.training = flag
            traced = _Traced(called_directly=called_directly)
            _trace(model, "", traced, set())
            results.append(traced)
    return results


def _is_activation_module(m: Optional[nn.Module]) -> bool:
    """An activation module: one the fused modules can apply, or any of
    torch.nn's activations (nn.Tanh, GELU(approximate='tanh'), ...: reported
    when one follows a fused pair)."""
    if m is None or type(m) in (nn.Identity, nn.MultiheadAttention):
        return False
    return activation_of(m) is not None or type(m).__module__ == nn.Tanh.__module__


def _watch_forwards(model: nn.Module, on_forward) -> None:
    """Sets an instance-level forward on each activation module of model
    that calls on_forward(module) and then the class's forward. (The caller
    restores the modules' __dict__.)"""
    for m in model.modules():
        if _is_activation_module(m):
            def forward(*args, _module=m, **kwargs):
                on_forward(_module)
                return type(_module).forward(_module, *args, **kwargs)
            m.__dict__["forward"] = forward


@dataclass
class _Candidate:
    layer: nn.Module
    bn: nn.Module
    block: Optional[str]  # the traced module whose graph shows the pair ("" the model, None: a run)


def _find_candidates(traced_modes: List[_Traced]) -> Tuple[List[_Candidate], List[Tuple[nn.Module, nn.Module, str]]]:
    """Layer -> batch norm call edges seen in the graphs, each checked against
    every mode's calls: (pairs whose calls are all layer-then-bn, pairs seen
    but not, with the reason)."""
    edges: Dict[Tuple[int, int], Tuple[nn.Module, nn.Module]] = {}
    refusals: Dict[Tuple[int, int], str] = {}
    blocks: Dict[Tuple[int, int], str] = {}
    for traced in traced_modes:
        calls: Dict[int, List[torch.fx.Node]] = defaultdict(list)
        owner: Dict[torch.fx.Node, nn.Module] = {}
        traced.calls, traced.owner = calls, owner
        for block, root, graph in traced.graphs:
            for node in graph.nodes:
                if node.op == "call_module":
                    module = root.get_submodule(node.target)
                    calls[id(module)].append(node)
                    owner[node] = module
            for node in graph.nodes:
                module = owner.get(node)
                source = node.args[0] if node.args else node.kwargs.get("input")
                if not isinstance(module, _BatchNorm) or not isinstance(source, torch.fx.Node):
                    continue
                layer = owner.get(source)
                if isinstance(layer, _LAYER_TYPES):
                    key = (id(layer), id(module))
                    edges.setdefault(key, (layer, module))
                    blocks.setdefault(key, block)
        for key, (layer, bn) in edges.items():
            if key in refusals:
                continue
            layer_calls, bn_calls = calls.get(id(layer), []), calls.get(id(bn), [])
            if not layer_calls and not bn_calls:
                if id(layer) not in traced.covered or id(bn) not in traced.covered:
                    refusals[key] = "the forward calling it could not be traced with the modules in some train/eval modes"
                continue
            reason = _calls_reason(layer_calls, bn_calls, owner, layer, bn)
            for node in layer_calls:
                if reason is None and node in traced.observed:
                    reason = f"the layer's output is also kept by {traced.observed[node]}"
            for node in bn_calls:
                if reason is None and node in traced.observed:
                    reason = f"the batch norm's input or output is seen by {traced.observed[node]}"
                if reason is None and traced.context.get(node) != traced.context.get(node.args[0] if node.args else None):
                    reason = ("the layer and the batch norm run under different grad or autocast modes "
                              "(torch.no_grad(), autocast) in forward")
            for m, what in ((layer, "layer"), (bn, "batch norm")):
                if reason is None and id(m) in traced.read_directly:
                    reason = (f"forward reads the {what}'s tensors directly ({traced.read_directly[id(m)]}), "
                              "not only by calling it")
            if reason is not None:
                refusals[key] = reason
    candidates, left = [], []
    for key, (layer, bn) in edges.items():
        if key in refusals:
            left.append((layer, bn, refusals[key]))
        else:
            candidates.append(_Candidate(layer, bn, blocks[key]))
    return candidates, left


def _sole_argument(node: torch.fx.Node):
    """The argument of a call with exactly one (positional or keyword), else None."""
    if len(node.args) + len(node.kwargs) != 1:
        return None
    return node.args[0] if node.args else next(iter(node.kwargs.values()))


def _graph_activation(traced_modes: List[_Traced], bn: nn.Module) -> Tuple[Optional[nn.Module], Optional[str]]:
    """The activation module the graphs show taking the batch norm's output.
    (act, None) when, in every mode's graphs, each call of bn feeds its
    output to one call of act and to nothing else, as act's sole argument and
    under the same grad and autocast modes, and each call of act takes such
    an output (act is not shared with other places); (act, reason) when an
    activation module takes bn's output but not so; (None, None) when none
    does."""
    followers: Dict[int, nn.Module] = {}
    for traced in traced_modes:
        for node in traced.calls.get(id(bn), []):
            for user in node.users:
                m = traced.owner.get(user)
                if _is_activation_module(m):
                    followers.setdefault(id(m), m)
    if not followers:
        return None, None
    act = next(iter(followers.values()))
    if len(followers) > 1:
        return act, "the batch norm's output feeds more than one activation module"
    for traced in traced_modes:
        for node in traced.calls.get(id(bn), []):
            users = list(node.users)
            others = [u.name for u in users if traced.owner.get(u) is not act]
            if others:
                return act, f"the batch norm's output is also used by {', '.join(others[:3])}"
            if len(users) != 1:
                return act, ("a call of the batch norm does not feed the activation" if not users
                             else "the activation is applied to the batch norm's output more than once")
            if node in traced.observed:
                return act, f"the batch norm's output is seen by {traced.observed[node]}"
        for node in traced.calls.get(id(act), []):
            source = _sole_argument(node)
            if not isinstance(source, torch.fx.Node) or traced.owner.get(source) is not bn:
                return act, ("the activation module is also called on other inputs than this batch norm's "
                             "output (one module shared by several places)")
            if traced.context.get(node) != traced.context.get(source):
                return act, ("the batch norm and the activation run under different grad or autocast modes "
                             "(torch.no_grad(), autocast) in forward")
        if id(act) in traced.called_directly:
            return act, "forward runs the activation module's forward directly (act.forward(x)), not only by calling it"
    return act, None


def _calls_reason(layer_calls, bn_calls, owner, layer, bn) -> Optional[str]:
    """None when every call of layer feeds only bn, as bn's sole argument, and
    every call of bn takes such an output; else what breaks that."""
    for node in layer_calls:
        if len(node.args) + len(node.kwargs) != 1:
            return "the layer is called with more than its input (a transposed conv's output_size)"
        users = list(node.users)
        if len(users) != 1:
            others = [u.name for u in users if owner.get(u) is not bn] or [u.name for u in users]
            return f"the layer's output is also used by {', '.join(others[:3])}"
        user = users[0]
        if owner.get(user) is not bn:
            return f"a call of the layer feeds {user.name}, not this batch norm"
        if len(user.args) != 1 or user.kwargs:
            return "the batch norm is called with more than the layer's output"
    for node in bn_calls:
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or owner.get(source) is not layer:
            return "the batch norm is also applied to other inputs"
    if len(layer_calls) != len(bn_calls):
        return "the layer and the batch norm are called different numbers of times"
    return None


def _module_reason(layer: nn.Module, bn: nn.Module) -> Optional[str]:
    """Why this layer/batch norm pair cannot become a fused module, or None."""
    fused_type = _FUSED_TYPE.get((type(layer), type(bn)))
    if fused_type is None:
        if type(bn) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            return (f"the batch norm is a {type(bn).__name__}, not nn.BatchNorm1d/2d/3d (a subclass may have its "
                    "own forward)")
        if type(layer) not in {conv for conv, _ in _FUSED_TYPE}:
            return (f"the layer is a {type(layer).__name__}; fuse converts nn.Conv1d/2d/3d and "
                    "nn.ConvTranspose1d/2d/3d followed by the batch norm of their rank, and nn.Linear -> "
                    "nn.BatchNorm1d")
        return f"{type(layer).__name__} -> {type(bn).__name__} is not a pair fuse converts"
    for what, m in (("layer", layer), ("batch norm", bn)):
        for hooks in _HOOK_DICTS + ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                                    "_load_state_dict_post_hooks"):
            if getattr(m, hooks, None):
                return f"the {what} has {hooks.strip('_').replace('_', ' ')} (they would no longer run)"
    for what, m, standard in (("layer", layer, {"weight", "bias"}),
                              ("batch norm", bn, {"weight", "bias", *_BN_STATE})):
        extra = (set(m._parameters) | set(m._buffers)) - standard
        if extra:
            return f"the {what} holds more than its standard tensors ({', '.join(sorted(extra))})"
        if m._non_persistent_buffers_set:
            return f"the {what} has non-persistent buffers ({', '.join(sorted(m._non_persistent_buffers_set))})"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != bn.num_features:
        return f"the layer has {channels} output channels but the batch norm num_features={bn.num_features}"
    if not (isinstance(bn.eps, (int, float)) and math.isfinite(bn.eps) and bn.eps > 0):
        return f"the batch norm's eps={bn.eps}; the fused module needs eps > 0"
    if bn.momentum is not None and not math.isfinite(bn.momentum):
        return f"the batch norm's momentum={bn.momentum}"
    if bn.track_running_stats and (bn.running_mean is None or bn.running_var is None):
        return "the batch norm tracks running statistics but has none"
    tensors = [t for t in (layer.weight, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
               if t is not None]
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        kinds = sorted({f"{t.dtype} on {t.device}" for t in tensors})
        return f"the pair's tensors differ in dtype or device ({', '.join(kinds)})"
    if any(type(t) not in (Tensor, nn.Parameter) for t in tensors):
        return "the pair holds tensor subclasses"
    return None



# ---------------------------------------------------------------------------
# Finding the pairs by running the model on an example input: for forwards
# fx cannot trace. Every module call and every torch function a layer's
# output reaches is recorded, on a copy of the model (a training-mode run
# moves running statistics), with the random number generators restored.

# Reading a tensor's metadata does not depend on its values.
_METADATA_READS = {"shape", "size", "dim", "ndim", "ndimension", "dtype", "device", "is_cuda", "requires_grad",
                   "numel", "nelement", "is_contiguous", "stride", "layout", "__len__", "is_floating_point",
                   "element_size", "is_complex", "names", "grad_fn", "is_leaf", "data_ptr"}


@dataclass
class _LayerCall:
    output: Tensor
    layer: nn.Module
    context: Tuple = ()
    uses: List[str] = field(default_factory=list)
    bn_calls: List[nn.Module] = field(default_factory=list)


@dataclass
class _NormCall:
    """A batch norm call's output and what took it: the activation modules
    called on it alone (under the batch norm's grad and autocast modes), and
    every other use."""

    output: Tensor
    bn: nn.Module
    context: Tuple = ()
    uses: List[str] = field(default_factory=list)
    activations: List[nn.Module] = field(default_factory=list)


class _UseRecorder(torch.overrides.TorchFunctionMode):
    def __init__(self, *tables: Dict[int, object]) -> None:
        super().__init__()
        self.tables = tables
        self.inside_leaf = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside_leaf and getattr(func, "__name__", "") not in _METADATA_READS:
            for t in _found_in((args, kwargs), Tensor):
                for outputs in self.tables:
                    call = outputs.get(id(t))
                    if call is not None and call.output is t:
                        call.uses.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


_RunVerdicts = Dict[Tuple[int, int], Tuple[nn.Module, nn.Module, Optional[str]]]
_RunActivations = Dict[int, Tuple[Optional[nn.Module], Optional[str]]]


def _run_verdicts(model: nn.Module,
                  example_inputs: tuple) -> Tuple[_RunVerdicts, List[Tuple[str, str]], _RunActivations]:
    """Runs copies of model on example_inputs with every module in training
    mode, in eval mode and in the modes they have now. Returns, for every
    layer -> batch norm call seen, None when every call of the layer fed
    only that batch norm, as its sole argument, and every call of the batch
    norm took such an output (in every run), else the reason; the runs
    that failed; and for every batch norm whose output an activation module
    took, id(bn) -> (the activation module, None when it can be fused with
    the batch norm, else the reason): when every call of the batch norm fed
    its output only to that module, as its sole argument, and every call of
    that module took such an output (as _graph_activation)."""
    verdicts: _RunVerdicts = {}
    failures = []
    activations: _RunActivations = {}
    act_inputs: Dict[int, List[Optional[nn.Module]]] = defaultdict(list)  # over all runs
    called_directly: set = set()
    originals = [m for _, m in model.named_modules(remove_duplicate=False)]
    for i, flags in enumerate(_mode_settings(originals)):
        copied = copy.deepcopy(model)
        copies = [m for _, m in copied.named_modules(remove_duplicate=False)]
        original_of = {id(c): o for c, o in zip(copies, originals)}
        for m, flag in zip(copies, flags):
            m.training = flag
        outputs: Dict[int, _LayerCall] = {}
        layer_calls: Dict[int, List[_LayerCall]] = defaultdict(list)
        bn_inputs: Dict[int, List[Optional[_LayerCall]]] = defaultdict(list)
        norm_outputs: Dict[int, _NormCall] = {}
        norm_calls: Dict[int, List[_NormCall]] = defaultdict(list)
        run_act_inputs: Dict[int, List[Optional[nn.Module]]] = defaultdict(list)
        in_call: set = set()
        recorder = _UseRecorder(outputs, norm_outputs)

        def pre_hook(module, args, kwargs):
            is_leaf = not module._modules
            original = original_of[id(module)]
            is_activation = _is_activation_module(original)
            sole = len(args) == 1 and not kwargs
            for t in _found_in((args, kwargs), Tensor):
                call = outputs.get(id(t))
                if call is not None and call.output is t:
                    if isinstance(module, _BatchNorm) and sole and args[0] is t and call.context == _call_context():
                        call.bn_calls.append(original)
                    elif is_leaf:
                        call.uses.append(type(module).__name__)
                norm = norm_outputs.get(id(t))
                if norm is not None and norm.output is t:
                    if is_activation and sole and args[0] is t and norm.context == _call_context():
                        norm.activations.append(original)
                    elif is_leaf or _has_hooks(original):  # a hook would see it
                        norm.uses.append(type(module).__name__)
            if isinstance(module, _BatchNorm):
                source = outputs.get(id(args[0])) if len(args) == 1 and isinstance(args[0], Tensor) else None
                bn_inputs[id(original)].append(source if source is not None and source.output is args[0] else None)
            if is_activation:
                in_call.add(id(module))
                source = norm_outputs.get(id(args[0])) if sole and isinstance(args[0], Tensor) else None
                run_act_inputs[id(original)].append(
                    source.bn if source is not None and source.output is args[0] else None)
            if is_leaf:
                recorder.inside_leaf += 1

        def post_hook(module, args, output):
            original = original_of[id(module)]
            if not module._modules:
                recorder.inside_leaf -= 1
            if isinstance(module, _LAYER_TYPES) and isinstance(output, Tensor):
                call = _LayerCall(output, original, _call_context())
                outputs[id(output)] = call
                layer_calls[id(call.layer)].append(call)
            if _is_activation_module(original):
                in_call.discard(id(module))
                norm = norm_outputs.get(id(output)) if isinstance(output, Tensor) else None
                if norm is not None and norm.output is output and len(args) == 1 and args[0] is output:
                    # An in-place activation returns the batch norm's output
                    # itself, activated: what uses it from here on (through
                    # either name) sees the activated values, as in the
                    # fused model.
                    del norm_outputs[id(output)]
            elif module._modules and _has_hooks(original):
                for t in _found_in(output, Tensor):
                    norm = norm_outputs.get(id(t))
                    if norm is not None and norm.output is t:
                        norm.uses.append(f"hooks of {type(module).__name__}")
            if isinstance(module, _BatchNorm) and isinstance(output, Tensor):
                norm = _NormCall(output, original, _call_context())
                norm_outputs[id(output)] = norm
                norm_calls[id(original)].append(norm)

        for m in copies:
            m.register_forward_pre_hook(pre_hook, with_kwargs=True)
            m.register_forward_hook(post_hook)
        # The forward of an activation module run other than through its
        # __call__ (act.forward(x)): no hook sees it.
        _watch_forwards(copied, lambda m: None if id(m) in in_call else called_directly.add(id(original_of[id(m)])))
        try:
            with _random_state_restored(), recorder:
                result = copied(*example_inputs)
        except Exception as error:
            failures.append((f"run {'in the current modes' if i == 0 else ('in training mode' if flags[0] else 'in eval mode')}", _error_line(error)))
            continue
        for t in _found_in(result, Tensor):
            for table in (outputs, norm_outputs):
                call = table.get(id(t))
                if call is not None and call.output is t:
                    call.uses.append("the model's output")
        for label, value in _stored_values(copied):
            for t in _found_in(value, Tensor):
                for table in (outputs, norm_outputs):
                    call = table.get(id(t))
                    if call is not None and call.output is t:
                        call.uses.append(label)
        edges = {(id(c.layer), id(bn)): (c.layer, bn) for calls in layer_calls.values() for c in calls for bn in c.bn_calls}
        for key, (layer, bn) in edges.items():
            reason = None
            for c in layer_calls[id(layer)]:
                if c.uses:
                    reason = f"the layer's output is also used by {', '.join(c.uses[:3])}"
                elif c.bn_calls != [bn]:
                    reason = "a call of the layer does not feed this batch norm"
            if reason is None and any(src is None or src.layer is not layer for src in bn_inputs[id(bn)]):
                reason = "the batch norm is also applied to other inputs"
            previous = verdicts.get(key)
            verdicts[key] = (layer, bn, previous[2] if previous and previous[2] else reason)
        for key, inputs in run_act_inputs.items():
            act_inputs[key] += inputs
        for key, calls in norm_calls.items():
            act, reason = _run_activation(calls)
            if key in activations:
                previous_act, previous_reason = activations[key]
                if previous_act is not act:
                    act = act or previous_act
                    reason = "the batch norm's output does not feed the same activation module in every train/eval mode"
                reason = previous_reason or reason
            activations[key] = (act, reason)
    for key, (act, reason) in activations.items():
        if act is None or reason is not None:
            continue
        if any(source is None or id(source) != key for source in act_inputs[id(act)]):
            reason = ("the activation module is also called on other inputs than this batch norm's output "
                      "(one module shared by several places)")
        elif id(act) in called_directly:
            reason = "forward runs the activation module's forward directly (act.forward(x)), not only by calling it"
        activations[key] = (act, reason)
    return verdicts, failures, activations


def _run_activation(calls: List[_NormCall]) -> Tuple[Optional[nn.Module], Optional[str]]:
    """One run's view of a batch norm's calls: (None, None) when no
    activation module took its output, else (the module, the reason it
    cannot be fused, or None)."""
    followers = {id(a): a for c in calls for a in c.activations}
    if not followers:
        return None, None
    act = next(iter(followers.values()))
    if len(followers) > 1:
        return act, "the batch norm's output feeds more than one activation module"
    for c in calls:
        if c.uses:
            return act, f"the batch norm's output is also used by {', '.join(c.uses[:3])}"
        if c.activations != [act]:
            return act, ("a call of the batch norm does not feed the activation" if not c.activations
                         else "the activation is applied to the batch norm's output more than once")
    return act, None


# ---------------------------------------------------------------------------
# Replacing.

def _registrations(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str, str]]]:
    """Every place a module is registered: id -> [(parent, child name, full name)]."""
    places: Dict[int, List[Tuple[nn.Module, str, str]]] = defaultdict(list)
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is not None:
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                if all(p is not parent or c != child_name for p, c, _ in places[id(child)]):
                    places[id(child)].append((parent, child_name, full))
    return places


def _adopt(layer: nn.Module, bn: nn.Module, memory_efficient: bool,
           activation: Optional[Tuple[str, float]] = None) -> _FusedBatchNorm:
    """The fused module for (layer, bn), holding their very tensors, applying
    activation (name, negative_slope) when given."""
    fused_type = _FUSED_TYPE[(type(layer), type(bn))]
    if activation is None:
        fused = fused_type._holding(layer, bn, memory_efficient, _share_tensor)
    else:
        fused = fused_type._holding(layer, bn, memory_efficient, _share_tensor, activation)
    fused._bn_state_in_slot = True
    return fused


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _activation_reason(act: nn.Module, layer: nn.Module, bn: nn.Module, places) -> Optional[str]:
    """Why the activation module act, which takes only (layer, bn)'s output,
    cannot be fused with them (its type, hooks, tensors), or None."""
    if not issubclass(_FUSED_TYPE[(type(layer), type(bn))], _ConvBNNd):
        return f"{_FUSED_TYPE[(type(layer), type(bn))].__name__} applies no activation"
    if activation_of(act) is None:
        return (f"{act!r} is not an activation the fused modules apply (nn.ReLU, nn.ReLU6, nn.Hardtanh(0, 6), "
                "nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.GELU(approximate='none'))")
    for hooks in _HOOK_DICTS + ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                                "_load_state_dict_post_hooks"):
        if getattr(act, hooks, None):
            return f"the activation module has {hooks.strip('_').replace('_', ' ')} (they would no longer run)"
    if act._parameters or act._buffers or act._modules:
        return "the activation module holds parameters, buffers or submodules"
    if id(act) not in places:
        return "the activation module is not registered in the model"
    for parent, _, full in places[id(act)]:
        # fx does not trace into torch.nn's own modules, so a call they make
        # (nn.TransformerEncoderLayer(activation=act)) shows in no graph.
        if not isinstance(parent, _CONTAINERS) and torch.fx.Tracer().is_leaf_module(parent, ""):
            return (f"the activation module is also registered as {full!r} in {type(parent).__name__}, "
                    "whose forward fuse cannot see")
    return None


def _parameter_order_reason(layer: nn.Module, bn: nn.Module, order: Dict[int, int]) -> Optional[str]:
    """The fused module lists the layer's parameters, then the batch norm's:
    model.parameters() keeps its order (which optimizer state_dicts and
    parameters_to_vector rely on) only when that is already the order."""
    ids = [order[id(p)] for p in (layer.weight, layer.bias, bn.weight, bn.bias) if p is not None]
    if ids and ids != list(range(ids[0], ids[0] + len(ids))):
        return ("the batch norm's parameters do not directly follow the layer's in model.parameters(); "
                "fusing would reorder them (optimizer state_dicts and parameters_to_vector depend on the order)")
    return None


def _unseen_callers_reason(c: _Candidate, places, untraced: Dict[str, str]) -> Optional[str]:
    """A forward fx could not trace may call any module registered below it,
    unseen: then the pair's calls are not all known. None when no such
    forward holds the layer or the batch norm."""
    return _unseen_use_reason((c.layer, c.bn), places, untraced)


def _unseen_use_reason(modules, places, untraced: Dict[str, str]) -> Optional[str]:
    """As _unseen_callers_reason, for any modules."""
    for m in modules:
        for _, _, full in places[id(m)]:
            for name in untraced:
                if name == "" or full.startswith(name + "."):
                    return (f"{'the model' if name == '' else name}'s forward, which holds it, could not be traced "
                            f"({untraced[name]}), so code there may use {full} unseen")
    return None


def _set_everywhere(places, module: nn.Module) -> None:
    for parent, child_name, _ in places:
        parent._modules[child_name] = module


def _activation_of_pair(c: _Candidate, traced_modes: List[_Traced], run_activations: _RunActivations, places,
                        untraced: Dict[str, str]) -> Tuple[Optional[nn.Module], Optional[str]]:
    """The activation module after the fused pair c's batch norm: (None,
    None) when none takes its output, else (the module, None when it can be
    fused with the pair, else the reason). The graphs decide where they
    decided the pair, else the example runs."""
    if c.block is None:
        act, reason = run_activations.get(id(c.bn), (None, None))
    else:
        act, reason = _graph_activation(traced_modes, c.bn)
    if act is None or reason is not None:
        return act, reason
    reason = _activation_reason(act, c.layer, c.bn, places)
    if reason is None and c.block is not None:
        # A forward fx could not trace may call the module unseen; the
        # example runs (when given) saw every call, there too.
        unseen = _unseen_use_reason((act,), places, untraced)
        if unseen is not None:
            run_act, run_reason = run_activations.get(id(c.bn), (None, None))
            if run_act is act:
                reason = run_reason
            else:
                hint = "" if run_activations else "; pass example_inputs=(x,) to decide by running the model"
                reason = unseen + hint
    return act, reason


def fuse(model: nn.Module, memory_efficient: bool = True, inplace: bool = False, report: bool = False,
         example_inputs: Optional[tuple] = None, activations: bool = True):
    """Replaces every nn.Conv2d -> nn.BatchNorm2d and nn.Linear ->
    nn.BatchNorm1d pair of `model` that can be fused without changing what
    the model computes by a ConvBN2d / LinearBN1d, in the model's own module
    tree: the model keeps its class and forward.

    The fused module takes the layer's place (holding the same parameter and
    buffer tensors); the batch norm's place holds a FusedBatchNormSlot that
    passes the output through and keeps the batch norm's state_dict keys, so
    the fused model's state_dict has the original's keys. A pair is fused
    when torch.fx shows, in training and eval mode, that every call of the
    layer feeds only that batch norm (see the module docstring); every other
    pair is left alone.

    Where a forward fx cannot trace holds a pair (a drop-path block that
    draws random numbers with a traced shape, a branch on a value), the
    pair is left alone unless example_inputs (a tuple of the model's
    positional arguments) is given: fuse then also runs copies of the model
    on it, in training mode, eval mode and the current modes, records which
    module and function each layer output reaches, and fuses a pair the
    graphs could not see whole when every run shows it used only as the pair.

    activations=True (default) also fuses the activation module that takes
    a fused conv pair's output (nn.ReLU, nn.ReLU6, nn.Hardtanh(0, 6),
    nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.GELU(); exact types,
    in place or not) when it is the batch norm's only user, as its sole
    argument, in every mode, and takes nothing else anywhere (a module that
    several places share, as torchvision's ResNet blocks share self.relu, is
    left alone; so are those with hooks): the fused module applies it in its
    normalization pass, and its place holds a FusedActivationSlot, which
    passes its input through. Activations called as functions (F.relu(x))
    are in forward's code and stay there; their pairs fuse without them.

    inplace=False (default) fuses a deep copy. report=True returns
    (model, FuseReport): the pairs fused (with their activation), those left
    alone and why, the activation modules after fused pairs left alone and
    why, and the forwards fx could not trace. The report is also logged (logger
    "convbn.fuse", level INFO). A LinearBN1d made by fuse computes the
    unfused pair on input of more than 2 dimensions, as nn.BatchNorm1d
    takes (N, C, L).
    """
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as error:
            raise RuntimeError(
                f"convbn.fuse: cannot copy the model ({_error_line(error)}); fuse(model, inplace=True) "
                "fuses it in place instead"
            ) from error
    traced_modes = _trace_in_modes(model)
    candidates, seen_but_not = _find_candidates(traced_modes)
    verdicts, run_failures, run_activations = {}, [], {}
    if example_inputs is not None:
        if not isinstance(example_inputs, tuple):
            raise TypeError("convbn.fuse: example_inputs must be a tuple of the model's positional arguments, "
                            f"e.g. (x,); got {type(example_inputs).__name__}")
        verdicts, run_failures, run_activations = _run_verdicts(model, example_inputs)
    places = _registrations(model)
    names = {id(m): name for name, m in model.named_modules()}
    untraced: Dict[str, str] = {}
    for traced in traced_modes:
        for name, error in traced.untraced:
            untraced.setdefault(name, error)
    result = FuseReport()
    for layer, bn, reason in seen_but_not:
        result.left_alone.append(LeftAlone(names.get(id(layer), "?"), names.get(id(bn), "?"), reason))
    decided = {(id(c.layer), id(c.bn)) for c in candidates} | {(id(l), id(b)) for l, b, _ in seen_but_not}
    for key, (layer, bn, reason) in verdicts.items():
        if key not in decided:  # only a run saw this pair
            candidates.append(_Candidate(layer, bn, None))
    order = {id(p): i for i, p in enumerate(model.parameters())}
    global_hooks = any(getattr(nn.modules.module, f"_global{name}", None) for name in _HOOK_DICTS)
    claimed: set = set()  # the activation modules fused
    for c in candidates:
        layer_name, bn_name = names[id(c.layer)], names[id(c.bn)]
        reason = _module_reason(c.layer, c.bn)
        if reason is None and global_hooks:
            reason = "global module hooks are registered (nn.modules.module.register_module_forward_hook...)"
        if reason is None:
            reason = _parameter_order_reason(c.layer, c.bn, order)
        unseen = None if reason is not None or c.block is None else _unseen_callers_reason(c, places, untraced)
        if reason is None and (c.block is None or unseen):
            # Graphs do not show every use: the example runs decide.
            verdict = verdicts.get((id(c.layer), id(c.bn)))
            if verdict is not None and run_failures:
                reason = f"the example run failed ({run_failures[0][1]})"
            elif verdict is not None:
                reason = verdict[2]
                c.block = None
            else:
                reason = unseen
                if example_inputs is None:
                    reason += "; pass example_inputs=(x,) to decide by running the model"
        if reason is not None:
            result.left_alone.append(LeftAlone(layer_name, bn_name, reason))
            continue
        act, act_reason = None, None
        if activations:
            act, act_reason = _activation_of_pair(c, traced_modes, run_activations, places, untraced)
            if act is not None and act_reason is None and id(act) in claimed:
                act_reason = "another fused pair took it"
            if act is not None and act_reason is not None:
                result.activations_left_alone.append(
                    ActivationLeftAlone(names.get(id(act), "?"), bn_name, act_reason))
                act = None
        fused = _adopt(c.layer, c.bn, memory_efficient, None if act is None else activation_of(act))
        slot = FusedBatchNormSlot(fused)
        slot.train(c.bn.training)
        _set_everywhere(places[id(c.layer)], fused)
        _set_everywhere(places[id(c.bn)], slot)
        if act is not None:
            claimed.add(id(act))
            _set_everywhere(places[id(act)], FusedActivationSlot(act))
        where = ("a run on example_inputs" if c.block is None
                 else f"{c.block}'s forward" if c.block else "the model's forward")
        result.fused.append(FusedPair(layer_name, bn_name, type(fused).__name__, where,
                                      None if act is None else names[id(act)],
                                      None if act is None else fused.activation))
    result.untraced = sorted(untraced.items()) + run_failures
    _log.info("%s", result)
    return (model, result) if report else model


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inverse of fuse: every ConvBN2d / LinearBN1d that fuse made becomes
    its nn.Conv2d / nn.Linear again, its FusedBatchNormSlot the
    nn.BatchNorm2d / nn.BatchNorm1d, holding the same tensors, and its
    FusedActivationSlot (when fuse fused an activation) the very activation
    module it stands for, at the same names: the result is the original
    model's layout and state_dict. A fused module fuse did not make (one
    built by hand) becomes nn.Sequential(layer, bn) in its place, or
    nn.Sequential(layer, bn, activation) when it applies one."""
    if not inplace:
        model = copy.deepcopy(model)
    places = _registrations(model)
    for slot in list({id(m): m for m in model.modules() if isinstance(m, FusedActivationSlot)}.values()):
        if id(slot) in places:
            slot.activation.train(slot.training)
            _set_everywhere(places[id(slot)], slot.activation)
    slots: Dict[int, List[FusedBatchNormSlot]] = defaultdict(list)
    for m in model.modules():
        if isinstance(m, FusedBatchNormSlot):
            slots[id(m.fused)].append(m)
    for fused in list({id(m): m for m in model.modules() if isinstance(m, _FusedBatchNorm)}.values()):
        if id(fused) not in places:  # the model itself
            continue
        layer, bn = fused._split(_share_tensor)  # the very tensors, in fused's mode
        mine = slots.get(id(fused), [])
        if mine:
            _set_everywhere(places[id(fused)], layer)
            for slot in mine:
                _set_everywhere(places[id(slot)], bn)
        elif getattr(fused, "activation", "identity") != "identity":
            _set_everywhere(places[id(fused)], nn.Sequential(layer, bn, fused.activation_module()))
        else:
            _set_everywhere(places[id(fused)], nn.Sequential(layer, bn))
    return model
