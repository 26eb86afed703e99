"""Measured memory: what a layer keeps for backward, its state bytes, and a run's peak.

- Activations: ``saved_tensors_hooks`` count the distinct storages autograd saves during one
  forward of the layer (parameters and buffers excluded; the local shard of a DTensor), so
  ``activation_bytes(b, tp)`` is measured, not traced on the meta device.
- State: parameter, gradient and AdamW state bytes of the layer's local shards (one real
  optimizer step on zero gradients creates the state).
- A run's peak (:class:`PeakMemory`): on CUDA ``torch.cuda.max_memory_allocated``; on CPU the
  peak of live tensor bytes, counted by torch's ``MemTracker`` (a dispatch mode that follows
  every storage created, resized and freed, plus the module's parameters, gradients and
  optimizer states registered up front).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from uniap._torch_utils import local_tensor, storage_key
from uniap.profiler.compute import LayerCall

__all__ = ["PeakMemory", "saved_activation_bytes", "state_bytes"]

logger = logging.getLogger(__name__)


def saved_activation_bytes(module: nn.Module, inputs: LayerCall | tuple) -> int:
    """Bytes of the distinct storages autograd saves for backward in one call of ``module`` on
    ``inputs`` (a :class:`~uniap.profiler.compute.LayerCall` or a tuple of positional inputs;
    parameters and buffers excluded)."""
    excluded = {storage_key(t)[0] for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = storage_key(t)
        if key not in excluded:
            saved[key] = nbytes
        return t

    call = LayerCall.of(inputs).prepared()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call(module)
    del out
    return sum(saved.values())


def state_bytes(module: nn.Module) -> dict[str, int]:
    """``{"param_bytes", "grad_bytes", "optimizer_bytes"}`` of the module's local shards; the
    AdamW state is measured after one step with zero gradients and ``lr = 0`` (parameters
    unchanged), then dropped, and the gradients are restored."""
    params = [p for p in module.parameters() if p.requires_grad]
    param_bytes = sum(local_tensor(p).nbytes for p in params)
    saved_grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    opt.step()
    grad_bytes = sum(local_tensor(p.grad).nbytes for p in params)
    opt_bytes = 0
    for state in opt.state.values():
        for v in state.values():
            # the step counter is a 0-d tensor: not a per-parameter cost
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                opt_bytes += local_tensor(v).nbytes
    for p, g in zip(params, saved_grads):
        p.grad = g
    return {"param_bytes": param_bytes, "grad_bytes": grad_bytes, "optimizer_bytes": opt_bytes}


def _live_bytes_tracker() -> Any:
    """torch's ``MemTracker`` without its per-module statistics (which refuse a module called
    more than once per step, as every layer is with several micro-batches): only the live
    bytes of every storage, and their peak."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class _LiveBytes(MemTracker):
        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            pass

        def _post_fw_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
            pass

        def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
            pass

        def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
            pass

    return _LiveBytes()


class PeakMemory:
    """Peak bytes of live tensors on this rank inside a ``with`` block.

    ``modules`` and ``optimizer`` are registered up front so tensors that already exist
    (parameters, gradients, optimizer state) count. On CUDA the allocator's peak is used.
    ``with PeakMemory(device, modules, optimizer) as pm: step(); pm.peak_bytes``."""

    def __init__(
        self,
        device: torch.device,
        modules: Iterable[nn.Module] = (),
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.peak_bytes = float("nan")
        self._modules = list(modules)
        self._optimizer = optimizer
        self._tracker: Any = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._tracker = _live_bytes_tracker()
        externals: list[Any] = list(self._modules)
        if self._optimizer is not None:
            externals.append(self._optimizer)
        if externals:
            self._tracker.track_external(*externals)
        self._tracker.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = float(torch.cuda.max_memory_allocated(self.device))
            return
        self._tracker.__exit__(*exc)
        snap = self._tracker.get_tracker_snapshot("peak")
        self.peak_bytes = float(sum(dev.get("Total", 0) for dev in snap.values()))
