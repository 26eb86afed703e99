"""The global gradient norm of a parallelised model, and clipping by it.

After ``train_step`` every rank holds, for each parameter of its stage, either the whole
gradient (plain tensors: classic DDP layers, whose gradients are all-reduced, and the non-TP
parameters of TP layers, identical over the TP group) or a DTensor piece of it (FSDP shards,
TP shards, ``replicate``). Every rank of a stage takes part in every layer of the stage
(``dp * tp`` is the stage size), so the stage's norm is computed on each of its ranks:

1. the gradients are grouped by (mesh, placements), plain tensors in one group of their own;
2. each group's norm is ``torch.nn.utils.get_total_norm`` (multi-tensor kernels); for a
   DTensor group it is a partial or replicated DTensor, made whole with ``full_tensor()``
   (one all-reduce over that group's mesh: the shards' sums of ``|g|^p``; replicated
   dimensions are counted once);
3. the groups' norms combine into the stage's norm (identical on the stage's ranks);
4. with ``pp > 1`` the stages' ``norm^p`` are summed (``max`` for ``inf``) by one all-reduce
   over the rank's pipeline lane (one rank per stage).

The result is the norm ``torch.nn.utils.clip_grad_norm_`` computes on one process holding the
whole model; clipping multiplies every local gradient (plain or shard) by
``min(1, max_norm / (norm + 1e-6))``, as torch does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

__all__ = ["clip_grad_norm_", "total_grad_norm"]


def _groups(params: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Parameters with a gradient, grouped so that no group mixes plain tensors and DTensors,
    DTensors of different meshes / placements, or gradients on different devices (host-memory
    shards of FSDP-offload layers next to device ones; first-seen order, the same on every
    rank)."""
    by_key: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        key = (
            (g.device_mesh, tuple(g.placements), g.device.type) if isinstance(g, DTensor) else None
        )
        by_key.setdefault(key, []).append(p)
    return list(by_key.values())


def total_grad_norm(
    params: Iterable[torch.Tensor],
    norm_type: float = 2.0,
    *,
    pp_group: dist.ProcessGroup | None,
    device: torch.device,
    foreach: bool | None = None,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """The ``norm_type``-norm of the gradients of the whole model (all stages), a plain 0-dim
    float32 tensor on ``device``, the same on every rank. Collective over every mesh of the
    rank's stage and over ``pp_group``."""
    norm_type = float(norm_type)
    parts: list[torch.Tensor] = []
    for group in _groups(params):
        n = torch.nn.utils.get_total_norm(
            [p.grad for p in group], norm_type, error_if_nonfinite=False, foreach=foreach
        )
        if isinstance(n, DTensor):
            # a host-memory shard's partial norm reduces over the mesh's device (e.g. NCCL)
            n = n.to(device).full_tensor() if n.device != device else n.full_tensor()
        parts.append(n.float().reshape(()).to(device))
    if parts:
        local = torch.linalg.vector_norm(torch.stack(parts), norm_type)
    else:
        local = torch.zeros((), dtype=torch.float32, device=device)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        if math.isinf(norm_type):
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=pp_group)
        else:
            local = local**norm_type
            dist.all_reduce(local, group=pp_group)
            local = local ** (1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(local):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite ({float(local)}); "
            "pass error_if_nonfinite=False to clip anyway"
        )
    return local


def clip_grad_norm_(
    params: Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    pp_group: dist.ProcessGroup | None,
    device: torch.device,
    foreach: bool | None = None,
    error_if_nonfinite: bool = False,
    counted: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Clip every local gradient by the global norm (:func:`total_grad_norm`); returns it.
    ``counted``: the parameters whose gradients make up the norm (default: ``params``; the
    other copies of a parameter held several times, e.g. a tied weight on two stages, are
    clipped but counted once)."""
    params = list(params)
    total = total_grad_norm(
        params if counted is None else list(counted),
        norm_type,
        pp_group=pp_group,
        device=device,
        foreach=foreach,
        error_if_nonfinite=error_if_nonfinite,
    )
    for group in _groups(params):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total.to(device), foreach=foreach)
    return total
