"""convbn.fuse: replace every nn.Conv2d directly followed by nn.BatchNorm2d
with a ConvBN2d."""

import copy
import warnings

import torch.fx
from torch import nn

from .modules import ConvBN2d


def _is_pair(conv, bn) -> bool:
    return (
        type(conv) is nn.Conv2d
        and isinstance(bn, nn.BatchNorm2d)
        and conv.out_channels == bn.num_features
    )


def _fuse_sequentials(module: nn.Module, memory_efficient: bool) -> int:
    """Fuses adjacent (Conv2d, BatchNorm2d) children of every nn.Sequential
    in place; the batch norm's slot becomes nn.Identity so indices (and the
    other children's state_dict keys) stay as they were."""
    fused = 0
    for child in module.children():
        fused += _fuse_sequentials(child, memory_efficient)
    if isinstance(module, nn.Sequential):
        names = list(module._modules.keys())
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if _is_pair(conv, bn):
                module._modules[first] = ConvBN2d.from_modules(conv, bn, memory_efficient)
                module._modules[second] = nn.Identity()
                fused += 1
    return fused


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ConvBN2d) or super().is_leaf_module(m, qualname)


def _fuse_graph(model: nn.Module, memory_efficient: bool):
    """Fuses conv -> bn call pairs in model's fx graph. Returns a GraphModule,
    or None when the model has no such pair left or cannot be traced."""
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
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    fused = 0
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        conv_node = bn_node.args[0]
        if not isinstance(conv_node, torch.fx.Node) or conv_node.op != "call_module":
            continue
        conv, bn = modules[conv_node.target], modules[bn_node.target]
        # Only a conv whose output feeds nothing but this bn, each module
        # called once: otherwise fusing would change what the model computes.
        if not _is_pair(conv, bn) or len(conv_node.users) != 1:
            continue
        if calls[conv_node.target] != 1 or calls[bn_node.target] != 1:
            continue
        parent_name, _, child_name = conv_node.target.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        setattr(parent, child_name, ConvBN2d.from_modules(conv, bn, memory_efficient))
        bn_node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(bn_node)
        fused += 1
    if fused == 0:
        return None
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.train(model.training)
    return gm


def fuse(model: nn.Module, memory_efficient: bool = True, inplace: bool = False) -> nn.Module:
    """Returns model with every nn.Conv2d directly followed by nn.BatchNorm2d
    replaced by a ConvBN2d with the same parameters, buffers and
    hyper-parameters, computing the same outputs in train and eval mode.

    Pairs inside nn.Sequential are replaced in place, keeping the model's
    classes. Pairs elsewhere (conv and bn called one after the other in
    forward) are found by tracing the model with torch.fx; the result is then
    a torch.fx.GraphModule. A model fx cannot trace keeps only its Sequential
    fusions, with a warning. inplace=False (default) leaves model untouched.
    """
    if not inplace:
        model = copy.deepcopy(model)
    _fuse_sequentials(model, memory_efficient)
    traced = _fuse_graph(model, memory_efficient)
    return model if traced is None else traced
