"""Measuring what a model keeps for backward."""

from typing import Callable, Iterable

import torch


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd keeps for backward while fn() runs
    (torch.autograd.graph.saved_tensors_hooks), each storage counted once;
    tensors sharing storage with one in `exclude` (e.g. the input, which the
    caller keeps anyway) are not counted."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    for t in exclude:
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())
