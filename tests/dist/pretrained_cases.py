"""Loading Hugging Face checkpoints into parallel models (``uniap.checkpoint.load_pretrained``):
tiny Llama configs (random weights, written with ``save_pretrained`` to a temporary directory
by the test before the spawn; never downloaded) and the per-rank case function.

Each loading case builds the model from its config with *other* random weights (or on the meta
device), parallelises it under a pp = 1 plan, loads the checkpoint, and compares on rank 0
with ``LlamaForCausalLM.from_pretrained`` on one process: the logits of ``pm(batch)``, the
loss of one ``train_step``, and the exported full state dict loaded into a plain model
(tensors bit-identical).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from own_forward import ATOL, RTOL
from toy import make_plan

from uniap import checkpoint
from uniap.api import parallelize
from uniap.checkpoint import CheckpointError
from uniap.graph import build_graph

VOCAB, SEQ, B, C = 128, 8, 16, 2
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)


def config(tied: bool, **overrides: Any) -> Any:
    import transformers

    return transformers.LlamaConfig(**{**CONFIG, "tie_word_embeddings": tied, **overrides})


def build(tied: bool, seed: int, *, meta: bool = False) -> torch.nn.Module:
    """A Llama from the tiny config; on the meta device, the rotary frequencies (computed in
    ``__init__``, stored in no checkpoint) are built for real."""
    import transformers

    torch.manual_seed(seed)
    cfg = config(tied)
    if not meta:
        return transformers.LlamaForCausalLM(cfg).eval()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    return model.eval()


def write_checkpoints(root: Path) -> None:
    """The directories the cases load (run once, before the spawn)."""
    from safetensors.torch import save_file

    build(tied=True, seed=0).save_pretrained(root / "tied")
    # untied, in shards listed by model.safetensors.index.json
    build(tied=False, seed=1).save_pretrained(root / "untied", max_shard_size="20KB")
    sd = {k: v.contiguous() for k, v in build(tied=True, seed=0).state_dict().items()}
    del sd["lm_head.weight"]  # what save_pretrained does for a tied model
    missing = root / "missing"
    missing.mkdir()
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(missing / "model.safetensors"))  # fmt: skip
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config(True, intermediate_size=48)).save_pretrained(
        root / "wrong_shape"
    )
    (root / "no_weights").mkdir()
    config(True).save_pretrained(root / "no_weights")  # config.json only


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, SEQ), generator=g)
    mask = torch.ones(B, SEQ, dtype=torch.long)
    mask[::2, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def _parallelize(model: torch.nn.Module, strategies: list[tuple]) -> Any:
    # pp = 1: no pipeline-split check (parallelize traces the model itself)
    graph = build_graph(model, batch(0), pipeline_check=False)
    per_layer = [
        tuple(strategies[1] if fqn.startswith("model.layers.") else strategies[0])
        for fqn in graph.fqns
    ]
    if len(strategies) > 2:  # the head's own strategy
        per_layer[-1] = tuple(strategies[2])
    plan = make_plan(
        list(graph.fqns),
        dist.get_world_size(),
        [per_layer],
        global_batch_size=B,
        num_microbatches=C,
        model_name=graph.name,
        signature=graph.signature,
    )
    return parallelize(model, None, plan=plan, global_batch_size=B, example_inputs=batch(0))


def _local_params(pm: Any) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in pm.named_parameters()
    }


def _compare_with_reference(pm: Any, directory: Path) -> dict[str, Any] | None:
    import transformers

    loss = pm.train_step(batch(2))
    pm.eval()
    with torch.no_grad():
        logits = pm(batch(1)).logits
    full = checkpoint.export_full_state_dict(pm)
    if dist.get_rank() != 0:
        return None
    ref = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        want = ref(**batch(1)).logits
        ref_loss = float(ref(**batch(2)).loss)
    plain = transformers.LlamaForCausalLM(ref.config)
    plain.load_state_dict(full)  # strict: the export fits the original model
    expect = ref.state_dict()
    got = plain.state_dict()
    return {
        "forward_close": logits.shape == want.shape
        and float((logits - want).abs().max()) <= ATOL + RTOL * float(want.abs().max()),
        "loss": loss,
        "ref_loss": ref_loss,
        "loss_close": abs(loss - ref_loss) <= ATOL + RTOL * abs(ref_loss),
        "differ": sorted(k for k in expect if not torch.equal(got[k], expect[k])),
        "num_tensors": len(expect),
    }


def pretrained_case(case: dict) -> dict[str, Any] | None:
    root = Path(case["root"])
    kind = case["kind"]
    if kind == "load":
        tied = case["source"] == "tied"
        pm = _parallelize(build(tied, seed=7, meta=case.get("meta", False)), case["strategies"])
        info = checkpoint.load_pretrained(pm, root / case["source"])
        res = _compare_with_reference(pm, root / case["source"])
        if res is not None:
            res.update(format=info.format, tied=info.tied)
        return res
    if kind == "dcp":  # a uniap checkpoint of loaded weights, loaded under another plan
        pm = _parallelize(build(False, seed=7), [(4, 1, "FSDP"), (4, 1, "FSDP")])
        checkpoint.load_pretrained(pm, root / "untied")
        checkpoint.save(root / "dcp", pm, None, step=0)  # the model only
        pm2 = _parallelize(build(False, seed=8), [(4, 1, "DDP"), (2, 2, "FSDP")])
        info = checkpoint.load_pretrained(pm2, root / "dcp")
        res = _compare_with_reference(pm2, root / "untied")
        if res is not None:
            res.update(format=info.format, tied=info.tied)
        return res
    # an error: raised on every rank before anything is written
    pm = _parallelize(build(True, seed=7), [(4, 1, "FSDP"), (4, 1, "FSDP")])
    before = _local_params(pm)
    try:
        checkpoint.load_pretrained(pm, root / case["source"])
    except CheckpointError as e:
        message = str(e)
    else:
        message = None
    after = _local_params(pm)
    unchanged = all(torch.equal(before[n], after[n]) for n in before)
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, (message, unchanged))
    if dist.get_rank() != 0:
        return None
    return {
        "messages": [m for m, _ in flags],
        "unchanged": all(u for _, u in flags),
    }
