"""Streaming a full (unsharded) state to rank 0, one tensor at a time.

Stage by stage: the ranks of stage ``s`` make each entry whole in turn (``full_tensor()`` of
a DTensor: a collective over that stage's meshes only); stage 0's first rank (rank 0) keeps
it on CPU; any other stage's first rank sends it to rank 0 point to point (on the ranks'
device, so NCCL works) and drops it before the next one. Only the list of keys, shapes and
dtypes (and non-tensor values such as learning rates) travels as a pickled object. Peak
memory: rank 0 holds the result on CPU plus one tensor on its device; a sending rank one
full tensor at a time. Nothing goes through ``gather_object``, which would put every rank's
whole payload on rank 0's device at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

__all__ = ["stream_full_state"]


def _full(value: Any) -> Any:
    if isinstance(value, DTensor):
        return value.full_tensor()
    return value


def stream_full_state(
    groups: Any, entries: Callable[[], dict[str, Any]], device: torch.device
) -> dict[str, Any]:
    """The full state on rank 0 (CPU tensors), ``{}`` elsewhere. ``entries()`` returns this
    rank's stage's entries (DTensors, tensors or plain values), in the same key order on every
    rank of the stage. Collective over the world."""
    layout = groups.layout
    rank = dist.get_rank()
    my_stage = layout.stage_of(rank)
    leader = layout.local(rank) == 0
    out: dict[str, Any] = {}
    for stage in range(layout.pp_degree):
        src = layout.stage_start(stage)
        if my_stage == stage:
            items = entries()
            keys = sorted(items)  # the same order on every rank of the stage
            if stage == 0:
                for key in keys:
                    value = _full(items[key])
                    if rank == 0:
                        out[key] = _to_cpu(value)
                continue
            header = []
            for key in keys:
                v = items[key]
                if isinstance(v, torch.Tensor):
                    header.append((key, tuple(v.shape), v.dtype))
                else:
                    header.append((key, None, v))
            if leader:
                dist.send_object_list([header], dst=0, device=_obj_device(device))
            for key in keys:
                value = _full(items[key])
                if leader and isinstance(value, torch.Tensor):
                    dist.send(value.detach().to(device).contiguous(), dst=0)
                del value
        elif rank == 0:
            received: list[Any] = [None]
            dist.recv_object_list(received, src=src, device=_obj_device(device))
            for key, shape, meta in received[0]:
                if shape is None:
                    out[key] = meta
                    continue
                buf = torch.empty(shape, dtype=meta, device=device)
                dist.recv(buf, src=src)
                out[key] = buf.to("cpu")
    return out if rank == 0 else {}


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return value


def _obj_device(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None
