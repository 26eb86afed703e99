"""The public entry point: ``parallelize(model, cluster, ...) -> ParallelModel``.

Run it under ``torchrun`` (every rank calls it with the same arguments)::

    pm = uniap.api.parallelize(model, "cpu-4", global_batch_size=16,
                               example_inputs=x, loss_fn=loss_fn)
    opt = torch.optim.AdamW(pm.param_groups(), lr=1e-3, foreach=True)
    for x, y in batches:
        opt.zero_grad()
        loss = pm.train_step(x, y)
        opt.step()

A Hugging Face model takes its batch as keyword inputs and computes its own loss::

    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    pm = uniap.api.parallelize(model, "cpu-4", global_batch_size=16, example_inputs=batch)
    loss = pm.train_step(batch)

Order: (1) validate everything that can be checked locally, *before any collective* (a plan
for another model or another world size, a cluster of another size, TP on a layer without a
TP plan, a global batch the plan was not made for); (2) initialise the default process group
from the torchrun environment if needed (NCCL on ``cuda:{LOCAL_RANK}`` when CUDA is
available, else gloo on CPU); (3) plan on rank 0 when no plan is given and broadcast it;
(4) check on every rank that its plan hashes to rank 0's (and that it passed its own checks),
all ranks failing together with the differing rank named; (5) apply the plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from uniap._dist import default_device, init_from_env
from uniap.contract import Plan
from uniap.errors import PlanMismatchError, UniapError
from uniap.executor import ParallelModel, apply_plan
from uniap.executor.sequence_parallel import check_sp_supported
from uniap.executor.tensor_parallel import check_tp_supported

__all__ = ["parallelize", "plan_hash"]

logger = logging.getLogger(__name__)


def plan_hash(plan: Plan) -> str:
    """Hash of what the executor runs (model signature, sizes, schedule, precision when
    recorded, stages); predictions and solver statistics do not count."""
    d = plan.to_dict()
    key = {
        k: d[k]
        for k in (
            "model",
            "world_size",
            "global_batch_size",
            "num_microbatches",
            "schedule",
            "precision",
            "stages",
        )
        if k in d
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _launched_world() -> tuple[int, int]:
    """(rank, world size) of this process without any communication."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _model_identity(
    model: nn.Module, example_inputs: Any, dtype: str | None = None, *, pipeline_check: bool = True
) -> tuple[Any, tuple[str, ...]]:
    """(ModelGraph or None, layer FQNs); the graph in compute ``dtype`` (default: the model's).
    ``pipeline_check=False``: without the export that checks whether the model splits into
    pipeline stages (a given plan with pp = 1 does not ask; the signature does not depend on
    it)."""
    from uniap.graph import build_graph, layer_chain

    if example_inputs is None:
        return None, tuple(f for f, _ in layer_chain(model))
    graph = build_graph(
        model,
        example_inputs,
        name=getattr(model, "uniap_name", None),
        dtype=getattr(torch, dtype) if dtype is not None else None,
        pipeline_check=pipeline_check,
    )
    return graph, graph.fqns


def _check_plan(
    plan: Plan, *, graph: Any, fqns: tuple[str, ...], world_size: int, global_batch_size: int
) -> None:
    """Every local check of a plan against this model and world (no communication)."""
    plan.check_compatible(
        model_signature=graph.signature if graph is not None else None,
        model_name=graph.name if graph is not None else None,
        layer_fqns=fqns,
        world_size=world_size,
    )
    if plan.global_batch_size != global_batch_size:
        raise PlanMismatchError(
            f"the plan does not match: global batch size: the plan is for {plan.global_batch_size} "
            f"samples per iteration, parallelize was given {global_batch_size}; re-run `uniap plan`"
        )
    layers = {layer.fqn: layer for layer in graph.layers} if graph is not None else {}
    for ls in plan.layer_strategies:
        check_tp_supported(layers.get(ls.fqn), ls.fqn, ls.tp)
        if ls.sp:
            check_sp_supported(layers.get(ls.fqn), ls.fqn, ls.tp)


def _as_plan(plan: Plan | str | Path) -> Plan:
    return plan if isinstance(plan, Plan) else Plan.load(plan)


def parallelize(
    model: nn.Module,
    cluster: Any = None,
    *,
    global_batch_size: int,
    example_inputs: Any = None,
    loss_fn: Any = None,
    plan: Plan | str | Path | None = None,
    schedule: str | None = None,
    time_limit_s: float | None = None,
    timeout_s: float = 1800.0,
    precision: Any = None,
    init_weights: Any = None,
    seed: int = 0,
    compile: bool | str = False,
    vocab_parallel: bool = True,
) -> ParallelModel:
    """Plan (or take ``plan``) and apply it: this rank's :class:`ParallelModel`. Collective.

    ``model``: the full model (any ``nn.Module``, e.g. a Hugging Face ``AutoModelFor...``
    model), identical on every rank (same seed); a template, left untouched: the parallel
    model trains a copy. At ``pp == 1`` its own ``forward`` runs with the plan applied to its
    layers; ``pp > 1`` needs a declared chain (``nn.Sequential``, ``uniap_layer_fqns()``).
    ``cluster``: a :class:`~uniap.cluster.Cluster`, preset name or YAML path, for planning
    (default: detected); its world size must equal the launched one. ``example_inputs``: a
    batch of inputs of the real shape, as the forward takes them (a tensor, a tuple of
    positional inputs or a dict of keyword inputs; needed to plan, to check the model
    signature and for TP). ``loss_fn(output, targets)``: a mean over the batch; None uses the
    model's own loss (``output.loss``, a Hugging Face model given ``labels``). ``plan``: a Plan or
    plan file; planned on rank 0 when None. ``schedule``: restrict planning to ``GPipe``/``1F1B``,
    or override a given plan's schedule. ``time_limit_s``: the planner's budget.
    ``timeout_s``: the process group timeout when this call initialises it.
    ``precision``: ``"bf16-mixed"``, ``"fp16-mixed"``, ``"fp32"`` or a
    :class:`~uniap.precision.Precision`, to plan with (default: the planner's, by cluster),
    or to run a given plan with (overrides the plan's; see :mod:`uniap.precision`).
    ``init_weights(layer)``, ``seed``: for a ``model`` built on the meta device, how each
    rank initialises its shards (default: ``reset_parameters()``; see
    :mod:`uniap.executor.materialize`). ``compile``: ``torch.compile`` each layer (``True``:
    the default backend; or a backend name, e.g. ``"aot_eager"``), applied per layer before
    sharding. ``vocab_parallel=False``: plan the embedding and head at tp = 1 (their loss then
    need not be cross-entropy; see :mod:`uniap.executor.vocab_loss`).
    """
    if precision is not None:
        from uniap.precision import resolve_precision

        precision = resolve_precision(precision)
    rank, world_size = _launched_world()
    if (
        not isinstance(global_batch_size, int)
        or isinstance(global_batch_size, bool)
        or global_batch_size < 1
    ):
        raise UniapError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    if cluster is not None:
        from uniap.cluster import load_cluster

        cluster = load_cluster(cluster)
        if cluster.world_size != world_size:
            raise PlanMismatchError(
                f"cluster {cluster.name!r} has {cluster.world_size} devices but {world_size} "
                "processes were launched; launch one process per device or pass the matching "
                "cluster"
            )
    given = _as_plan(plan) if plan is not None else None
    if precision is None and given is None:  # the planner's default, known before planning
        from uniap.cluster import Cluster
        from uniap.precision import default_precision

        precision = default_precision(cluster if cluster is not None else Cluster.detect())
    compute = precision or (given.precision if given is not None else None)
    graph, fqns = _model_identity(
        model,
        example_inputs,
        compute.param_dtype if compute is not None else None,
        pipeline_check=given is None or given.pp_degree > 1,
    )
    if given is not None:
        if schedule is not None and schedule != given.schedule:
            given = dataclasses.replace(given, schedule=schedule)
        if precision is not None and precision != given.precision:
            given = dataclasses.replace(given, precision=precision)
        _check_plan(
            given,
            graph=graph,
            fqns=fqns,
            world_size=world_size,
            global_batch_size=global_batch_size,
        )
    elif graph is None:
        raise UniapError(
            "example_inputs is required to plan (a batch of inputs of the real shape); "
            "or pass plan="
        )

    init_from_env(timeout_s)
    if given is None:
        given = _plan_on_rank0(
            model if graph is None else graph,
            cluster,
            rank,
            global_batch_size=global_batch_size,
            example_inputs=example_inputs,
            schedule=schedule,
            time_limit_s=time_limit_s,
            precision=precision,
            vocab_parallel=vocab_parallel,
        )
    status: str | None = None
    try:
        _check_plan(
            given,
            graph=graph,
            fqns=fqns,
            world_size=world_size,
            global_batch_size=global_batch_size,
        )
    except UniapError as e:
        status = str(e)
    _agree_on_plan(given, status)
    layers = {layer.fqn: layer for layer in graph.layers} if graph is not None else None
    logger.info("applying plan %s: %s", plan_hash(given), given.summary())
    return apply_plan(
        model,
        given,
        loss_fn=loss_fn,
        layers=layers,
        device=default_device(),
        init_weights=init_weights,
        seed=seed,
        example_inputs=example_inputs,
        compile=compile,
    )


def _plan_on_rank0(
    model_or_graph: Any,
    cluster: Any,
    rank: int,
    *,
    global_batch_size: int,
    example_inputs: Any,
    schedule: str | None,
    time_limit_s: float | None,
    precision: Any = None,
    vocab_parallel: bool = True,
) -> Plan:
    """Rank 0 plans; every rank receives the plan (or rank 0's error)."""
    payload: list[Any] = [None]
    if rank == 0:
        try:
            from uniap.cluster import Cluster
            from uniap.planner import plan as make_plan

            kwargs: dict[str, Any] = {"vocab_parallel": vocab_parallel}
            if schedule is not None:
                kwargs["schedules"] = [schedule]
            if time_limit_s is not None:
                kwargs["time_limit_s"] = time_limit_s
            if precision is not None:
                kwargs["precision"] = precision
            found = make_plan(
                model_or_graph,
                cluster if cluster is not None else Cluster.detect(),
                global_batch_size=global_batch_size,
                example_inputs=example_inputs,
                **kwargs,
            )
            payload = [{"plan": found.to_dict()}]
        except Exception as e:  # noqa: BLE001 - every rank must learn about it, then raise
            payload = [{"error": f"{type(e).__name__}: {e}"}]
            dist.broadcast_object_list(payload, src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    if "error" in payload[0]:
        raise RuntimeError(f"rank 0 failed to plan: {payload[0]['error']}")
    return Plan.from_dict(payload[0]["plan"], source="<plan from rank 0>")


def _agree_on_plan(plan: Plan, status: str | None) -> None:
    """All ranks hold the same plan and accepted it, or all raise naming the first culprit."""
    mine = (plan_hash(plan), status)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    ref_hash = everyone[0][0]
    for r, (h, st) in enumerate(everyone):
        if st is not None:
            raise PlanMismatchError(f"rank {r} refused the plan: {st}")
        if h != ref_hash:
            raise PlanMismatchError(
                f"rank {r}'s plan (hash {h}) differs from rank 0's (hash {ref_hash}); every rank "
                "must run the identical plan: pass the same plan file, or let rank 0 plan"
            )
