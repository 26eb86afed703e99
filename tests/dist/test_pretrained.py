"""``uniap.checkpoint.load_pretrained`` (world size 4, CPU gloo, one spawn): a tiny Hugging
Face Llama written with ``save_pretrained`` (one file, tied; sharded with an index, untied)
loads straight into the shards of FSDP, mixed DDP / FSDP, FSDP-offload (host shards), TP and
meta-device-start parallel models, whose forward and loss then equal ``from_pretrained`` on one
process and whose full export is the checkpoint, bit for bit; a DCP checkpoint loads under
another plan; a missing tensor or a wrong shape is refused on every rank with one message,
before anything changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytestmark = pytest.mark.dist

D, F, OFF = "DDP", "FSDP", "FSDP-offload"
CASES = [
    {"name": "tied_one_file_pp1_fsdp_dp4", "kind": "load", "source": "tied",
     "strategies": [(4, 1, F), (4, 1, F)]},
    {"name": "untied_sharded_pp1_ddp_dp4_fsdp_dp4", "kind": "load", "source": "untied",
     "strategies": [(4, 1, D), (4, 1, F), (4, 1, F)]},
    {"name": "untied_sharded_pp1_fsdp_dp2tp2_ddp_dp4", "kind": "load", "source": "untied",
     "strategies": [(4, 1, D), (2, 2, F)]},
    {"name": "untied_meta_start_pp1_fsdp_dp4_ddp_head", "kind": "load", "source": "untied",
     "meta": True, "strategies": [(4, 1, F), (4, 1, F), (4, 1, D)]},
    {"name": "untied_sharded_pp1_offload_dp4_fsdp_blocks", "kind": "load", "source": "untied",
     "strategies": [(4, 1, OFF), (4, 1, F), (4, 1, OFF)]},
    {"name": "dcp_from_fsdp_into_ddp_dp2tp2", "kind": "dcp"},
    {"name": "error_missing_tensor", "kind": "error", "source": "missing"},
    {"name": "error_wrong_shape", "kind": "error", "source": "wrong_shape"},
    {"name": "error_no_weights", "kind": "error", "source": "no_weights"},
]  # fmt: skip
LOADS = [c["name"] for c in CASES if c["kind"] in ("load", "dcp")]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pretrained_cases import write_checkpoints

    path = tmp_path_factory.mktemp("pretrained")
    write_checkpoints(path)
    return path


@pytest.fixture(scope="module")
def results(root: Path) -> dict[str, Any]:
    from harness import run_cases

    return run_cases(
        4, "pretrained_cases:pretrained_case", [{**c, "root": str(root)} for c in CASES]
    )


@pytest.mark.parametrize("name", LOADS)
def test_world4_load_pretrained_matches_from_pretrained(results: dict[str, Any], name: str) -> None:
    """Forward logits and loss equal the checkpoint's model on one process; the full export
    loaded into a plain model equals the checkpoint exactly."""
    res = results[name]
    assert "error" not in res, res.get("error")
    assert res["forward_close"]
    assert res["loss_close"], (res["loss"], res["ref_loss"])
    assert res["num_tensors"] > 0 and res["differ"] == [], res["differ"]


def test_world4_load_pretrained_formats_and_ties(results: dict[str, Any]) -> None:
    """The format is detected from the files; the tied head is filled through the stored
    embedding (save_pretrained omits ``lm_head.weight``)."""
    assert results["tied_one_file_pp1_fsdp_dp4"]["format"] == "safetensors"
    assert results["tied_one_file_pp1_fsdp_dp4"]["tied"] == {
        "lm_head.weight": "model.embed_tokens.weight"
    }
    assert results["untied_sharded_pp1_ddp_dp4_fsdp_dp4"]["tied"] == {}
    assert results["dcp_from_fsdp_into_ddp_dp2tp2"]["format"] == "dcp"


def test_world4_load_pretrained_missing_tensor_is_refused(
    results: dict[str, Any], root: Path
) -> None:
    """A parameter the checkpoint lacks: the same message on every rank, naming the tensor,
    the file and the fix; no parameter changed."""
    res = results["error_missing_tensor"]
    assert "error" not in res, res.get("error")
    expected = (
        f"{root / 'missing'}: the model's parameter 'model.layers.1.mlp.up_proj.weight' is not "
        "in the checkpoint (model.safetensors, 19 tensors; nearest names: "
        "model.layers.0.mlp.up_proj.weight, model.layers.1.mlp.gate_proj.weight, "
        "model.layers.1.mlp.down_proj.weight); load a checkpoint of this model (same "
        "architecture and names, e.g. written by its save_pretrained), or rename the "
        "checkpoint's tensors to the model's names"
    )
    assert res["messages"] == [expected] * 4
    assert res["unchanged"]


def test_world4_load_pretrained_wrong_shape_is_refused(results: dict[str, Any], root: Path) -> None:
    """A tensor of another shape: the same message on every rank; no parameter changed."""
    res = results["error_wrong_shape"]
    assert "error" not in res, res.get("error")
    expected = (
        f"{root / 'wrong_shape'}: tensor 'model.layers.0.mlp.down_proj.weight' in "
        "model.safetensors has shape [32, 48], the model's has [32, 64]; the checkpoint is of "
        "another configuration: build the model from the checkpoint's config (e.g. "
        "AutoConfig.from_pretrained(path))"
    )
    assert res["messages"] == [expected] * 4
    assert res["unchanged"]


def test_world4_load_pretrained_directory_without_weights_is_refused(
    results: dict[str, Any], root: Path
) -> None:
    """A directory with neither safetensors nor DCP files: what was expected, what is there."""
    res = results["error_no_weights"]
    assert "error" not in res, res.get("error")
    expected = (
        f"{root / 'no_weights'} holds no loadable weights: expected model.safetensors or "
        "model.safetensors.index.json (Hugging Face save_pretrained) or .metadata "
        "(torch.distributed.checkpoint), found ['config.json']"
    )
    assert res["messages"] == [expected] * 4
    assert res["unchanged"]
