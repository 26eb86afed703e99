"""Pipeline schedule specs: in-flight micro-batches per stage, names, torch classes."""

from __future__ import annotations

import pytest
import torch.distributed.pipelining as pipelining
from torch.distributed.pipelining import schedules as torch_schedules

from uniap.contract import SCHEDULES as PLAN_SCHEDULES
from uniap.errors import ConfigError
from uniap.schedules import SCHEDULES, get_schedule, inflight_microbatches, interleaved_order


@pytest.mark.parametrize("pp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("c", [1, 2, 3, 4, 16])
def test_inflight_gpipe_all_microbatches_1f1b_until_first_backward(pp: int, c: int) -> None:
    """GPipe holds c micro-batches on every stage, 1F1B min(c, pp - i), both 1 without
    pipelining."""
    for i in range(pp):
        assert inflight_microbatches("GPipe", i, pp, c) == (1 if pp == 1 else c)
        assert inflight_microbatches("1F1B", i, pp, c) == (1 if pp == 1 else min(c, pp - i))


def test_bubble_fraction() -> None:
    """(pp - 1) / (c + pp - 1): none without pipelining, 3/7 for pp 4 and c 4."""
    spec = get_schedule("1F1B")
    assert spec.bubble_fraction(1, 8) == 0.0
    assert spec.bubble_fraction(4, 4) == pytest.approx(3 / 7)


def test_every_schedule_names_a_torch_class_and_the_plan_accepts_it() -> None:
    """Each spec's torch class exists in torch.distributed.pipelining; plans accept exactly these
    names."""
    for spec in SCHEDULES.values():
        assert hasattr(pipelining, spec.torch_class), spec
        assert spec.stages_per_rank == ((2,) if spec.interleaved else (1,))
    assert PLAN_SCHEDULES == tuple(SCHEDULES)
    assert tuple(SCHEDULES) == ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble")


def test_unknown_schedule_is_one_clear_error() -> None:
    """An unknown name lists the known ones."""
    with pytest.raises(
        ConfigError,
        match=r"schedule 'ZeroBubble' is not one of \['GPipe', '1F1B', 'Interleaved1F1B', "
        r"'InterleavedZeroBubble'\]",
    ):
        get_schedule("ZeroBubble")


def _torch_interleaved_orders(pp: int, v: int, c: int) -> list[list[tuple[str, int, int]]]:
    """Each rank's operations ``(F or B, micro-batch, stage)`` in torch's own interleaved 1F1B
    order (``ScheduleInterleaved1F1B._calculate_single_rank_operations``, idle slots left
    out)."""
    rounds = max(1, c // pp)
    per_round = c // rounds
    orders = []
    for r in range(pp):
        warmup = torch_schedules._get_warmup_ops(r, v, per_round, pp, c, multiply_factor=2)

        def fwd(step: int, r: int = r) -> int:
            return ((step // per_round) % v) * pp + r

        def bwd(step: int, r: int = r, w: int = warmup) -> int:
            return (v - 1 - ((step - w) // per_round) % v) * pp + r

        ops = torch_schedules._get_1f1b_rank_ops(v, pp, warmup, v * c - warmup, warmup, r, fwd, bwd)
        forward = torch_schedules._ComputationType.FORWARD
        orders.append(
            [
                ("F" if a.computation_type == forward else "B", a.microbatch_index, a.stage_index)
                for a in ops
                if a is not None
            ]
        )
    return orders


def _torch_interleaved_peaks(pp: int, v: int, c: int) -> list[int]:
    """The most micro-batches each virtual stage holds at once in torch's order."""
    peaks = [0] * (pp * v)
    for order in _torch_interleaved_orders(pp, v, c):
        alive: dict[int, int] = {}
        for kind, _, j in order:
            alive[j] = alive.get(j, 0) + (1 if kind == "F" else -1)
            peaks[j] = max(peaks[j], alive[j])
    return peaks


@pytest.mark.parametrize(
    "pp,v,c",
    [(2, 2, 2), (2, 2, 4), (2, 2, 8), (4, 2, 4), (4, 2, 8), (2, 3, 4), (2, 4, 4), (4, 4, 8)],
)
def test_interleaved_inflight_follows_torchs_order(pp: int, v: int, c: int) -> None:
    """Interleaved 1F1B: each rank's order of operations is torch's ScheduleInterleaved1F1B
    order, and each virtual stage is charged the most micro-batches it holds at once in it
    (rank 0's first chunk holds the most)."""
    got = [inflight_microbatches("Interleaved1F1B", j, pp, c, v) for j in range(pp * v)]
    assert got == _torch_interleaved_peaks(pp, v, c)
    assert got[0] == max(got) and got[-1] == 1
    torch_orders = _torch_interleaved_orders(pp, v, c)
    assert [interleaved_order(pp, v, c, r) for r in range(pp)] == torch_orders


def test_interleaved_bubble_and_microbatch_rule() -> None:
    """The bubble is v times smaller (Megatron-LM: (pp - 1) / (v c) of the ideal time); the
    paper's schedule needs c to be a multiple of pp."""
    spec = get_schedule("Interleaved1F1B")
    assert spec.bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)  # (3 / 16) / (1 + 3 / 16)
    assert spec.why_not(4, 2, 8) is None
    assert spec.why_not(4, 2, 6) == (
        "Interleaved1F1B needs the number of micro-batches (6) to be a multiple of the pipeline "
        "degree (4)"
    )
    assert get_schedule("1F1B").why_not(2, 2, 4) == "1F1B runs (1,) stage(s) per rank, not 2"
