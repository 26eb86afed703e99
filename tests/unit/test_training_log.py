"""The training log: rank 0, every N steps, measured next to predicted, MFU from the plan."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
import torch

from uniap.contract import LayerStrategy, Plan, Stage, Strategy
from uniap.training_log import TrainingLog


def _plan() -> Plan:
    return Plan(
        "m",
        "sig",
        1,
        2,
        8,
        1,
        "1F1B",
        (Stage((0, 1), (LayerStrategy("a", Strategy(2, 1)),)),),
        predicted={
            "time_per_iteration_s": 0.1,
            "peak_memory_bytes": [3 * 2**20],
            "model_flops_per_sample": 1e9,
            "peak_flops_per_s": 1e11,
        },
    )


def _pm(step_s: float = 0.2) -> SimpleNamespace:
    return SimpleNamespace(last_step_time_s=step_s, peak_memory_bytes=2 * 2**20, stage_index=0)


def test_logs_every_n_steps_with_throughput_mfu_and_memory(caplog):
    """Steps 1, 3, 5 of every=2... are logged: samples/s, tokens/s, MFU = FLOPs/s over the world's
    peak."""
    log = TrainingLog(_plan(), every=2, rank=0)
    tokens = torch.zeros(8, 32, dtype=torch.long)
    with caplog.at_level(logging.INFO, logger="uniap.training"):
        for _ in range(4):
            log.record(_pm(), tokens, 2.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "uniap.training"]
    assert [int(re.match(r"step (\d+)", x).group(1)) for x in lines] == [1, 2, 4]
    first = log.records[0]
    assert first["iteration_s"] == 0.2 and first["samples_per_s"] == pytest.approx(40.0)
    assert first["tokens_per_s"] == pytest.approx(40.0 * 32)
    assert first["mfu"] == pytest.approx(1e9 * 40.0 / (1e11 * 2))
    assert "MFU 20.0% of 2 x 100 GFLOP/s" in lines[0]
    assert "peak memory 2.00 MiB (predicted 3.00 MiB)" in lines[0]
    assert "predicted 100 ms/iteration" in lines[0] and "1,280 tokens/s" in lines[0]


@pytest.mark.parametrize(
    "inputs,tokens",
    [
        ({"input_ids": torch.zeros(8, 32, dtype=torch.long), "mask": torch.ones(8, 32)}, 32),
        ((torch.zeros(8, 16, dtype=torch.long), torch.ones(8, 3)), 16),
        (torch.zeros(8, 3, 32, 32), None),  # images: no token count
    ],
)
def test_tokens_of_keyword_positional_and_image_batches(inputs, tokens, caplog):
    """Tokens per sample come from the batch's first tensor when it holds token ids, a keyword
    batch's ``input_ids`` included (a dict of inputs logged no tokens/s)."""
    log = TrainingLog(_plan(), every=1, rank=0)
    with caplog.at_level(logging.INFO, logger="uniap.training"):
        rec = log.record(_pm(), inputs, 2.5)
    assert rec["tokens_per_s"] == (None if tokens is None else pytest.approx(40.0 * tokens))


def test_silent_off_rank_0_and_when_the_logger_is_off(caplog):
    """Only rank 0 logs; nothing is computed or logged when INFO is off for uniap.training."""
    with caplog.at_level(logging.INFO, logger="uniap.training"):
        TrainingLog(_plan(), every=1, rank=1).record(_pm(), None, 1.0)
    assert not [r for r in caplog.records if r.name == "uniap.training"]
    logging.getLogger("uniap.training").setLevel(logging.WARNING)
    try:
        log = TrainingLog(_plan(), every=1, rank=0)
        assert log.record(_pm(), None, 1.0) is None and log.step == 1
    finally:
        logging.getLogger("uniap.training").setLevel(logging.NOTSET)
