"""Vocabulary-parallel embedding and head with loss parallel (world 2, one spawn): the GPT-style
preset and an unmodified Hugging Face Llama train as on one process (losses and every
gradient) with their embedding and head at tp = 2 and the blocks at tp = 2 or tp = 1; each
rank holds V / tp of the logits; a loss that would gather them is refused."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.dist

CASES = [
    {"name": "gpt_vocab_tp2_blocks_tp2", "family": "gpt", "others": (1, 2, "DDP")},
    {"name": "gpt_vocab_tp2_blocks_dp2_fsdp", "family": "gpt", "others": (2, 1, "FSDP")},
    {"name": "llama_vocab_tp2_blocks_tp2", "family": "llama", "others": (1, 2, "DDP")},
    {"name": "llama_vocab_tp2_blocks_dp2_ddp", "family": "llama", "others": (2, 1, "DDP")},
    # the model's own forward returns in the embedding's layout (dp 2): the head's logits,
    # sharded over both ranks, cannot be split over them by batch: refused
    {"name": "llama_head_tp2_embedding_dp2_refused", "family": "llama",
     "others": (2, 1, "FSDP"), "vocab": {"embedding": (2, 1, "FSDP")}, "refused": True},
    {"name": "gpt_softmax_loss_refused", "family": "gpt", "others": (1, 2, "DDP"),
     "loss": "softmax", "c": 1},
    {"name": "gpt_gather_loss_refused", "family": "gpt", "others": (1, 2, "DDP"),
     "loss": "gather", "c": 1},
    {"name": "gpt_measured_profile", "profile": True},
]  # fmt: skip


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    from harness import run_cases

    return run_cases(2, "vocab_parallel:case", CASES)


@pytest.mark.parametrize(
    "name", [c["name"] for c in CASES if "family" in c and "loss" not in c and "refused" not in c]
)
def test_world2_vocab_parallel_matches_one_process(results: dict[str, Any], name: str) -> None:
    """Embedding and head at tp=2: losses and every gradient as on one process; each rank
    holds a V/2-wide DTensor shard of the logits; inference returns the whole logits."""
    res = results[name]
    assert "error" not in res, res.get("error")
    assert len(res["vocab_layers"]) == 2, res["vocab_layers"]
    assert "tp2" in res["plan"], res["plan"]
    assert res["num_grads"] > 0
    assert res["losses_close"], f"losses {res['losses']} vs reference {res['ref_losses']}"
    assert not res["bad_grads"], res["bad_grads"]
    assert res["held_logits"] == [["DTensor", res["vocab_size"] // 2]], res["held_logits"]
    assert res["inference_logits_shape"][-1] == res["vocab_size"]


@pytest.mark.parametrize(
    ("name", "what"),
    [
        (
            "gpt_softmax_loss_refused",
            "applies AmaxBackward0, LogBackward0, SoftmaxBackward0 to the logits",
        ),
        ("gpt_gather_loss_refused", "fails on (aten.gather.default got mixed torch.Tensor"),
    ],
)
def test_world2_loss_that_gathers_logits_is_refused(
    results: dict[str, Any], name: str, what: str
) -> None:
    """A loss that needs whole vocabulary rows (softmax, or gather by target) on the sharded
    logits is refused before any backward, naming what it does and the fix."""
    res = results[name]
    assert "error" not in res, res.get("error")
    assert res["refused"] is not None
    assert res["refused"].startswith(f"UniapError: the loss {what}"), res["refused"]
    from vocab_parallel import FIX

    assert res["refused"].endswith(FIX), res["refused"]


def test_world2_measured_profile_times_vocabulary_layers_and_loss_parallel(
    results: dict[str, Any],
) -> None:
    """The profiler measures the embedding and head at tp=2 (the executor's vocabulary TP)
    and the loss at tp=2 under loss_parallel(): its working memory shrinks with tp, as each
    rank holds V / 2 of the logits."""
    res = results["gpt_measured_profile"]
    assert "error" not in res, res.get("error")
    assert res["tp_measured"] == {"embed": [1, 2], "head": [1, 2]}
    assert res["loss_tp"] == [2]
    w1, w2 = res["working_bytes"]["1"], res["working_bytes"]["2"]
    assert w1 >= res["logits_bytes"]  # at least the logits' gradient, whole
    # the logits' gradient and log-softmax are V / 2 wide; loss parallel holds one more
    # logits-shaped temporary (its shifted logits), what the profiles charge at a tp they did
    # not measure (uniap.profiles.analytic.loss_parallel_bytes): (w1 + logits) / 2
    assert w1 / 2 < w2 < 0.75 * w1, (w1, w2)
    assert w2 == pytest.approx((w1 + res["logits_bytes"]) / 2, rel=0.05), (w1, w2)
    assert res["loss_s"]["2"] > 0


def test_world2_head_sharded_against_the_own_forward_layout_is_refused(
    results: dict[str, Any],
) -> None:
    """A head at tp=2 (dp=1) in a model whose own forward returns in dp=2 (its embedding's
    layout) is refused before training, naming the layer and the fix."""
    res = results["llama_head_tp2_embedding_dp2_refused"]
    assert "error" not in res, res.get("error")
    assert res["refused"] == (
        "PlanMismatchError: layer 'lm_head' keeps its logits sharded on the vocabulary over tp=2 "
        "ranks at dp=1, but the model's own forward computes the loss in the first layer's "
        "layout (dp=2, tp=1): splitting the logits' batch over ranks holding different "
        "vocabulary shards is not possible; give 'lm_head' a dp that 2 divides, or tp=1"
    )
