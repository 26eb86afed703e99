"""Measuring the peak memory of one training step on this rank.

:class:`StepMemory` wraps ``ParallelModel.train_step`` and yields ``peak_memory_bytes``:

* **CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the start
  of the step: everything the caching allocator handed out (parameters, gradients, optimizer
  state, activations, communication buffers, workspaces), as the cost model's memory
  constraint means it.
* **CPU** (no allocator statistics): a count of live tensor bytes, the sum of

  - ``parameters_bytes``: this rank's parameter storage (local shards of DTensors);
  - ``gradients_bytes``: this rank's ``.grad`` storage at the end of the step;
  - ``optimizer_state_bytes``: the state tensors of every optimizer that has stepped these
    parameters (seen by a global ``Optimizer`` step hook; zero before the first
    ``optimizer.step()``, i.e. on the first training step);
  - ``activations_peak_bytes``: the peak, over the step, of the bytes of the tensors autograd
    holds for backward (``saved_tensors_hooks``; each storage counted once, parameters
    excluded), from their saving in forward to their release in backward, over all
    micro-batches the schedule keeps alive. A layer with ``recompute`` contributes only its
    input, which the checkpoint saves. Not counted: the activations rebuilt during a
    recomputation (alive for one layer's backward), FSDP's transiently all-gathered
    parameters and unsharded gradients, and communication buffers.

  This is what the cost model's ``M[u, k, i]`` charges (parameters, gradients and optimizer
  state, plus the activations the schedule keeps alive), measured rather than predicted.

``memory_breakdown`` holds the four terms on CPU (and the first three on CUDA).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from uniap._torch_utils import storage_key

__all__ = ["StepMemory", "tensor_bytes"]

_OPTIMIZERS: weakref.WeakSet = weakref.WeakSet()
_HOOK_HANDLE: Any = None


def _remember_optimizer(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    _OPTIMIZERS.add(optimizer)


def _watch_optimizers() -> None:
    """Install (once per process) the global step hook that remembers optimizers."""
    global _HOOK_HANDLE
    if _HOOK_HANDLE is None:
        _HOOK_HANDLE = register_optimizer_step_post_hook(_remember_optimizer)


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the (local) storages of ``tensors``, each storage counted once."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        key, nbytes = storage_key(t)
        seen[key] = nbytes
    return sum(seen.values())


class _Packed:
    """What autograd keeps instead of a saved tensor; its release is the tensor's."""

    __slots__ = ("tensor", "key", "tracker", "generation")

    def __init__(
        self, tensor: torch.Tensor, key: int | None, tracker: StepMemory, generation: int
    ) -> None:
        self.tensor, self.key, self.tracker, self.generation = tensor, key, tracker, generation

    def __del__(self) -> None:
        if self.key is not None:
            self.tracker._release(self.key, self.generation)


class StepMemory:
    """Context manager around one training step; see the module docstring for what it counts."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device
        self.peak_memory_bytes: int = 0
        """Peak bytes of the last measured step."""
        self.breakdown: dict[str, int] = {}
        """The terms of ``peak_memory_bytes`` (see the module docstring)."""
        self._live: dict[int, list[int]] = {}  # storage key -> [references, bytes]
        self._live_bytes = 0
        self._peak_bytes = 0
        self._hooks: Any = None
        self._generation = 0  # a graph kept from an earlier step must not count in this one
        _watch_optimizers()

    # ------------------------------------------------------------------ saved tensors
    def _pack(self, t: torch.Tensor) -> Any:
        base = t._base if t._base is not None else t
        if isinstance(base, nn.Parameter) or isinstance(t, nn.Parameter):
            return _Packed(t, None, self, self._generation)
        key, nbytes = storage_key(t)
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [1, nbytes]
            self._live_bytes += nbytes
            if self._live_bytes > self._peak_bytes:
                self._peak_bytes = self._live_bytes
        else:
            entry[0] += 1
        return _Packed(t, key, self, self._generation)

    @staticmethod
    def _unpack(packed: _Packed) -> torch.Tensor:
        return packed.tensor

    def _release(self, key: int, generation: int) -> None:
        entry = self._live.get(key)
        if entry is None or generation != self._generation:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self._live_bytes -= entry[1]
            del self._live[key]

    # ------------------------------------------------------------------ the step
    def __enter__(self) -> StepMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._generation += 1
        self._live.clear()
        self._live_bytes = self._peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None
        if exc[0] is not None:
            return
        params = list(self.module.parameters())
        ids = {id(p) for p in params}
        opt_state: list[torch.Tensor] = []
        for opt in list(_OPTIMIZERS):
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in ids:
                        state = opt.state.get(p, {})
                        opt_state += [v for v in state.values() if isinstance(v, torch.Tensor)]
        self.breakdown = {
            "parameters_bytes": tensor_bytes(params),
            "gradients_bytes": tensor_bytes(p.grad for p in params),
            "optimizer_state_bytes": tensor_bytes(opt_state),
        }
        if self.device.type == "cuda":
            self.peak_memory_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.breakdown["activations_peak_bytes"] = self._peak_bytes
            self.peak_memory_bytes = sum(self.breakdown.values())
