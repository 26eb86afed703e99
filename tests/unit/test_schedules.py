"""Pipeline schedule specs: in-flight micro-batches per stage, names, torch classes."""

from __future__ import annotations

import pytest
import torch.distributed.pipelining as pipelining

from uniap.contract import SCHEDULES as PLAN_SCHEDULES
from uniap.errors import ConfigError
from uniap.schedules import SCHEDULES, get_schedule, inflight_microbatches


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
        assert spec.stages_per_rank == 1
    assert PLAN_SCHEDULES == tuple(SCHEDULES) == ("GPipe", "1F1B")


def test_unknown_schedule_is_one_clear_error() -> None:
    """An unknown name lists the known ones."""
    with pytest.raises(
        ConfigError, match=r"schedule 'ZeroBubble' is not one of \['GPipe', '1F1B'\]"
    ):
        get_schedule("ZeroBubble")
