"""Allocator-level peak memory (:class:`uniap.executor.memory.AllocatorPeak`) against the
tensor count of :class:`~uniap.executor.memory.StepMemory`, on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from uniap.executor.memory import AllocatorPeak, StepMemory

TEMP_BYTES = 8 * 2**20


class _Scratch(nn.Module):
    """Identity that allocates (and frees) an 8 MiB scratch buffer in forward: nothing autograd
    saves, so the tensor count cannot see it; the allocator does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scratch = torch.ones(TEMP_BYTES // 4)
            assert float(scratch[-1]) == 1.0
        return x


def _mlp(scratch: bool) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)]
    return nn.Sequential(*(layers[:2] + [_Scratch()] + layers[2:] if scratch else layers))


def _measure(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[StepMemory, AllocatorPeak]:
    x = torch.randn(32, 64)
    counted = StepMemory(model, torch.device("cpu"))
    with AllocatorPeak("cpu", [model], [opt]) as alloc:
        with counted:
            model(x).square().mean().backward()
    return counted, alloc


@pytest.mark.parametrize("set_to_none", [False, True])
def test_allocator_peak_is_at_least_the_tensor_count_and_sees_a_temporary(
    set_to_none: bool,
) -> None:
    """With gradients kept between steps (``zero_grad(set_to_none=False)``) every counted term
    is live at once at the end of forward, and the allocator peak is at least the tensor
    count. With ``set_to_none=True`` backward frees activations while it allocates gradients:
    the count (the sum of the two peaks) over-states, and the allocator peak is at least the
    state plus the larger of the two. An 8 MiB scratch buffer in forward leaves the count
    unchanged and lifts the allocator's increase over the step above its size."""
    peaks = {}
    for scratch in (False, True):
        model = _mlp(scratch)
        opt = torch.optim.AdamW(model.parameters(), foreach=True)
        _measure(model, opt)
        opt.step()  # the optimizer state exists from here on
        opt.zero_grad(set_to_none=set_to_none)
        counted, alloc = _measure(model, opt)
        terms = counted.breakdown
        assert terms["optimizer_state_bytes"] > 0 and terms["activations_peak_bytes"] > 0
        state = terms["parameters_bytes"] + terms["optimizer_state_bytes"]
        kept_grads = 0 if set_to_none else terms["gradients_bytes"]
        assert alloc.baseline_bytes == state + kept_grads
        if set_to_none:
            floor = state + max(terms["gradients_bytes"], terms["activations_peak_bytes"])
        else:
            floor = counted.peak_memory_bytes
        assert alloc.peak_bytes >= floor, (alloc.peak_bytes, terms)
        peaks[scratch] = (counted.peak_memory_bytes, alloc.increase_bytes)
    assert peaks[True][0] == peaks[False][0]  # the tensor count does not see the buffer
    assert peaks[False][1] < TEMP_BYTES // 8 and peaks[True][1] >= TEMP_BYTES, peaks


def test_allocator_peak_counts_a_freed_temporary_once_and_ignores_older_blocks() -> None:
    """Two 4 MiB temporaries freed one after the other peak at 4 MiB; a tensor allocated
    before the block and kept is not in the increase."""
    keep = torch.ones(2**20)
    with AllocatorPeak("cpu") as alloc:
        a = torch.ones(2**20)
        del a
        b = torch.ones(2**20)
        del b
        c = keep * 2
    assert alloc.baseline_bytes == 0
    assert 4 * 2**20 <= alloc.increase_bytes < 8 * 2**20 + 4096, alloc.increase_bytes
    assert alloc.peak_bytes == alloc.increase_bytes
    del c
