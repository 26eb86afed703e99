"""The Unified Optimization Process: search every (pp, c, schedule), solve each exactly, keep
the best, and return it as a :class:`uniap.contract.Plan`.

For ``pp`` in the divisors of the device count (at most the number of layers) and ``c`` in the
divisors of the global batch (every layer must have a strategy whose dp splits the micro-batch):

1. build the cost tables (:class:`uniap.cost_model.CostModel`);
2. a lower bound ``LB = S + (c - 1) T + Gmin / pp`` with ``S = sum_u min_k A[u,k]``,
   ``Gmin = sum_u min_k G[u,k]`` and ``T`` the min-max contiguous split of the fastest layer
   times under memory (:func:`uniap.bounds.bottleneck_lower_bound`; every stage time is at
   least its compute, so the bottleneck is at least ``T``);
3. a heuristic assignment per candidate that may still win (:func:`uniap.search.heuristic`);
   the best of them is the first incumbent; then the one-stage candidates are solved, exactly
   and cheaply (:func:`uniap.search.single_stage_optimum`, a label-setting pass), so that
   where one stage wins or comes close its plan settles the pipelined candidates before
   their local search and programs run;
4. the segment bound of each candidate (:func:`uniap.bounds.segment_lower_bound`: contiguous
   stages, each with its own compute, synchronisation, memory and outgoing edge, refined
   towards the incumbent); a candidate whose bound reaches the best time found is skipped
   (it cannot win); when it does not reach it and the bottleneck counts (``c > 1``), its
   boxes start at the memory-aware bottleneck bound (:func:`uniap.bounds.memory_bottleneck_bound`:
   each stage's fastest strategies *that fit its memory*, an exact knapsack, where the cheap
   bound takes every layer's fastest). The others get a better heuristic assignment (local
   search, stages re-planned within memory; with ``c > 1`` also the split of that bound made
   an assignment, :func:`uniap.search.memory_split_assignment`), in increasing bound, each
   new incumbent refining the others' bounds; they are visited in increasing heuristic time;
5. each MILP is warm-started with its heuristic assignment, and the best time so far cuts off
   everything that cannot beat it (:func:`uniap.milp.solve`, which first tries the exact
   label search of a pipeline below that time, :func:`uniap.pipeline_labels.pipeline_optimum`,
   and otherwise narrows each layer's stages to the runs the segment bound allows below that
   time); a first pass gives every
   candidate a short time limit (the first one solved four times as long), and a second
   pass finishes the ones that stopped early, against the (by then usually much better)
   incumbent. A plan whose programs stopped at their limit says so (``solver["status"]``
   ``time_limit``) with its gap to the lowest bound of those programs.

Every skip and every cut only removes assignments that cannot beat a plan already in hand,
so the result is the optimum over all candidates (tests check it against exhaustive search,
and :mod:`uniap.exactness` at every memory limit where the optimum changes). A bound that says
a candidate cannot fit at all is never the only reason for :class:`InfeasibleError`: before
raising, the leanest candidate (and any whose leanest assignment fits) is solved after all,
and the error lists every candidate with the reason it gave no plan.

CPU offload (``FSDP-offload``, on a cluster that declares host memory): by default the search
runs first over the kinds that keep the state on the devices, and only when no plan fits
there over every kind, offload included ("when needed": offloading adds host-device
traffic and a CPU optimizer step, so it wins where nothing else fits, and the search over
the larger space is paid only then). Passing ``kinds`` with ``FSDP-offload`` searches the whole
space at once, exactly.

A model that is not a declared chain runs its own forward at ``pp = 1`` (whole; at ``pp > 1``
split by tracing, tp = 1): every value between its layers stays in the first layer's layout,
the *base*, and each layer in another layout reshards its inputs in and its outputs back
(:class:`uniap.executor.model_forward.LayoutAdapter`). A vocabulary-parallel head keeps its
logits sharded on the vocabulary and the loss runs in the base batch layout
(:mod:`uniap.executor.vocab_loss`), which works only when the head's TP degree divides the
first layer's. Either way the first layer's choice prices or limits every other layer's,
which per-layer tables cannot say, so the search runs once per TP degree of the first layer
(:func:`layout_cases`), each case priced with that base (``CostModel(base_tp=...)``) and
holding the head to the degrees the base allows: the cases cover every plan the executor
runs, so the best of them is the optimum over those plans.

Schedules: with ``pp = 1`` there is no pipeline (one micro-batch in flight: gradient
accumulation). With ``pp > 1`` 1F1B has GPipe's time and never more memory, so GPipe is solved
only when asked for; so is interleaved 1F1B (``schedules=["1F1B", "Interleaved1F1B"]``), at
each of its stages per rank ``v`` (:mod:`uniap.schedules`: 2, or those of
``virtual_stages=[...]``): a candidate ``(pp, c, schedule, v)`` whose program places the layers
on ``pp * v`` stages. Its per-rank sums (time, memory)
make that program harder to prove optimal than 1F1B's: on Llama-7B (a100-2x8, batch 64) the
interleaved plan is 5 % faster, but the search stops at its time limit with a gap of a few per
cent, which the plan's ``solver`` section reports.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

from uniap._gc import collector_paused
from uniap.bounds import candidate_lower_bound
from uniap.cluster import Cluster
from uniap.contract import DEVICE_KINDS, KINDS, OFFLOAD, SCHEDULES, LayerStrategy, Plan, Stage
from uniap.cost_model import CostModel, CostTables, evaluate_assignment
from uniap.errors import ConfigError, InfeasibleError
from uniap.explain import explain_candidates
from uniap.graph import ModelGraph
from uniap.precision import Precision, default_precision, precision_for_dtype, resolve_precision
from uniap.profiles import Profile
from uniap.progress import progress_lines
from uniap.report import predicted_breakdown
from uniap.schedules import get_schedule
from uniap.strategies import divisors
from uniap.uop import Candidate, Entry, Search, explain_entries

__all__ = [
    "plan",
    "plan_graph",
    "plan_of_assignment",
    "Candidate",
    "candidate_tables",
    "layout_cases",
]

log = logging.getLogger(__name__)


@collector_paused
def plan_graph(
    graph: ModelGraph,
    cluster: Cluster,
    *,
    global_batch_size: int,
    profile: Profile | None = None,
    schedules: Sequence[str] | None = None,
    virtual_stages: Sequence[int] | None = None,
    pp_degrees: Sequence[int] | None = None,
    num_microbatches: Sequence[int] | None = None,
    memory_fraction: float = 0.9,
    max_tp: int | None = None,
    recompute: bool = True,
    kinds: Sequence[str] | None = None,
    sequence_parallel: bool = False,
    vocab_parallel: bool = True,
    time_limit_s: float = 60.0,
    threads: int = 1,
    seed: int = 0,
    progress: Callable[[str], None] | bool | None = None,
    progress_interval_s: float = 5.0,
    precision: Precision | str | None = None,
) -> Plan:
    """The optimal plan for a layer chain on a cluster (see the module docstring).

    Progress lines (each program solved; during a solve, every ``progress_interval_s``, the
    candidate, incumbent, bound and gap) go to the ``uniap.progress`` logger at INFO;
    ``progress=True`` shows them on stderr when logging is not configured, a callable
    receives each line as well. ``precision``: recorded in the plan and charged by the cost
    model (default: from the graph's dtype, :func:`uniap.precision.precision_for_dtype`).
    ``kinds``: the data-parallel kinds offered (default all of
    :data:`uniap.contract.DEVICE_KINDS`, and on a cluster that declares host memory
    ``FSDP-offload`` too when no plan fits without it, see the module docstring).
    ``sequence_parallel``: offer sequence parallelism on the layers with ``tp > 1`` that
    support it (off by default: see :mod:`uniap.strategies`). ``vocab_parallel=False``: keep
    the embedding and head at tp = 1 (by default they may be vocabulary-parallel, the loss
    then running under ``loss_parallel()``, which takes cross-entropy only: see
    :mod:`uniap.executor.vocab_loss`). ``virtual_stages``: the stages per rank ``v`` an
    interleaved schedule is tried at (default each schedule's own, 2; any ``v >= 2``, each a
    candidate of its own, with ``pp * v`` at most the number of layers)."""
    # vocabulary-parallel layers held at tp = 1 when asked
    no_vocab = {
        layer.fqn: frozenset({1})
        for layer in graph.layers
        if not vocab_parallel and layer.tp_vocab is not None
    }
    with progress_lines(progress) as say:

        def one_search(offered: Sequence[str] | None, layer_tp=None, base_tp=None) -> Plan:
            layer_tp = dict(layer_tp or {})
            for fqn, tps in no_vocab.items():
                layer_tp[fqn] = layer_tp[fqn] & tps if fqn in layer_tp else tps
            return _plan_graph(
                graph,
                cluster,
                global_batch_size=global_batch_size,
                profile=profile,
                schedules=schedules,
                virtual_stages=virtual_stages,
                pp_degrees=pp_degrees,
                num_microbatches=num_microbatches,
                memory_fraction=memory_fraction,
                max_tp=max_tp,
                recompute=recompute,
                kinds=offered,
                sequence_parallel=sequence_parallel,
                time_limit_s=time_limit_s,
                threads=threads,
                seed=seed,
                say=say,
                progress_interval_s=progress_interval_s,
                precision=precision,
                layer_tp=layer_tp or None,
                base_tp=base_tp,
            )

        def search(offered: Sequence[str] | None) -> Plan:
            cases = layout_cases(graph, cluster.world_size, max_tp or cluster.devices_per_node)
            if not cases:
                return one_search(offered)
            log.info(
                "%s runs its own forward: searching %d base layouts (first layer at tp in %s)",
                graph.name,
                len(cases),
                [beta for beta, _ in cases],
            )
            if say is not None and len(cases) > 1:
                say(f"own forward: searching {len(cases)} base layouts")
            best: Plan | None = None
            lowest: list[tuple[float, int]] = []  # each case's proven bound, its first-layer tp
            for beta, case in cases:
                try:
                    p = one_search(offered, case, beta)
                except InfeasibleError:
                    continue
                tpi = p.predicted["time_per_iteration_s"]
                lowest.append((tpi * (1 - p.solver.get("gap", 0.0)), beta))
                if best is None or tpi < best.predicted["time_per_iteration_s"]:
                    best = p
            if best is None:  # every case infeasible: say why with the first case's reasons
                return one_search(offered, cases[0][1], cases[0][0])
            # the plan is proven optimal over every case only when no case's bound is below it
            tpi = best.predicted["time_per_iteration_s"]
            low, beta = min(lowest)
            if low < tpi * (1 - 1e-12) and best.solver.get("gap", 0.0) < (tpi - low) / tpi:
                log.warning(
                    "the base layout with the first layer at tp=%d stopped at its time limit "
                    "with its bound %.6g s %.2g %% below the plan's %.6g s; raise time_limit_s "
                    "to prove the plan",
                    beta,
                    low,
                    100 * (tpi - low) / tpi,
                    tpi,
                )
                best = dataclasses.replace(
                    best, solver={**best.solver, "status": "time_limit", "gap": (tpi - low) / tpi}
                )
            return best

        if kinds is None and cluster.offload_enabled:
            try:
                return search(DEVICE_KINDS)
            except InfeasibleError as e:
                why = str(e).splitlines()[0]
                log.info("no plan fits without CPU offload (%s); searching with %s", why, OFFLOAD)
                if say is not None:
                    say(f"no plan fits without CPU offload; searching again with {OFFLOAD}")
                kinds = KINDS
        return search(kinds)


def layout_cases(
    graph: ModelGraph, world_size: int, max_tp: int
) -> list[tuple[int, dict[str, frozenset[int]]]]:
    """The base layouts of a model that runs its own forward (not a declared chain; see the
    module docstring): per TP degree ``beta`` the first layer may take, ``(beta,
    layer_tp)`` with the first layer at ``beta`` and, when the last layer is a
    vocabulary-parallel head, the head at a degree that divides ``beta`` (its loss runs in
    the first layer's batch layout, :mod:`uniap.executor.vocab_loss`). Their union is every
    plan the executor runs, each case priced with its base (``CostModel(base_tp=beta)``).
    Empty for a declared chain, a one-layer model or one device: no base to choose."""
    declared = graph.extra.get("pipeline_split", "chain") == "chain"  # (a hand-made graph too)
    if len(graph.layers) < 2 or world_size < 2 or declared:
        return []
    head, first = graph.layers[-1], graph.layers[0]
    vocab_head = head.tp_vocab is not None and head.tp_vocab.kind == "head"
    degrees = divisors(world_size)
    cases = []
    for beta in degrees:
        if beta > max_tp or not first.supports_tp(beta):
            continue
        case = {first.fqn: frozenset({beta})}
        if vocab_head:
            case[head.fqn] = frozenset(t for t in degrees if beta % t == 0 and head.supports_tp(t))
        cases.append((beta, case))
    return cases


def _plan_graph(
    graph,
    cluster,
    *,
    global_batch_size,
    profile,
    schedules,
    pp_degrees,
    num_microbatches,
    memory_fraction,
    max_tp,
    recompute,
    kinds,
    sequence_parallel,
    time_limit_s,
    threads,
    seed,
    say,
    progress_interval_s,
    precision,
    layer_tp=None,
    base_tp=None,
    virtual_stages=None,
) -> Plan:
    t_start = time.perf_counter()
    N, L, B = cluster.world_size, graph.num_layers, global_batch_size
    if not isinstance(B, int) or isinstance(B, bool) or B < 1:
        raise ConfigError(f"global_batch_size must be a positive integer, got {B!r}")
    if not (
        isinstance(time_limit_s, int | float) and math.isfinite(time_limit_s) and time_limit_s > 0
    ):
        raise ConfigError(
            f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}"
        )
    if schedules is not None:
        bad = [s for s in schedules if s not in SCHEDULES]
        if bad:
            raise ConfigError(f"unknown schedule(s) {bad}; choose from {list(SCHEDULES)}")
    if virtual_stages is not None:
        vs = list(virtual_stages)
        bad_v = [v for v in vs if isinstance(v, bool) or not isinstance(v, int) or v < 2]
        if bad_v or not vs:
            raise ConfigError(
                f"virtual_stages must be whole numbers of stages per rank of at least 2 (an "
                f"interleaved schedule's v), got {vs!r}"
            )
    _log_tp_exclusions(graph)
    precision = (
        resolve_precision(precision) if precision is not None else precision_for_dtype(graph.dtype)
    )
    cm = CostModel(
        graph,
        cluster,
        profile,
        memory_fraction=memory_fraction,
        max_tp=max_tp,
        recompute=recompute,
        precision=precision,
        kinds=kinds,
        sequence_parallel=sequence_parallel,
        layer_tp=layer_tp,
        base_tp=base_tp,
    )
    pps = [p for p in divisors(N) if p <= L]
    if not graph.extra.get("pipeline_splittable", True):
        # the executor runs this model's own forward, at pp = 1 only (see uniap.executor)
        why = graph.extra.get("pipeline_split_error", "it is not a declared layer chain")
        if pp_degrees is not None and any(p > 1 for p in pp_degrees):
            raise ConfigError(
                f"{graph.name} cannot be split into pipeline stages: {why}; plan with "
                "pp_degrees=[1], or define uniap_layer_fqns() if running its layers one after "
                "the other is its forward"
            )
        pps = [1]
    if pp_degrees is not None:
        bad = [p for p in pp_degrees if p not in pps]
        if bad:
            raise ConfigError(
                f"pipeline degree(s) {bad} must divide the number of devices ({N}) and be at most "
                f"the number of layers ({L}); try pp in {pps}"
            )
        pps = sorted(pp_degrees)
    piped = [p for p in pps if p > 1]
    interleaved = [s for s in schedules or () if get_schedule(s).interleaved]
    if virtual_stages is not None and interleaved and piped:
        if not any(p * v <= L for p in piped for v in virtual_stages):
            raise ConfigError(
                f"{', '.join(interleaved)} with {min(virtual_stages)} or more stages per rank "
                f"(virtual_stages {list(virtual_stages)}) at pp in {piped} needs at least "
                f"{min(piped) * min(virtual_stages)} layers, the model has {L}; ask for at most "
                f"{L // min(piped)} stages per rank, or a smaller pp"
            )
    # ---------------------------------------------------------------- the search, in phases
    search = Search(
        [
            Entry(Candidate(pp, c, sched, candidate_lower_bound(t), t.virtual_stages), t)
            for pp, c, sched, t in candidate_tables(
                cm, pps, B, num_microbatches, schedules, virtual_stages
            )
        ]
    )
    if not search.entries:
        raise InfeasibleError(
            "no (pipeline degree, micro-batch count) gives every layer a strategy for global "
            f"batch {B} on {N} devices; use a global batch divisible by more data-parallel degrees "
            f"(e.g. a multiple of {N})",
        )
    if say is not None:
        cands = [e.cand for e in search.entries]
        say(
            f"searching {len(cands)} candidates (pp in {sorted({c.pp for c in cands})}, "
            f"micro-batches in {sorted({c.num_microbatches for c in cands})}): heuristic plans and "
            "bounds first"
        )
    search.first_incumbents()
    search.solve_all(time_limit_s, threads, seed, say, progress_interval_s, one_stage=True)
    search.improve_incumbents()
    search.solve_all(time_limit_s, threads, seed, say, progress_interval_s)
    if search.best is None:
        search.last_resort(time_limit_s, threads, seed)
    if search.best is None:
        search.raise_infeasible(cm, cluster, memory_fraction)
    best = search.best
    wall = time.perf_counter() - t_start
    if say is not None:
        by_bound = sum(e.solution is None for e in search.entries)
        if by_bound:
            say(
                f"{by_bound} of {len(search.entries)} candidates settled by their lower bounds "
                "without a program (none can beat the plan, or no split of the layers fits)"
            )
    # the plan's gap: against the lowest bound of the programs that stopped at their limit and
    # may still beat it (a program without an assignment below the cutoff has one too); every
    # other candidate is proven no better than the plan
    timed_out = search.unsettled()
    best_s = best.solution.time_per_iteration_s
    for e in timed_out:
        lower = max(e.solution.bound_s, e.cand.lower_bound_s)
        log.warning(
            "the program of pp=%d c=%d %s stopped at its %.3g s time limit with its bound %.6g s "
            "%.2g %% below the plan's %.6g s: the plan may not be optimal; raise time_limit_s to "
            "prove it",
            e.cand.pp,
            e.cand.num_microbatches,
            e.cand.schedule,
            time_limit_s,
            lower,
            100 * max(0.0, best_s - lower) / best_s,
            best_s,
        )
    status = "optimal" if not timed_out else "time_limit"
    lowest = min((max(e.solution.bound_s, e.cand.lower_bound_s) for e in timed_out), default=best_s)
    gap = max(0.0, best_s - lowest) / best_s if timed_out else 0.0
    out = plan_of_assignment(cm, best.tables, best.solution.stage_of, best.solution.strategy_of, B)
    out = dataclasses.replace(
        out,
        solver={
            "status": status,
            "gap": float(gap),
            "wall_s": round(wall, 4),
            "milps_solved": search.num_solves,
            "candidates": [e.cand.row() for e in search.entries],
            # the best plan at every (pp, schedule): the solver's assignment, else the heuristic's
            "best_per_pp": explain_candidates(explain_entries(search.entries), cluster),
        },
    )
    log.info("plan: %s (%s, %d programs, %.2f s)", out.summary(), status, search.num_solves, wall)
    return out


def plan(
    model,
    cluster: Cluster | str,
    *,
    global_batch_size: int,
    example_inputs=None,
    seq_len: int | None = None,
    dtype: str | None = None,
    precision: Precision | str | None = None,
    **kwargs,
) -> Plan:
    """The optimal plan for ``model`` (an ``nn.Module``, on any device, or a preset name from
    :mod:`uniap.models`; ``seq_len`` overrides a text preset's sequence length) on ``cluster``
    (a :class:`Cluster`, preset name or YAML path). Keyword arguments go to :func:`plan_graph`.

    ``precision``: ``"bf16-mixed"``, ``"fp16-mixed"``, ``"fp32"`` or a
    :class:`~uniap.precision.Precision`; the graph is built in its ``param_dtype``. Default:
    from ``dtype`` when given (float32 -> fp32, bfloat16 -> bf16-mixed), else
    ``bf16-mixed`` on a CUDA cluster and ``fp32`` on a CPU one (for a :class:`ModelGraph`:
    from its dtype)."""
    from uniap.cluster import load_cluster
    from uniap.graph import build_graph

    if isinstance(cluster, str):
        cluster = load_cluster(cluster)
    if isinstance(dtype, str) and dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    if precision is not None:
        precision = resolve_precision(precision)
        if dtype is not None and str(dtype).removeprefix("torch.") != precision.param_dtype:
            raise ConfigError(
                f"dtype {dtype} contradicts precision {precision.name} (compute in "
                f"{precision.param_dtype}); pass one of them"
            )
    elif isinstance(model, ModelGraph):
        precision = precision_for_dtype(model.dtype)
    elif dtype is not None:
        precision = precision_for_dtype(dtype)
    else:
        precision = default_precision(cluster)
    import torch

    dtype = getattr(torch, precision.param_dtype)
    if isinstance(model, ModelGraph):
        graph = model
    elif isinstance(model, str):
        from uniap import models

        overrides = {}
        if seq_len is not None:
            if not hasattr(models.model_config(model), "seq_len"):
                raise ConfigError(f"model {model!r} has no sequence length; omit seq_len")
            overrides["seq_len"] = seq_len
        m = models.build_model(model, device="meta", **overrides)
        inputs = (
            example_inputs
            if example_inputs is not None
            else models.example_batch(m, 2, device="meta")[0]
        )
        graph = build_graph(m, inputs, name=model, dtype=dtype)
    else:
        if example_inputs is None:
            raise ConfigError(
                "example_inputs is required to plan an nn.Module (a batch of inputs of the real "
                "shape)"
            )
        if seq_len is not None:
            raise ConfigError(
                "seq_len applies to model presets; for an nn.Module pass example_inputs of that "
                "length"
            )
        graph = build_graph(model, example_inputs, dtype=dtype)
    return plan_graph(
        graph, cluster, global_batch_size=global_batch_size, precision=precision, **kwargs
    )


# ---------------------------------------------------------------------- helpers
def candidate_tables(
    cm: CostModel,
    pp_degrees: Sequence[int],
    global_batch_size: int,
    num_microbatches: Sequence[int] | None = None,
    schedules: Sequence[str] | None = None,
    virtual_stages: Sequence[int] | None = None,
) -> list[tuple[int, int, str, CostTables]]:
    """Every ``(pp, c, schedule, tables)`` the planner considers: ``c`` among the divisors of
    the global batch (or the ones given), 1F1B (and the other schedules asked for, an
    interleaved one at each of its stages per rank ``v``, or at each of ``virtual_stages``,
    with ``pp * v`` at most the number of layers, in ``tables.virtual_stages``) when
    ``pp > 1``, and only ``c`` for which every layer has a strategy and the schedule can
    run."""
    B = global_batch_size
    cs = divisors(B) if num_microbatches is None else sorted(num_microbatches)
    out = []
    for pp in pp_degrees:
        for c in cs:
            if B % c:
                raise ConfigError(
                    f"num_microbatches {c} must divide global_batch_size {B}; try one of "
                    f"{divisors(B)}"
                )
            for sched in ["1F1B"] if pp == 1 else list(schedules or ["1F1B"]):
                spec = get_schedule(sched)
                per_rank = spec.stages_per_rank
                if spec.interleaved and virtual_stages is not None:
                    per_rank = tuple(sorted(set(virtual_stages)))
                for v in (1,) if pp == 1 else per_rank:
                    if pp * v > cm.graph.num_layers or spec.why_not(pp, v, c):
                        continue  # too few layers, or the schedule cannot run c micro-batches
                    try:
                        t = cm.tables(pp, c, B, sched, v)
                    except ConfigError:
                        continue  # some layer has no strategy for this micro-batch size
                    out.append((pp, c, sched, t))
    return out


def _log_tp_exclusions(graph: ModelGraph) -> None:
    seen = set()
    for layer in graph.layers:
        r = layer.tp_excluded_reason
        if r and r not in seen:
            seen.add(r)
            log.info("tensor parallelism excluded for %s (and alike): %s", layer.fqn, r)


def plan_of_assignment(
    cm: CostModel,
    t: CostTables,
    stage_of: Sequence[int],
    strategy_of: Sequence[int],
    global_batch_size: int,
) -> Plan:
    """The :class:`Plan` of an assignment of ``t`` (the tables of ``cm``): its stages, precision,
    predictions (time, memory, breakdown, FLOPs) and provenance, without solver statistics.
    The planner's plans are made by it, and so are the benchmarks' baseline plans, so the
    executor runs both alike."""
    import torch

    from uniap._version import __version__

    graph, cluster, B = cm.graph, cm.cluster, global_batch_size
    stage_of, strategy_of = list(stage_of), list(strategy_of)
    N, pp = cluster.world_size, t.pp
    g = N // pp
    ev = evaluate_assignment(t, stage_of, strategy_of)
    stages = []
    for i in range(t.num_stages):
        layers = tuple(
            LayerStrategy(graph.layers[u].fqn, t.strategies[k])
            for u, (si, k) in enumerate(zip(stage_of, strategy_of))
            if si == i
        )
        r = i % pp  # interleaved: stage i on the ranks of stage i % pp
        stages.append(Stage(tuple(range(r * g, (r + 1) * g)), layers))
    from importlib.metadata import PackageNotFoundError, version

    try:
        highs_version = version("highspy")
    except PackageNotFoundError:  # pragma: no cover
        highs_version = "unknown"
    tpi = ev.time_per_iteration_s
    return Plan(
        model_name=graph.name,
        model_signature=graph.signature,
        num_layers=graph.num_layers,
        world_size=N,
        global_batch_size=B,
        num_microbatches=t.num_microbatches,
        schedule=t.schedule,
        stages=tuple(stages),
        precision=cm.precision,
        predicted={
            "time_per_iteration_s": float(tpi),
            "samples_per_s": float(B / tpi),
            "peak_memory_bytes": [float(m) for m in ev.peak_memory_bytes],
            "stage_time_s": [float(x) for x in ev.stage_time_s],
            "memory_limit_bytes": float(t.memory_limit_bytes),
            # FSDP-offload's state in the fullest node's host memory, and its limit
            **(
                {
                    "host_memory_bytes": float(ev.host_node_bytes),
                    "host_memory_limit_bytes": float(t.host_limit_bytes),
                }
                if t.uses_host_memory
                else {}
            ),
            **predicted_breakdown(t, stage_of, strategy_of),
            # for the training log's MFU: model FLOPs (forward + backward) and the device peak
            "model_flops_per_sample": float(
                sum(x.fwd_flops_per_sample + x.bwd_flops_per_sample for x in graph.layers)
            ),
            "peak_flops_per_s": float(cluster.peak_flops_per_s.get(graph.dtype, 0.0)),
        },
        provenance={
            "uniap": __version__,
            "torch": torch.__version__.split("+")[0],
            "highspy": highs_version,
            "cluster": cluster.name,
            "profile": cm.profile.source,
            "dtype": graph.dtype,
        },
    )
