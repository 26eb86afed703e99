"""Pipeline schedules: one spec per schedule, the one place that says what a schedule is.

Read by the Plan contract (valid names), the CLI (``--schedule`` choices), the cost model
(activations in flight per stage, the time formula) and the executor (the
``torch.distributed.pipelining`` class). Adding a schedule means adding a spec here and, when
torch's class needs adapting, its class in :mod:`uniap.executor.pipeline_parallel`.

GPipe and 1F1B run ``c`` micro-batches through ``pp`` stages with one stage per rank, and the
cost model charges them the same time per iteration (see :mod:`uniap.cost_model`):
``sum_i p_i + sum_i o_i + (c - 1) * max_i max(p_i, o_i) + max_i s_i``; with equal stages a
fraction ``(pp - 1) / (c + pp - 1)`` of it is pipeline bubble. They differ in memory: GPipe
runs every forward before any backward, so stage ``i`` holds the activations of all ``c``
micro-batches; 1F1B starts backward as soon as it can, so stage ``i`` holds at most
``min(c, pp - i)``. Without pipelining (``pp == 1``) micro-batches run one after the other
(gradient accumulation): one in flight.

Interleaved 1F1B (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", SC 2021, section 2.2.2; torch's ``ScheduleInterleaved1F1B``)
splits the chain into ``pp * v`` virtual stages, virtual stage ``j`` on rank ``j % pp`` (rank
``r`` holds ``r, r + pp, ..., r + (v - 1) pp``: the looped placement torch expects). A rank
does the same work per micro-batch, but the pipeline fills and drains in chunks ``v`` times
smaller: the bubble is ``(pp - 1) / v`` chunk times instead of ``pp - 1`` stage times, a
fraction ``(pp - 1) / (v c)`` of the ideal time ``c P`` (the paper's ``t_pb / t_id``), with
equal chunks. With unequal ones there is no closed form (one over each rank's summed chunks
is optimistic: a rank waits on its neighbours chunk by chunk): the cost model takes the
longest path through torch's order of operations (:func:`interleaved_order`,
:func:`schedule_makespan`). The paper's schedule needs ``c`` to be a multiple of ``pp``
(torch relaxes it; the planner keeps the paper's rule). In-flight activations are counted
from torch's own order of operations (:func:`_interleaved_inflight`, which a unit test
compares with torch's schedule): rank
``r`` runs ``W_r = min((v - 1) pp + 2 (pp - 1 - r), v c)`` warm-up forwards
(``torch.distributed.pipelining.schedules._get_warmup_ops`` with ``c`` a multiple of ``pp``:
``pp`` micro-batches per round), then one forward and one backward per step; forwards go
through the rank's chunks ``pp`` micro-batches at a time in increasing order, backwards in
decreasing order. Virtual stage ``j`` is charged the most micro-batches it ever holds at once
over the iteration: summed over a rank's chunks this is an upper bound on the rank's peak
(the chunks need not peak together).

Interleaved zero bubble (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024; torch's
``ScheduleInterleavedZeroBubble``, torch/distributed/pipelining/schedules.py, the paper's ZB-H1
order over ``v`` looped chunks) splits each backward into the input gradient B
(``stage_backward_input``, sent to the previous stage at once) and the weight gradient W
(``stage_backward_weight``, run later: torch/distributed/pipelining/_backward.py) and fills the
bubble with the W's. The same looped placement as interleaved 1F1B, ``c`` a multiple of
``pp``. Both interleaved schedules are planned at ``v = 2``
(:attr:`ScheduleSpec.stages_per_rank`) unless the planner is given others
(``virtual_stages``, ``--virtual-stages``); the orders and in-flight counts below hold for any
``v`` (tests compare them with torch's for v = 2-4). Its order of operations
(:func:`zero_bubble_order`, a unit test compares it with torch's ``pipeline_order``): rank
``r`` runs ``min((v - 1) pp + pp - 1 - r, v c)`` warm-up forwards, then F + B pairs, each
followed by the W of the oldest pending B once ``r`` pairs have run, then the remaining B's
(each with a W) and the remaining W's. Time: not a closed
form. The cost model takes the longest path through these operations
(:func:`schedule_makespan`: every operation starts when its rank is free and its input has
arrived; per stage the forward, input-gradient and weight-gradient times of one micro-batch, a
link's time half forward, half back), at least ``c`` times the busiest rank's link time; the
program writes the same longest path as difference constraints (linear, exact:
:mod:`uniap.milp`). With equal stages and ``F = B = W`` it is
``c v (F + B + W) + (pp - 1) (F + B - W)`` with ``F``, ``B``, ``W`` per virtual stage (the
paper's ZB-H1 bubble), a bubble fraction ``(pp - 1) / (3 v c + pp - 1)`` against interleaved
1F1B's ``(pp - 1) / (v c + pp - 1)`` (a unit test checks it against an independent
simulation). In-flight activations
(:func:`_zero_bubble_inflight`): a micro-batch's activations stay from its forward to its
weight gradient (B retains the autograd graph for W; B frees nothing), counted in torch's order
like interleaved 1F1B's; the input-gradient intermediates that B keeps for W (one gradient per
parameter product's output) are not charged. Layers run without recompute and without the
wrappers that reduce in autograd's backward hooks (:attr:`ScheduleSpec.data_parallel`,
:attr:`ScheduleSpec.recompute`): ``dp = 1``; plain replicas (kind DDP, ``tp = 1``) whose
gradients are summed after the step, the all-reduce exposed; or FSDP at ``tp = 1`` run the way
torch's schedule runs an FSDP2 stage (:attr:`ScheduleSpec.after_step_kinds`): every backward
with gradient sync and resharding off, the parameters gathered from the first forward
(``reshard_after_forward=False``), the gradients accumulated whole, and one reduce-scatter per
layer after the stage's last weight gradient (torch's ``REDUCE_GRAD`` action,
``PipelineStage.perform_reduce_grad``), exposed. With ``reshard_after_forward=True`` the same
run on torch 2.13 (CPU, gloo, pp = 2 x dp = 2) gave wrong gradients on one lane and none on the
other; the executor's FSDP layers keep their parameters gathered whenever ``c > 1``, which zero
bubble always has (``c`` a multiple of ``pp``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from uniap.errors import ConfigError

__all__ = [
    "SCHEDULES",
    "ScheduleSpec",
    "get_schedule",
    "inflight_microbatches",
    "interleaved_order",
    "schedule_dag",
    "schedule_ends",
    "schedule_makespan",
    "zero_bubble_order",
]


@dataclass(frozen=True)
class ScheduleSpec:
    """What one pipeline schedule means to the planner and the executor."""

    name: str
    """The name in plans and on the command line."""
    torch_class: str
    """The ``torch.distributed.pipelining`` schedule class the executor runs."""
    stages_per_rank: tuple[int, ...]
    """The numbers of pipeline stages per rank (``v``) the planner tries (1: one stage per
    rank; interleaved schedules: virtual stages)."""
    inflight_on_stage: Callable[[int, int, int, int], int]
    """``(stage, pp, v, num_microbatches) -> micro-batches`` whose activations virtual stage
    ``stage`` (of ``pp * v``) holds at once when ``pp > 1``."""
    description: str
    """One line for help texts."""
    microbatch_multiple_of_pp: bool = False
    """The schedule needs ``c`` to be a multiple of ``pp``."""
    data_parallel: bool = True
    """Layers may use DDP and FSDP wrappers as under the other schedules (reducing in the last
    micro-batch's backward, overlapped with it). False for zero bubble: torch runs the weight
    gradients outside autograd's backward hooks, which DDP and FSDP reduce in
    (pytorch/pytorch#144530: with DDP the gradients come out unreduced; FSDP's reduction in
    the hooks runs before they exist); see :attr:`after_step_kinds` for what runs instead."""
    after_step_kinds: tuple[str, ...] = ()
    """Without the wrappers, the kinds a layer may still have at ``dp > 1`` and ``tp == 1``,
    its gradients reduced once the stage's last weight gradient is done, the reduction charged
    whole, hidden behind nothing: ``DDP`` as plain replicas, summed over the layer's dp group
    by :class:`uniap.executor.model_forward.FreeParamSync`; ``FSDP`` as torch's schedule runs
    an FSDP2 stage (parameters and gradients whole through the iteration, one reduce-scatter
    per layer by torch's ``REDUCE_GRAD`` action)."""
    recompute: bool = True
    """Layers may use activation checkpointing. False for zero bubble: a checkpointed layer
    fails in torch's split backward (torch 2.13: the schedule raises while running it)."""
    split_backward: bool = False
    """Each backward runs as an input gradient (B) and, later, a weight gradient (W) (zero
    bubble)."""
    order: Callable[[int, int, int, int], list[tuple[str, int, int]]] | None = None
    """``(pp, v, num_microbatches, rank) -> [(kind, micro-batch, stage)]``: torch's order of
    operations on a rank, for the schedules timed by the longest path through it
    (:func:`schedule_makespan`) instead of a formula: the interleaved ones, whose chunks may
    differ (a closed form over a rank's summed chunks is optimistic there)."""

    @property
    def longest_path(self) -> bool:
        """The schedule's time is the longest path through its :attr:`order`."""
        return self.order is not None

    @property
    def interleaved(self) -> bool:
        """Several (virtual) stages per rank."""
        return max(self.stages_per_rank) > 1

    def runs_data_parallel(self, dp: int, tp: int, kind: str) -> bool:
        """Whether this schedule runs a layer at ``(dp, tp, kind)`` as far as its gradient
        reduction goes (the cost model offers, the executor accepts exactly these): any with
        the DDP / FSDP wrappers; without them ``dp == 1`` (but FSDP-offload, whose host copies
        FSDP2 makes in the backward hooks too), or one of :attr:`after_step_kinds` at ``tp ==
        1``."""
        if self.data_parallel or (dp == 1 and kind != "FSDP-offload"):
            return True
        return kind in self.after_step_kinds and tp == 1

    def inflight(self, stage: int, num_stages: int, num_microbatches: int, v: int = 1) -> int:
        """Micro-batches whose activations ``stage`` holds at once (1 without pipelining);
        ``num_stages`` is the pipeline degree ``pp`` (ranks), ``v`` the stages per rank."""
        if num_stages == 1:
            return 1
        return self.inflight_on_stage(stage, num_stages, v, num_microbatches)

    def why_not(self, pp: int, v: int, num_microbatches: int) -> str | None:
        """Why this schedule cannot run ``c`` micro-batches on ``pp`` ranks with ``v`` stages
        each, or None."""
        if v not in self.stages_per_rank and not (self.interleaved and v > 1):
            return f"{self.name} runs {self.stages_per_rank} stage(s) per rank, not {v}"
        if self.microbatch_multiple_of_pp and pp > 1 and num_microbatches % pp:
            return (
                f"{self.name} needs the number of micro-batches ({num_microbatches}) to be a "
                f"multiple of the pipeline degree ({pp})"
            )
        return None

    @staticmethod
    def bubble_fraction(num_stages: int, num_microbatches: int, v: int = 1) -> float:
        """Idle fraction of an iteration with equal stages: ``(pp - 1) / (c + pp - 1)``,
        interleaved ``(pp - 1) / (v c + pp - 1)`` (the paper's ``(pp - 1) / (v c)`` of the
        ideal time)."""
        return (num_stages - 1) / (v * num_microbatches + num_stages - 1)


def _all_microbatches(stage: int, pp: int, v: int, num_microbatches: int) -> int:
    return num_microbatches


def _until_first_backward(stage: int, pp: int, v: int, num_microbatches: int) -> int:
    return min(num_microbatches, pp - stage)


def _interleaved_inflight(stage: int, pp: int, v: int, num_microbatches: int) -> int:
    """The most micro-batches virtual stage ``stage`` holds at once under torch's interleaved
    1F1B order of operations (see the module docstring)."""
    return _interleaved_peaks(pp, v, num_microbatches)[stage]


def interleaved_order(
    pp: int, v: int, num_microbatches: int, rank: int
) -> list[tuple[str, int, int]]:
    """Rank ``rank``'s operations in torch's interleaved 1F1B order, as ``(kind, micro-batch,
    stage)`` with kind ``F`` or ``B``: warm-up forwards, then forward + backward pairs, then
    the remaining backwards; forward ``n`` runs the rank's chunk ``(n // per_round) % v``,
    backward ``n`` the chunk ``v - 1 - (n // per_round) % v`` (see the module docstring)."""
    c = num_microbatches
    per_round = c // max(1, c // pp)
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - rank), c * v)
    kinds = ["F"] * warmup + ["F", "B"] * (c * v - warmup) + ["B"] * warmup
    num = {"F": 0, "B": 0}
    seen: dict[tuple[str, int], int] = {}
    out = []
    for kind in kinds:
        q = (num[kind] // per_round) % v
        num[kind] += 1
        stage = (q if kind == "F" else v - 1 - q) * pp + rank
        m = seen.get((kind, stage), 0)
        seen[kind, stage] = m + 1
        out.append((kind, m, stage))
    return out


@lru_cache(maxsize=256)
def _interleaved_peaks(pp: int, v: int, c: int) -> tuple[int, ...]:
    peaks = [0] * (pp * v)
    for r in range(pp):
        alive = [0] * (pp * v)
        for kind, _, j in interleaved_order(pp, v, c, r):
            alive[j] += 1 if kind == "F" else -1
            peaks[j] = max(peaks[j], alive[j])
        assert not any(alive), alive
    return tuple(peaks)


def zero_bubble_order(
    pp: int, v: int, num_microbatches: int, rank: int
) -> list[tuple[str, int, int]]:
    """Rank ``rank``'s operations in the order of torch's ``ScheduleInterleavedZeroBubble``,
    as ``(kind, micro-batch, stage)`` with kind ``F`` (forward), ``B`` (input gradient) or
    ``W`` (weight gradient): ``min((v - 1) m + pp - 1 - rank, v c)`` warm-up forwards (``m``
    micro-batches per round), then forward + input-gradient pairs, each followed by the
    weight gradient of the oldest pending backward once ``rank`` pairs have run, then the
    remaining input gradients (each with a weight gradient) and the remaining weight gradients
    (``torch.distributed.pipelining.schedules._get_1f1b_rank_ops`` with
    ``enable_zero_bubble=True``; chunks as in :func:`interleaved_order`)."""
    c = num_microbatches
    per_round = c // max(1, c // pp)
    warmup = min((v - 1) * per_round + pp - 1 - rank, c * v)
    seen: dict[tuple[str, int], int] = {}
    out: list[tuple[str, int, int]] = []

    def add(kind: str, stage: int) -> None:
        m = seen.get((kind, stage), 0)
        seen[kind, stage] = m + 1
        out.append((kind, m, stage))

    def forward_stage(step: int) -> int:
        return ((step // per_round) % v) * pp + rank

    def backward_stage(step: int) -> int:
        return (v - 1 - ((step - warmup) // per_round) % v) * pp + rank

    backward_steps: list[int] = []
    num_weight = 0
    for step in range(c * v + warmup):
        if step < c * v:
            add("F", forward_stage(step))
        if step < warmup:
            continue
        add("B", backward_stage(step))
        backward_steps.append(step)
        if step - warmup >= rank:
            add("W", backward_stage(backward_steps[num_weight]))
            num_weight += 1
    for step in backward_steps[num_weight:]:
        add("W", backward_stage(step))
    return out


@lru_cache(maxsize=64)
def schedule_dag(
    schedule: str, pp: int, v: int, num_microbatches: int
) -> tuple[tuple[int, ...], ...]:
    """Every operation of ``schedule``'s order (:attr:`ScheduleSpec.order`) on all ranks, in an
    order where each comes after what it waits for, as ``(kind, stage, rank_prev, dep,
    link)``: ``kind`` 0/1/2 for F/B/W, ``rank_prev`` the index of the rank's previous operation
    (-1 for its first), ``dep`` the index of the operation on another stage whose output it
    needs (F: the same micro-batch's forward on ``stage - 1``; B: its (input) gradient on
    ``stage + 1``, on the last stage its own forward; -1: none) and ``link`` the stage boundary
    that output crosses (-1: none). A rank's W follows its B in the rank's order, which is its
    only dependency."""
    order = get_schedule(schedule).order
    if order is None:
        raise ValueError(f"schedule {schedule!r} is timed by a formula, not by its order")
    S = pp * v
    orders = [order(pp, v, num_microbatches, r) for r in range(pp)]
    kinds = {"F": 0, "B": 1, "W": 2}
    index: dict[tuple[str, int, int], int] = {}
    out: list[tuple[int, ...]] = []
    pos, last = [0] * pp, [-1] * pp
    while len(out) < sum(map(len, orders)):
        moved = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                kind, m, j = orders[r][pos[r]]
                if kind == "F":
                    need, link = (("F", m, j - 1), j - 1) if j > 0 else (None, -1)
                elif kind == "B":
                    need, link = (("B", m, j + 1), j) if j < S - 1 else (("F", m, j), -1)
                else:
                    need, link = None, -1
                if need is not None and need not in index:
                    break  # waits for another rank
                index[kind, m, j] = len(out)
                out.append((kinds[kind], j, last[r], index[need] if need else -1, link))
                last[r] = len(out) - 1
                pos[r] += 1
                moved = True
        assert moved, f"torch's {schedule} order deadlocks"  # cannot happen: tested
    return tuple(out)


def schedule_makespan(
    schedule: str,
    pp: int,
    v: int,
    num_microbatches: int,
    f: Sequence[float],
    b: Sequence[float],
    w: Sequence[float],
    link: Sequence[float] = (),
) -> float:
    """Seconds from the first forward to the last operation when every operation of
    :func:`schedule_dag` starts as soon as its rank is free and its input has arrived: ``f``,
    ``b``, ``w`` per stage (forward, input gradient, weight gradient of one micro-batch;
    without a split backward ``b`` is the whole backward and ``w`` is not used), ``link[j]``
    the time of the activation's trip over boundary ``j`` and its gradient's trip back
    together (half each way). The longest path through the operations."""
    return max(schedule_ends(schedule, pp, v, num_microbatches, f, b, w, link))


def schedule_ends(
    schedule: str,
    pp: int,
    v: int,
    num_microbatches: int,
    f: Sequence[float],
    b: Sequence[float],
    w: Sequence[float],
    link: Sequence[float] = (),
) -> list[float]:
    """The end time of each operation of :func:`schedule_dag` (see
    :func:`schedule_makespan`)."""
    dur = (f, b, w)
    end: list[float] = []
    for kind, j, prev, dep, edge in schedule_dag(schedule, pp, v, num_microbatches):
        ready = end[prev] if prev >= 0 else 0.0
        if dep >= 0:
            ready = max(ready, end[dep] + (link[edge] / 2 if edge >= 0 and link else 0.0))
        end.append(ready + dur[kind][j])
    return end


def _zero_bubble_inflight(stage: int, pp: int, v: int, num_microbatches: int) -> int:
    """The most micro-batches virtual stage ``stage`` holds at once in torch's zero-bubble
    order, each from its forward to its weight gradient (see the module docstring)."""
    return _zero_bubble_peaks(pp, v, num_microbatches)[stage]


@lru_cache(maxsize=256)
def _zero_bubble_peaks(pp: int, v: int, c: int) -> tuple[int, ...]:
    peaks = [0] * (pp * v)
    for r in range(pp):
        alive = [0] * (pp * v)
        for kind, _, j in zero_bubble_order(pp, v, c, r):
            alive[j] += {"F": 1, "B": 0, "W": -1}[kind]
            peaks[j] = max(peaks[j], alive[j])
        assert not any(alive), alive
    return tuple(peaks)


SCHEDULES: dict[str, ScheduleSpec] = {
    s.name: s
    for s in (
        ScheduleSpec(
            name="GPipe",
            torch_class="ScheduleGPipe",
            stages_per_rank=(1,),
            inflight_on_stage=_all_microbatches,
            description="all forwards, then all backwards: every micro-batch in flight",
        ),
        ScheduleSpec(
            name="1F1B",
            torch_class="Schedule1F1B",
            stages_per_rank=(1,),
            inflight_on_stage=_until_first_backward,
            description="one forward, one backward: stage i holds min(c, pp - i) micro-batches",
        ),
        ScheduleSpec(
            name="Interleaved1F1B",
            torch_class="ScheduleInterleaved1F1B",
            stages_per_rank=(2,),
            inflight_on_stage=_interleaved_inflight,
            description="1F1B over v virtual stages per rank (looped): bubble (pp - 1) / (v c)",
            microbatch_multiple_of_pp=True,
            order=interleaved_order,
        ),
        ScheduleSpec(
            name="InterleavedZeroBubble",
            torch_class="ScheduleInterleavedZeroBubble",
            stages_per_rank=(2,),
            inflight_on_stage=_zero_bubble_inflight,
            description="interleaved 1F1B with each backward split into input and weight "
            "gradients, the weight gradients filling the bubble",
            microbatch_multiple_of_pp=True,
            data_parallel=False,
            after_step_kinds=("DDP", "FSDP"),
            recompute=False,
            split_backward=True,
            order=zero_bubble_order,
        ),
    )
}
"""Every schedule by name, in the order plans list them."""


def get_schedule(name: str) -> ScheduleSpec:
    """The spec of schedule ``name``; an unknown name raises a ConfigError listing them."""
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"schedule {name!r} is not one of {list(SCHEDULES)}") from None


def inflight_microbatches(
    schedule: str, stage: int, num_stages: int, num_microbatches: int, v: int = 1
) -> int:
    """Micro-batches whose activations ``stage`` (a virtual stage of ``num_stages * v`` when
    ``v > 1``) holds at once under ``schedule`` on ``num_stages`` ranks (see the module
    docstring)."""
    return get_schedule(schedule).inflight(stage, num_stages, num_microbatches, v)
