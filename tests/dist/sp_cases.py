"""Sequence parallelism cases (one spawn, see test_sp_parity.py): a uniap preset (gpt-tiny)
and an unmodified Hugging Face Llama train with tp = 2 + sp on their TP layers, with and
without recompute, against one process: per-step losses and every gradient (SGD,
``foreach=True``); and the bytes one SP layer saves for backward, counted with
``saved_tensors_hooks`` on a rank, against the planner's number for that layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from own_forward import full_grads, parity_summary, rank_verdicts, sgd
from torch.distributed.tensor import DTensor
from toy import make_plan

from uniap.api import parallelize
from uniap.cluster import load_cluster
from uniap.cost_model import CostModel
from uniap.graph import build_graph
from uniap.models import build_model, example_batch, loss_fn_for

SEQ, VOCAB = 8, 64


def _build(model: str, kv_heads: int = 2) -> torch.nn.Module:
    if model == "gpt":
        return build_model("gpt-tiny", device="cpu", seed=0, n_layers=2, seq_len=SEQ)
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _batch(model: str, size: int, seed: int) -> tuple[Any, Any]:
    if model == "gpt":
        return example_batch(_build_meta(), size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (size, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}, None


def _build_meta() -> torch.nn.Module:
    return build_model("gpt-tiny", n_layers=2, seq_len=SEQ)


def _loss(model: str) -> Any:
    return loss_fn_for("gpt-tiny") if model == "gpt" else None


def _call_loss(model: str, m: torch.nn.Module, x: Any, y: Any) -> torch.Tensor:
    return _loss(model)(m(x), y) if model == "gpt" else m(**x).loss


_GRAPHS: dict[tuple[str, int], Any] = {}


def _graph(model: str, x0: Any, kv_heads: int = 2) -> Any:
    """The model's graph, traced once per process (pp = 1: no pipeline-split check)."""
    key = (model, kv_heads)
    if key not in _GRAPHS:
        _GRAPHS[key] = build_graph(_build(model, kv_heads), x0, pipeline_check=False)
    return _GRAPHS[key]


def _plan(
    model: str, graph: Any, big_b: int, c: int, recompute: bool, case_kind: str = "DDP", pp: int = 1
) -> Any:
    """tp = 2 + sp on every layer that supports it, data parallel (``case_kind``) over the rest
    of each stage; others data parallel; ``pp`` stages (the first two layers on stage 0)."""
    world, tp = dist.get_world_size(), 2
    g = world // pp
    per_layer = [
        (g // tp, tp, case_kind, recompute, 0, True) if layer.supports_sp(tp) else (g, 1, "DDP")
        for layer in graph.layers
    ]
    split = [2, len(per_layer) - 2] if pp == 2 else [len(per_layer)]
    stages = [per_layer[:2], per_layer[2:]] if pp == 2 else [per_layer]
    return make_plan(
        list(graph.fqns),
        world,
        stages,
        global_batch_size=big_b,
        num_microbatches=c,
        split=split,
        schedule="1F1B" if pp > 1 else "GPipe",
        model_name=graph.name,
        signature=graph.signature,
    )


def sp_parity_case(case: dict) -> dict[str, Any] | None:
    """Train with tp = world size + sp on every layer that supports it (data parallel
    elsewhere) and compare losses and gradients with one process."""
    model, big_b, c, steps = case["model"], 8, case.get("c", 1), 2
    x0, _ = _batch(model, big_b, 0)
    graph = _graph(model, x0)
    plan = _plan(
        model,
        graph,
        big_b,
        c,
        case.get("recompute", False),
        case.get("dp_kind", "DDP"),
        case.get("pp", 1),
    )
    num_sp = sum(ls.sp for ls in plan.layer_strategies)
    pm = parallelize(
        _build(model), plan=plan, loss_fn=_loss(model), global_batch_size=big_b, example_inputs=x0
    )
    opt = sgd(pm.parameters())
    losses, grads = [], {}
    for step in range(steps):
        x, y = _batch(model, big_b, step)
        pm.zero_grad()
        losses.append(pm.train_step(x, y))
        if step == 0:
            partial = [
                n
                for n, p in pm.named_parameters()
                if isinstance(p.grad, DTensor) and any(pl.is_partial() for pl in p.grad.placements)
            ]
            grads = full_grads(pm)
        opt.step()
    ref = _build(model)  # on every rank: with pipeline stages each checks its own gradients
    ref_opt = torch.optim.SGD(ref.parameters(), lr=opt.param_groups[0]["lr"], foreach=True)
    ref_losses, ref_grads = [], {}
    for step in range(steps):
        x, y = _batch(model, big_b, step)
        ref_opt.zero_grad()
        loss = _call_loss(model, ref, x, y)
        loss.backward()
        ref_losses.append(float(loss.detach()))
        if step == 0:
            ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        ref_opt.step()
    every = rank_verdicts(grads, ref_grads, partial, staged=plan.pp_degree > 1)
    if every is None:
        return None
    return {
        "plan": plan.summary(),
        "num_sp": num_sp,
        "partial_grads": sorted({n for _, _, p in every for n in p}),
        **parity_summary(every, ref_grads, losses, ref_losses),
    }


def _saved_bytes(module: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    """Distinct storages autograd saves in one forward of ``module`` (parameters excluded, a
    DTensor's local shard), as the planner's trace counts them."""
    from uniap._torch_utils import storage_key

    excluded = {storage_key(t)[0] for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = storage_key(t)
        if key not in excluded and key not in saved:
            saved[key] = nbytes
        return t

    args = tuple(
        a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    out.float().sum().backward()
    return sum(saved.values())


def sp_memory_case(case: dict) -> dict[str, Any] | None:
    """Bytes the first SP layer saves for backward on a rank at tp = world size, with SP and
    (without recompute) with plain TP, vs the planner's activation bytes for each."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh

    from uniap.executor.tensor_parallel import apply_tp

    model, recompute, b = case["model"], case.get("recompute", False), 4
    tp = dist.get_world_size()
    x0, _ = _batch(model, b, 0)
    # no grouped-query attention here: the trace saves keys and values as the fused kernel
    # does (repeated per query head), which is the same with or without SP
    full = _build(model, kv_heads=4)
    graph = _graph(model, x0, kv_heads=4)
    u = next(i for i, layer in enumerate(graph.layers) if layer.supports_sp(tp))
    layer = graph.layers[u]
    cost = CostModel(graph, load_cluster("cpu-4"))
    captured: dict[str, Any] = {}  # the layer's input, as the model computes it
    module = full.get_submodule(layer.fqn)

    def grab(_: Any, args: tuple, kwargs: dict) -> None:
        captured["args"], captured["kwargs"] = args, kwargs

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        full(x0) if model == "gpt" else full(**x0, use_cache=False)
    handle.remove()
    mesh = init_device_mesh("cpu", (tp,))
    out: dict[str, Any] = {"layer": layer.fqn}
    for sp in (True, False) if not recompute else (True,):
        m = apply_tp(copy.deepcopy(module), layer, mesh, sp=sp, recompute=recompute)
        out["planned_sp" if sp else "planned_tp"] = cost.activation_bytes(
            u, b, tp, sp=sp, recompute=recompute
        )
        out["measured_sp" if sp else "measured_tp"] = _saved_bytes(
            m, captured["args"], captured["kwargs"]
        )
    return out if dist.get_rank() == 0 else None


def sp_case(case: dict) -> dict[str, Any] | None:
    """Dispatch on ``case["kind"]``: ``parity``, ``memory`` or ``vocab`` (a world-4 case of
    :func:`vocab_parallel.vocab_case`, sharing this spawn)."""
    if case["kind"] == "vocab":
        from vocab_parallel import vocab_case

        return vocab_case(case)
    return (sp_memory_case if case["kind"] == "memory" else sp_parity_case)(case)
