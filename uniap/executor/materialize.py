"""Starting from the meta device: each rank materialises only its own shards.

A model built under ``torch.device("meta")`` has shapes but no storage. The executor splits
and shards it as usual (TP, FSDP and the stage root work on meta tensors), then
:func:`materialize_stage` allocates this rank's local shards (``to_empty``) and fills them one
*init unit* at a time: for each unit holding some of the stage's tensors, a full copy of that
one unit is allocated and initialised, and each local shard is sliced out of it
(``distribute_tensor`` with ``src_data_rank=None``: every rank slices its own copy, no
communication). Peak parameter memory per rank: its shards plus one full unit.

Init units, in order: the layers of the chain, then every module outside the layers that owns
parameters or buffers (a rotary table, a final norm that is no layer), in the model's module
order. Unit ``u`` is initialised under the seed ``seed + u`` (in a forked RNG) by
``init_weights(unit)`` when given, else by the Hugging Face model's own ``_init_weights``
applied to every submodule (a model with one), else by every submodule's
``reset_parameters()``. A tensor held by several units (tied weights) takes the value of the
last unit holding it, as initialising the units in place one after the other would. A tensor
the template holds for real (a buffer built off the meta device) is copied as it is.
:func:`init_model` does exactly that on one process for the whole model, so the same seed gives
the same full parameters under every plan. Parameters and buffers owned by the model itself
(outside every submodule) cannot be initialised this way and are refused.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = [
    "default_init",
    "fill_unit",
    "init_layer",
    "init_model",
    "init_units",
    "is_meta",
    "materialize_stage",
    "materialize_unit",
    "to_empty_keeping_ties",
]

logger = logging.getLogger(__name__)


def is_meta(module: nn.Module) -> bool:
    """True when some parameter or buffer of ``module`` is on the meta device."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


@torch.no_grad()
def init_layer(
    layer: nn.Module,
    index: int,
    *,
    seed: int,
    init_weights: Callable[[nn.Module], None] | None = None,
) -> None:
    """Initialise one (materialised) init unit, the ``index``-th, deterministically."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + index)
        if init_weights is not None:
            init_weights(layer)
        else:
            for m in layer.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def to_empty_keeping_ties(module: nn.Module, device: torch.device | str) -> None:
    """``module.to_empty(device=device)``, then every parameter registered under several names
    (tied weights) is one tensor again (``to_empty`` allocates each registration its own
    parameter, so references to a parameter taken before it are stale: take them by name)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for sub in module.modules():
        for key, p in sub._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((sub, key))
    module.to_empty(device=device)
    for entries in holders.values():
        owner, key = entries[0]
        first = owner._parameters[key]
        for sub, k in entries[1:]:
            if sub._parameters[k] is not first:
                sub._parameters[k] = first


def init_units(model: nn.Module, layer_fqns: Sequence[str]) -> list[str]:
    """The init units of ``model`` (see the module docstring): the layers, then the modules
    outside them that directly own parameters or buffers. Refuses state owned by the model
    itself, naming it."""
    units = list(layer_fqns)
    for name, t in _tensors(model):
        if any(_under(name, f) for f in layer_fqns) or not t.is_meta:
            continue
        owner = name.rpartition(".")[0]
        if not owner:
            raise ValueError(
                f"{type(model).__name__} is on the meta device and owns {name!r} itself "
                "(outside every submodule): it cannot be initialised by a module's init; build "
                "the model on the CPU, or move it into a submodule"
            )
        if owner not in units:
            units.append(owner)
    return units


def default_init(model: nn.Module) -> Callable[[nn.Module], None] | None:
    """The Hugging Face model's own ``_init_weights`` applied to every submodule of a unit,
    for a model that has one; None (``reset_parameters()``) otherwise."""
    hf_init = getattr(model, "_init_weights", None)
    if not callable(hf_init):
        return None
    return lambda unit: unit.apply(hf_init)


def init_model(
    model: nn.Module,
    layer_fqns: Sequence[str],
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    init_weights: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Materialise a meta ``model`` on one device and initialise it exactly as
    :func:`materialize_stage` does under any plan (the single-process reference)."""
    units = init_units(model, layer_fqns)
    init = init_weights or default_init(model)
    real = {n: t.detach().clone() for n, t in _tensors(model) if not t.is_meta}
    to_empty_keeping_ties(model, device)
    for index, fqn in enumerate(units):
        init_layer(model.get_submodule(fqn), index, seed=seed, init_weights=init)
    with torch.no_grad():
        for name, t in _tensors(model):
            if name in real:
                t.copy_(real[name])
    return model


@torch.no_grad()
def fill_unit(
    unit: nn.Module,
    template: nn.Module,
    index: int,
    *,
    device: torch.device | str,
    seed: int = 0,
    init_weights: Callable[[nn.Module], None] | None = None,
) -> None:
    """Allocate ``unit`` (a copy of the meta ``template`` unit, the ``index``-th init unit) on
    ``device`` in place and initialise it as every plan does; tensors the template holds for
    real are copied as they are."""
    to_empty_keeping_ties(unit, device)
    init_layer(unit, index, seed=seed, init_weights=init_weights)
    real = {n: t for n, t in _tensors(template) if not t.is_meta}
    for name, t in _tensors(unit):
        if name in real:
            t.copy_(real[name].detach())


def materialize_unit(
    template: nn.Module,
    index: int,
    *,
    device: torch.device | str,
    seed: int = 0,
    init_weights: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """A full, initialised copy of init unit ``template`` (the ``index``-th, on the meta
    device) on ``device``: what :func:`materialize_stage` slices a rank's shards from, and
    what the profiler times, one unit at a time."""
    full = copy.deepcopy(template)
    fill_unit(full, template, index, device=device, seed=seed, init_weights=init_weights)
    return full


@torch.no_grad()
def materialize_stage(
    stage: nn.Module,
    model: nn.Module,
    layer_fqns: Sequence[str],
    *,
    device: torch.device,
    seed: int = 0,
    init_weights: Callable[[nn.Module], None] | None = None,
) -> None:
    """Allocate ``stage``'s local shards on ``device`` and fill them from full, initialised
    copies of the init units holding them, one at a time. ``model`` is the meta model the
    stage was split from, ``layer_fqns`` its whole chain; ``stage`` holds its tensors at the
    model's names (any of a tied tensor's names)."""
    units = init_units(model, layer_fqns)
    init = init_weights or default_init(model)
    template = {name: id(t) for name, t in _tensors(model)}
    last: dict[int, tuple[int, str]] = {}  # template tensor -> (last unit holding it, name in it)
    for u, path in enumerate(units):
        for rel, t in _tensors(model.get_submodule(path)):
            last[id(t)] = (u, rel)
    to_empty_keeping_ties(stage, device)
    wanted: dict[int, list[tuple[torch.Tensor, str]]] = {}
    for name, t in _tensors(stage):
        tid = template.get(name)
        if tid is not None and tid in last:
            u, rel = last[tid]
            wanted.setdefault(u, []).append((t, rel))
    for u in sorted(wanted):
        full = materialize_unit(
            model.get_submodule(units[u]), u, device=device, seed=seed, init_weights=init
        )
        sources = dict(_tensors(full))
        for t, rel in wanted[u]:
            src = sources[rel].detach()
            if isinstance(t, DTensor):
                local = distribute_tensor(src, t.device_mesh, t.placements, src_data_rank=None)
                t.to_local().copy_(local.to_local())
            else:
                t.copy_(src)
        del full
    real = {n: t for n, t in _tensors(model) if not t.is_meta}
    for name, t in _tensors(stage):  # real in the template (e.g. a buffer built off meta)
        if name in real:
            src = real[name].detach().to(device)
            if isinstance(t, DTensor):
                local = distribute_tensor(src, t.device_mesh, t.placements, src_data_rank=None)
                t.to_local().copy_(local.to_local())
            else:
                t.copy_(src)
    logger.info("materialised this rank's shards from %d init unit(s)", len(wanted))
