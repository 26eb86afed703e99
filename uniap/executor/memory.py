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

:class:`AllocatorPeak` measures what the allocator handed out instead, whatever holds it:
FSDP's all-gathered parameters and unsharded gradients, communication and reshard buffers,
recomputed activations, the optimizer's temporaries and every other transient (the gap
between the two is what the cost model does not charge):

* **CUDA**: ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats`` at entry).
* **CPU**: torch 2.13 keeps no statistics for the CPU allocator (``torch.accelerator``'s
  memory functions refuse the CPU, and there is no ``torch.cpu.memory_allocated``), but c10's
  CPU allocator reports every allocation and free to the profiler when memory profiling is on.
  The block runs under ``torch.profiler.profile(activities=[CPU], profile_memory=True)``; the
  signed sizes of its allocation records, summed in time order, are the bytes allocated since
  entry, and their maximum is the block's peak increase. The absolute peak adds the bytes live
  at entry that the caller names (parameters, gradients, optimizer state of ``modules`` and
  ``optimizers``): the allocator only knows the sizes of blocks allocated while profiling.
  Limits: a block allocated before entry and freed inside it is not reported (the allocator
  never recorded its size), so its bytes stay counted (an over-estimate); allocations on
  threads the profiler does not follow (gloo's worker threads) are not seen. CPU autograd
  runs backward on the calling thread, so every training tensor is seen.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from uniap._torch_utils import storage_key

__all__ = ["AllocatorPeak", "StepMemory", "tensor_bytes"]

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


def _allocation_sizes(prof: Any) -> list[int]:
    """Signed sizes of the CPU allocation records of a finished profile, in time order."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            if fields.device.type == "cpu":
                events.append((node.start_time_ns, fields.alloc_size))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    return [size for _, size in events]


def _state_bytes(
    modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer]
) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes of ``modules`` (local shards)."""
    params = [p for m in modules for p in m.parameters()]
    ids = {id(p) for p in params}
    state: list[torch.Tensor] = []
    for opt in optimizers:
        for p, st in opt.state.items():
            if id(p) in ids:
                state += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return {
        "parameters_bytes": tensor_bytes(params),
        "gradients_bytes": tensor_bytes(p.grad for p in params),
        "optimizer_state_bytes": tensor_bytes(state),
    }


class AllocatorPeak:
    """Allocator-level peak bytes on this rank inside a ``with`` block (see the module
    docstring)::

        with AllocatorPeak(device, [pm.module], [opt]) as mem:
            pm.train_step(x, y)
            opt.step()
        mem.peak_bytes, mem.increase_bytes

    ``modules`` / ``optimizers``: what is live at entry (their parameters, gradients and
    optimizer state), the CPU baseline; ignored on CUDA, where the allocator knows it."""

    def __init__(
        self,
        device: torch.device | str,
        modules: Iterable[nn.Module] = (),
        optimizers: Iterable[torch.optim.Optimizer] = (),
    ) -> None:
        self.device = torch.device(device)
        self._modules = list(modules)
        self._optimizers = list(optimizers)
        self.baseline_bytes: int = 0
        """Bytes live at entry: on CUDA the allocator's; on CPU the state of ``modules``."""
        self.increase_bytes: int = 0
        """Peak of the bytes allocated (net of frees) since entry."""
        self.peak_bytes: int = 0
        """``baseline_bytes + increase_bytes``: the block's peak."""
        self._profiler: Any = None

    def __enter__(self) -> AllocatorPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = int(torch.cuda.memory_allocated(self.device))
            return self
        self.baseline_bytes = sum(_state_bytes(self._modules, self._optimizers).values())
        from torch.profiler import ProfilerActivity, profile

        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = int(torch.cuda.max_memory_allocated(self.device))
            self.increase_bytes = peak - self.baseline_bytes
            self.peak_bytes = peak
            return
        self._profiler.__exit__(*exc)
        running = peak = 0
        for size in _allocation_sizes(self._profiler):
            running += size
            peak = max(peak, running)
        self._profiler = None
        self.increase_bytes = peak
        self.peak_bytes = self.baseline_bytes + peak
