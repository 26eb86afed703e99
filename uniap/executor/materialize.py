"""Starting from the meta device: each rank materialises only its own shards.

A model built under ``torch.device("meta")`` has shapes but no storage. The executor splits
and shards it as usual (TP, FSDP and the stage root work on meta tensors), then
:func:`materialize_stage` allocates this rank's local shards (``to_empty``) and fills them
layer by layer: for each layer of the stage, a full copy of that one layer is allocated and
initialised, and each local shard is sliced out of it (``distribute_tensor`` with
``src_data_rank=None``: every rank slices its own copy, no communication). Peak parameter
memory per rank: its shards plus one full layer.

Buffers outside every layer must arrive real (built off the meta device, e.g. rotary
frequencies a model computes in ``__init__``): they are copied from the template.

Initialisation is plan-independent: layer ``u`` of the chain is initialised under the seed
``seed + u`` (in a forked RNG), by ``init_weights(layer)`` when given, else by every
submodule's ``reset_parameters()``. :func:`init_model` does the same on one process for the
whole model, so the same seed gives the same full parameters under every plan.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["init_layer", "init_model", "is_meta", "materialize_stage"]

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
    """Initialise one (materialised) layer, the ``index``-th of the chain, deterministically."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + index)
        if init_weights is not None:
            init_weights(layer)
        else:
            for m in layer.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()


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
    model.to_empty(device=device)
    for index, fqn in enumerate(layer_fqns):
        init_layer(model.get_submodule(fqn), index, seed=seed, init_weights=init_weights)
    return model


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
    copies of its layers, one at a time. ``model`` is the meta model the stage was split
    from; ``layer_fqns`` its whole chain (a layer's index there picks its seed)."""
    stage.to_empty(device=device)
    _restore_outside_layers(stage, model, layer_fqns)
    for index, fqn in enumerate(layer_fqns):
        try:
            target = stage.get_submodule(fqn)
        except AttributeError:
            continue  # another stage's layer
        full = copy.deepcopy(model.get_submodule(fqn)).to_empty(device=device)
        init_layer(full, index, seed=seed, init_weights=init_weights)
        sources = dict(full.named_parameters())
        sources.update(full.named_buffers())
        targets = dict(target.named_parameters())
        targets.update(target.named_buffers())
        for name, t in targets.items():
            src = sources[name].detach()
            if isinstance(t, DTensor):
                local = distribute_tensor(src, t.device_mesh, t.placements, src_data_rank=None)
                t.to_local().copy_(local.to_local())
            else:
                t.copy_(src)
        del full
    logger.info("materialised this rank's shards of %d layer(s)", len(list(stage.modules())))


def _restore_outside_layers(stage: nn.Module, model: nn.Module, layer_fqns: Sequence[str]) -> None:
    """Copy back the buffers outside every layer that the template holds for real (e.g.
    rotary frequencies a model computes in ``__init__``, built off the meta device):
    ``to_empty`` left them uninitialised."""
    real = {n: b for n, b in model.named_buffers() if not b.is_meta}
    for name, b in stage.named_buffers():
        if name in real and not any(name == f or name.startswith(f + ".") for f in layer_fqns):
            b.copy_(real[name])
