"""convbn.fuse and convbn.unfuse: replace every nn.Conv2d directly followed
by nn.BatchNorm2d with a ConvBN2d, and every nn.Linear directly followed by
nn.BatchNorm1d with a LinearBN1d; and back."""

import copy
import warnings
from typing import Dict, Optional, Tuple

import torch.fx
from torch import nn

from .modules import ConvBN2d, LinearBN1d

_FUSED_TYPES = (ConvBN2d, LinearBN1d)

# A fused module's state_dict keys for the batch norm's, by batch norm key.
_BN_KEYS = {
    "weight": "bn_weight",
    "bias": "bn_bias",
    "running_mean": "running_mean",
    "running_var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}


def _fused_type(first: nn.Module, bn: nn.Module):
    """The fused class for the pair (first, bn), or None when it is not one."""
    if type(first) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
        return ConvBN2d if first.out_channels == bn.num_features else None
    if type(first) is nn.Linear and isinstance(bn, nn.BatchNorm1d):
        return LinearBN1d if first.out_features == bn.num_features else None
    return None


def _fuse_pair(first: nn.Module, bn: nn.Module, names: Tuple[str, str], memory_efficient: bool) -> nn.Module:
    fused = _fused_type(first, bn).from_modules(first, bn, memory_efficient)
    # Where the pair lived (relative to the model fuse was given): unfuse puts
    # it back there, and the model accepts the pair's state_dict keys.
    fused._unfused_names = names
    return fused


def _fuse_sequentials(module: nn.Module, prefix: str, memory_efficient: bool) -> int:
    """Fuses adjacent (Conv2d, BatchNorm2d) and (Linear, BatchNorm1d)
    children of every nn.Sequential in place; the batch norm's slot becomes
    nn.Identity so indices (and the other children's state_dict keys) stay as
    they were."""
    fused = 0
    for name, child in module.named_children():
        fused += _fuse_sequentials(child, f"{prefix}{name}.", memory_efficient)
    if isinstance(module, nn.Sequential):
        names = list(module._modules.keys())
        for first, second in zip(names, names[1:]):
            layer, bn = module._modules[first], module._modules[second]
            if _fused_type(layer, bn) is not None:
                module._modules[first] = _fuse_pair(
                    layer, bn, (prefix + first, prefix + second), memory_efficient
                )
                module._modules[second] = nn.Identity()
                fused += 1
    return fused


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _FUSED_TYPES) or super().is_leaf_module(m, qualname)


def _fuse_graph(model: nn.Module, memory_efficient: bool) -> Optional[torch.fx.GraphModule]:
    """Fuses layer -> bn call pairs in model's fx graph. Returns a
    GraphModule, or None when the model has no such pair left or cannot be
    traced."""
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # fx cannot trace data-dependent control flow
        warnings.warn(
            f"convbn.fuse: torch.fx could not trace {type(model).__name__} ({error}); "
            "only pairs inside nn.Sequential were fused"
        )
        return None
    gm = torch.fx.GraphModule(model, graph)
    modules = dict(gm.named_modules())
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    fused = 0
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        layer_node = bn_node.args[0]
        if not isinstance(layer_node, torch.fx.Node) or layer_node.op != "call_module":
            continue
        layer, bn = modules[layer_node.target], modules[bn_node.target]
        # Only a layer whose output feeds nothing but this bn, each module
        # called once: otherwise fusing would change what the model computes.
        if _fused_type(layer, bn) is None or len(layer_node.users) != 1:
            continue
        if calls[layer_node.target] != 1 or calls[bn_node.target] != 1:
            continue
        parent_name, _, child_name = layer_node.target.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        setattr(parent, child_name,
                _fuse_pair(layer, bn, (layer_node.target, bn_node.target), memory_efficient))
        bn_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(bn_node)
        fused += 1
    if fused == 0:
        return None
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.train(model.training)
    return gm


def _accept_unfused_keys(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of a fused model: renames the keys of the
    model it was fused from (say `layer1.0.bn1.weight`) to the fused
    module's (`layer1.0.conv1.bn_weight`). Keys already in the fused form
    are left alone, so both forms load."""
    for name, sub in module.named_modules():
        names = sub.__dict__.get("_unfused_names")
        if not isinstance(sub, _FUSED_TYPES) or names is None:
            continue
        own = f"{prefix}{name}." if name else prefix
        bn_prefix = f"{prefix}{names[1]}."
        for bn_key, own_key in _BN_KEYS.items():
            if bn_prefix + bn_key in state_dict and own + own_key not in state_dict:
                state_dict[own + own_key] = state_dict.pop(bn_prefix + bn_key)


def fuse(model: nn.Module, memory_efficient: bool = True, inplace: bool = False) -> nn.Module:
    """Returns model with every nn.Conv2d directly followed by nn.BatchNorm2d
    replaced by a ConvBN2d, and every nn.Linear directly followed by
    nn.BatchNorm1d replaced by a LinearBN1d, with the same parameters, buffers
    and hyper-parameters, computing the same outputs in train and eval mode.

    Pairs inside nn.Sequential are replaced in place, keeping the model's
    classes. Pairs elsewhere (called one after the other in forward, as in a
    ResNet block) are found by tracing the model with torch.fx; the result is
    then a torch.fx.GraphModule with the same module names. A model fx cannot
    trace keeps only its Sequential fusions, with a warning. inplace=False
    (default) leaves model untouched.

    The fused model's load_state_dict also accepts the original model's
    state_dict (batch norm keys are renamed onto the fused modules);
    convbn.unfuse gives back a model whose state_dict the original loads.
    A fused LinearBN1d takes (N, in_features) input only.
    """
    if not inplace:
        model = copy.deepcopy(model)
    _fuse_sequentials(model, "", memory_efficient)
    traced = _fuse_graph(model, memory_efficient)
    if traced is not None:
        model = traced
    if not model.__dict__.get("_convbn_accepts_unfused_keys", False):
        model.register_load_state_dict_pre_hook(_accept_unfused_keys)
        model._convbn_accepts_unfused_keys = True
    return model


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inverse of fuse: every ConvBN2d / LinearBN1d becomes its
    (nn.Conv2d, nn.BatchNorm2d) / (nn.Linear, nn.BatchNorm1d) pair again, with
    copies of its values, at the names the pair had before fuse, so the
    original model loads the result's state_dict. A fused module that fuse
    did not make (one built by hand) becomes nn.Sequential(layer, bn) in its
    place."""
    if not inplace:
        model = copy.deepcopy(model)
    graph_changed = False
    for name, fused in list(model.named_modules()):
        if not isinstance(fused, _FUSED_TYPES) or not name:
            continue
        layer, bn = fused.to_modules()
        names = fused.__dict__.get("_unfused_names")
        bn_slot = _get_submodule_or_none(model, names[1]) if names is not None else None
        if names is not None and isinstance(bn_slot, nn.Identity):
            # A Sequential fusion: the batch norm's slot is still there.
            _set_submodule(model, name, layer)
            _set_submodule(model, names[1], bn)
        elif names is not None and bn_slot is None and isinstance(model, torch.fx.GraphModule):
            # A traced fusion: call the batch norm after the layer again.
            _set_submodule(model, name, layer)
            model.add_submodule(names[1], bn)
            for node in list(model.graph.nodes):
                if node.op == "call_module" and node.target == name:
                    with model.graph.inserting_after(node):
                        bn_node = model.graph.call_module(names[1], (node,))
                    node.replace_all_uses_with(bn_node, delete_user_cb=lambda user: user is not bn_node)
            graph_changed = True
        else:
            _set_submodule(model, name, nn.Sequential(layer, bn))
    if graph_changed:
        model.graph.lint()
        model.recompile()
    return model


def _get_submodule_or_none(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child_name] = module
