"""Small torch helpers shared by the tracer, the measuring code, the executor and the model
adapters, each of which must not depend on the others: a tensor's storage identity (for
counting bytes once per storage), mapping the tensors of a nested value and placing a module at
an FQN of a module tree.

Nothing here imports ``torch.distributed``: the graph tracer (planner side) uses it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "attach_module",
    "call_args",
    "local_tensor",
    "map_tensors",
    "parent_of",
    "storage_key",
    "tensors_in",
]


def call_args(inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of a model's forward for a batch: a mapping (a dict, a Hugging Face
    ``BatchEncoding``) is the keyword inputs, a tuple or list the positional inputs, anything
    else the one positional input."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def map_tensors(fn: Any, value: Any) -> Any:
    """Apply ``fn`` to every tensor in a (nested) tuple, list or mapping, in order; other values
    pass. Named tuples and mapping subclasses (a Hugging Face ``ModelOutput``) keep their type
    where it can be rebuilt."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuple
        return type(value)(*(map_tensors(fn, v) for v in value))
    if isinstance(value, tuple):
        return tuple(map_tensors(fn, v) for v in value)
    if isinstance(value, list):
        return [map_tensors(fn, v) for v in value]
    if isinstance(value, Mapping):
        items = {k: map_tensors(fn, v) for k, v in value.items()}
        if type(value) is dict:
            return items
        try:
            return type(value)(**items)
        except TypeError:
            return items
    return value


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value`` (nested tuples, lists and mappings: a Hugging Face
    ``ModelOutput`` or ``BatchEncoding``) in :func:`map_tensors`' order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors_in(v)]
    if isinstance(value, tuple | list):
        return [t for v in value for t in tensors_in(v)]
    return []


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (its ``_local_tensor``); any other tensor itself. Read by
    attribute so that this module needs no ``torch.distributed``."""
    return getattr(t, "_local_tensor", t)


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    """``(storage id, bytes)`` of the storage ``t`` keeps alive (a DTensor's local shard's):
    views share their base's id. The id is the storage object's address, valid on meta and
    fake tensors too (whose ``data_ptr`` is 0); storage-less tensor subclasses count as their
    own storage of ``t.nbytes``."""
    t = local_tensor(t)
    try:
        storage = t.untyped_storage()
        return storage._cdata, storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return id(t), t.nbytes


def parent_of(root: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    """(module that will own ``fqn``'s last component, that component), creating plain
    containers on the way."""
    parent = root
    *path, leaf = fqn.split(".")
    for part in path:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    return parent, leaf


def attach_module(root: nn.Module, fqn: str, module: nn.Module) -> None:
    """Place ``module`` at ``fqn`` under ``root``, creating plain containers on the way."""
    parent, leaf = parent_of(root, fqn)
    parent.add_module(leaf, module)
