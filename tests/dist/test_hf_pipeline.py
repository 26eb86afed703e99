"""Models that are not declared chains at pp = 2 and 4 (world size 4, one spawn): the model's own
forward, traced and split at the plan's stage boundaries, trains exactly as on one process
(per-step losses, every gradient after the first backward, the global gradient norm; SGD, rtol
1e-4), and ``pm.eval(); pm(batch)`` returns the trained model's output on every rank.

Eleven Hugging Face families at pp = 2 (BART's layers ordered as its forward runs them) (DDP on
one stage, FSDP on the other, recompute on some; Llama, tied and untied, at pp = 2 from the meta
device below), tied input/output embeddings across pp = 2 and 4, and hand-written non-chain
models (a skip connection across a stage boundary, a scaled embedding, a model-level parameter,
keyword-only inputs with the model's own loss); gradient accumulation over two ``train_step``
calls; a Hugging Face Llama started on the meta device (pp = 1 FSDP and pp = 2, tied and untied)
against a single-process model initialised with the same seed; and the plans the executor must
refuse before training."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.dist

D, F = "DDP", "FSDP"


def _hf_cases() -> list[dict]:
    from hf_own_forward import FAMILIES

    out = []
    for i, family in enumerate(FAMILIES):
        if family.startswith("llama"):  # at pp = 2 below, built on the meta device
            continue
        kinds = [F, D] if i % 2 == 0 else [D, F]
        recompute = i % 3 == 0
        name = f"{family}_pp2_{kinds[0].lower()}_{kinds[1].lower()}" + (
            "_ckpt" if recompute else ""
        )
        out.append({"name": name, "model": family, "pp": 2, "kinds": kinds, "recompute": recompute})
    return out


CASES = [
    *_hf_cases(),
    # the tied embedding / LM head on stages 0 and 3
    {"name": "llama_tied_pp4_c4", "model": "llama_tied", "pp": 4, "kinds": [F, D, F, D], "c": 4},
    {"name": "gpt2_pp4_gpipe", "model": "gpt2", "pp": 4, "kinds": [D, D, D, D], "c": 4,
     "schedule": "GPipe"},
    # hand-written: the embedding's output skips both blocks, across the stage boundary
    {"name": "skip_pp2", "model": "skip", "pp": 2, "kinds": [F, D]},
    {"name": "skip_pp2_compiled", "model": "skip", "pp": 2, "kinds": [D, F],
     "compile": "aot_eager"},
    {"name": "scaled_embedding_pp2_ckpt", "model": "scaled", "pp": 2, "kinds": [D, F],
     "recompute": True},
    {"name": "keyword_inputs_own_loss_pp2", "model": "kwargs", "pp": 2, "kinds": [D, F]},
    {"name": "tied_pp4_c4", "model": "tied", "pp": 4, "kinds": [F, D, F, D], "c": 4},
    # a Hugging Face Llama built on the meta device (its rotary table outside every layer, its
    # tied embedding / head): each rank initialises its shards as init_model does on one process
    {"name": "meta_llama_pp1_fsdp", "model": "llama_untied", "pp": 1, "kinds": [F], "meta": True},
    {"name": "meta_llama_pp2", "model": "llama_untied", "pp": 2, "kinds": [F, D], "meta": True},
    {"name": "meta_llama_tied_pp2", "model": "llama_tied", "pp": 2, "kinds": [D, F],
     "meta": True},
    # gradient accumulation: two train_step calls without zero_grad
    {"name": "accumulate_model_parameter_pp2_ddp", "model": "model_param", "pp": 2,
     "kinds": [D, D], "accumulate": True},
    {"name": "accumulate_tied_pp2_fsdp", "model": "tied", "pp": 2, "kinds": [F, F],
     "accumulate": True},
]  # fmt: skip

REFUSALS = [
    {"name": "refuse_tp2_at_pp2", "model": "skip", "pp": 2, "tp": 2},
    {"name": "refuse_layer_run_on_two_stages", "model": "revisits", "pp": 2},
    {"name": "uneven_mask"},
]


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    from harness import run_cases

    return run_cases(4, "hf_pipeline:dispatch", CASES + REFUSALS)


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_world4_traced_pipeline_matches_one_process(results: dict[str, Any], name: str) -> None:
    """Losses, gradients (every stage, tied copies each), the clip norm and the eval output
    under the pp > 1 plan equal the unmodified model's on one process."""
    res = results[name]
    assert "error" not in res, res.get("error")
    assert res["num_grads"] > 0
    assert res["losses_close"], f"losses {res['losses']} vs reference {res['ref_losses']}"
    assert not res["bad_grads"], res["bad_grads"]
    assert res["norm"] == pytest.approx(res["ref_norm"], rel=1e-4)
    assert res["forward_close"], "pm.eval(); pm(batch) differs from the trained reference"


def test_world4_tp_at_pp2_of_a_traced_model_refused(results: dict[str, Any]) -> None:
    res = results["refuse_tp2_at_pp2"]
    assert "error" not in res, res.get("error")
    assert (
        res["errors"]
        == [
            "SkipNet is split into pipeline stages by tracing its forward, which runs layers at "
            "tp=1 only, but layer(s) ['blocks.0', 'blocks.1'] have tp>1; re-plan (the planner does "
            "not offer tp>1 at pp>1 for such a model), or declare the model a chain (nn.Sequential "
            "or uniap_layer_fqns())"
        ]
        * 4
    )


def test_world4_layer_run_on_two_stages_refused(results: dict[str, Any]) -> None:
    res = results["refuse_layer_run_on_two_stages"]
    assert "error" not in res, res.get("error")
    assert (
        res["errors"]
        == [
            "Revisits: the traced stage 1 holds blocks.0@1.weight, which is no parameter or "
            "buffer of the model (blocks.0 is called more than once, its calls on different "
            "stages); plan with pp=1, or declare the model a chain (nn.Sequential or "
            "uniap_layer_fqns())"
        ]
        * 4
    )


def test_world4_uneven_inputs_to_a_resharded_layer_raise_a_clear_error(
    results: dict[str, Any],
) -> None:
    """A layer in another layout than the first gets its batch inputs resharded; when the
    ranks pass it different inputs (an attention mask the model leaves out on a shard without
    padding) every rank raises, naming the layer and the fixes, instead of hanging."""
    res = results["uneven_mask"]
    assert "error" not in res, res.get("error")
    assert (
        res["errors"]
        == [
            "layer model.layers.0 runs in another data-parallel layout than the model's first "
            "layer, so its batch inputs are resharded between ranks, but the ranks pass it "
            "different inputs"
        ]
        * 4
    )
