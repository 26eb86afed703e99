"""The measuring code's pure parts, without a process group: the group shapes it measures,
robust collective points, bytes saved for backward, state bytes and peak memory."""

from __future__ import annotations

import torch
from torch import nn

from uniap.profiler.comm import planner_group_shapes
from uniap.profiler.memory import PeakMemory, saved_activation_bytes, state_bytes
from uniap.profiles.fits import group_shape_key


def test_planner_group_shapes_cover_consecutive_strided_and_p2p() -> None:
    """World 4: consecutive pairs, strided pairs, the whole world; p2p at distances 1 and 2."""
    shapes = planner_group_shapes(4)
    keys = {group_shape_key(p[0], 4) for p in shapes["collective"]}
    assert keys == {"n2-intra-consecutive", "n2-intra-strided", "n4-intra-consecutive"}
    assert [p for p in shapes["p2p"]] == [[[0, 1], [2, 3]], [[0, 2], [1, 3]]]
    assert group_shape_key([0, 2], 2) == "n2-inter-strided"


def test_saved_activation_and_state_bytes_are_measured() -> None:
    """A Linear saves its input; AdamW keeps two moments per parameter."""
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    assert saved_activation_bytes(lin, (x,)) == x.nbytes
    s = state_bytes(lin)
    assert s["param_bytes"] == (16 * 8 + 8) * 4 == s["grad_bytes"]
    assert s["optimizer_bytes"] == 2 * s["param_bytes"]
    assert lin.weight.grad is None


def test_peak_memory_counts_registered_and_new_tensors() -> None:
    """The CPU peak includes the module's parameters and a tensor created inside."""
    lin = nn.Linear(256, 256)
    with PeakMemory(torch.device("cpu"), [lin]) as pm:
        y = torch.ones(1024, 1024)
        del y
    assert pm.peak_bytes >= 4 * 1024 * 1024 + 256 * 256 * 4


def test_collective_points_are_robust_and_monotone_in_size() -> None:
    """A rare stall does not move a collective's estimate; a larger message never gets a
    smaller time than a smaller one."""
    from uniap.profiler.comm import _monotone, interquartile_mean

    assert interquartile_mean([1.0] * 7 + [100.0]) == 1.0
    assert interquartile_mean([1.0, 2.0, 3.0, 4.0]) == 2.5
    assert _monotone([3.0, 1.0, 2.0, 5.0, 4.0]) == [1.0, 1.0, 2.0, 4.0, 4.0]


def test_collective_sizes_reach_the_largest_planned_message_within_free_memory() -> None:
    from uniap.profiler.comm import DEFAULT_SIZES_BYTES, collective_sizes

    # a small model: the default sizes only
    assert collective_sizes(1e5, 2**34) == DEFAULT_SIZES_BYTES
    # a 300 MB layer with plenty of memory: x8 steps, then the message itself
    sizes = collective_sizes(300e6, 2**36)
    assert sizes[: len(DEFAULT_SIZES_BYTES)] == DEFAULT_SIZES_BYTES
    assert sizes[-2:] == (2**22 * 64, 300_000_000)
    # capped at an eighth of the free memory
    assert collective_sizes(300e6, 2**30)[-1] == 2**27


def test_batch_walkers_take_any_mapping_and_named_tuples() -> None:
    """The profiler resizes, detaches and moves batches of any nesting: a mapping that is not a
    dict (a tokenizer's ``BatchEncoding`` is a ``UserDict``) and a named tuple too (the mapping
    came back unresized, so a profile measured one batch size under several names; the named
    tuple raised)."""
    from collections import UserDict, namedtuple

    from uniap.profiler.compute import LayerCall, resize_batch
    from uniap.profiler.layers import to_device

    Pair = namedtuple("Pair", "ids mask")
    x = torch.arange(6).reshape(2, 3)
    batch = UserDict(pair=Pair(x, x.float()), scale=torch.tensor(2.0), n=3)
    out = resize_batch(batch, 5)
    assert isinstance(out, UserDict) and out["n"] == 3 and out["scale"].shape == ()
    assert isinstance(out["pair"], Pair)
    assert torch.equal(out["pair"].ids, x[[0, 1, 0, 1, 0]])
    assert out["pair"].mask.shape == (5, 3)
    assert torch.equal(resize_batch(Pair(x, x), 1).ids, x[:1])
    moved = to_device(batch, torch.device("cpu"))
    assert torch.equal(moved["pair"].mask, x.float())
    call = LayerCall.detached((Pair(x.float().requires_grad_(), x),), {"b": batch})
    assert not call.args[0].ids.requires_grad and isinstance(call.kwargs["b"]["pair"], Pair)
