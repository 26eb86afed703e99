"""The intra-layer strategy space: every :class:`~uniap.contract.Strategy` a layer may use on
the ``g`` devices of its pipeline stage (the value itself belongs to the Plan contract).

A strategy ``k = (dp, tp, kind, recompute)`` splits the stage's ``g`` ranks into ``dp``
data-parallel groups of ``tp`` consecutive tensor-parallel ranks (``dp * tp = g``); ``kind`` says
whether the parameters are replicated over the data-parallel group (``DDP``), sharded over it
(``FSDP``), or whole during the iteration with their gradients and optimizer state sharded
(``ZeRO2``), or sharded over groups of ``shard_degree`` ranks and replicated across them
(``HSDP``, ``tp == 1``, shard groups within a node). A layer gets ``tp > 1`` only when
:meth:`uniap.graph.Layer.supports_tp` says so (the executor asks the same question), and a
strategy is offered only if its ``dp`` splits the micro-batch. FSDP, ZeRO2 and HSDP with
``dp = 1`` are the same as DDP and are not offered.
``FSDP-offload`` (``tp == 1``) is FSDP with the shards, their gradients and the optimizer state
in host memory, offered only when the cluster declares host memory (see
:mod:`uniap.cost_model`); also at ``dp == 1`` (a stage of one device: the whole state on the
host, as ZeRO-Offload on one GPU).
``recompute`` is activation checkpointing of the layer (torch.utils.checkpoint): less memory,
one more forward.
``sp`` (``tp > 1``) is Megatron sequence parallelism inside the layer: the norms and the other
ops between its TP pairs run on ``1 / tp`` of the sequence, at the price of two all-gathers at
the layer's boundary (:mod:`uniap.executor.sequence_parallel`). Offered only when asked
(``sequence_parallel=True``) and only on layers where :meth:`uniap.graph.Layer.supports_sp`
says yes. Off by default: every SP variant is a TP strategy with more communication (the
boundary gathers) and less activation memory, so it can only win where memory binds, and it
doubles the ``tp > 1`` strategies the program chooses from (its size and solve time grow with
them); a user short of memory at ``tp > 1`` turns it on (``uniap plan --sequence-parallel``).
"""

from __future__ import annotations

from collections.abc import Sequence

from uniap.contract import KINDS, OFFLOAD, Strategy
from uniap.graph import Layer

__all__ = ["divisors", "layer_strategies", "stage_strategies"]


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n`` in increasing order."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def stage_strategies(
    stage_size: int,
    *,
    max_tp: int | None = None,
    recompute: bool = True,
    kinds: Sequence[str] = KINDS,
    max_shard: int | None = None,
    sequence_parallel: bool = False,
) -> list[Strategy]:
    """Every strategy for a stage of ``stage_size`` devices, in a fixed order (tp ascending,
    then DDP, FSDP, ZeRO2, HSDP, FSDP-offload, then without before with recompute, then
    without before with sp). ``sequence_parallel`` offers an sp variant of every ``tp > 1``
    strategy.
    ``max_tp`` caps the TP degree (e.g. devices per node); ``recompute`` offers activation
    checkpointing; ``kinds`` the data-parallel kinds for ``dp > 1`` (``dp == 1`` is ``DDP``,
    and ``FSDP-offload`` where ``kinds`` has it); ``max_shard`` caps HSDP's shard group (e.g.
    devices per node). FSDP-offload is offered with ``tp == 1`` only."""
    out = []
    for tp in divisors(stage_size):
        if max_tp is not None and tp > max_tp:
            continue
        dp = stage_size // tp
        at_one = ["DDP", OFFLOAD] if OFFLOAD in kinds else ["DDP"]
        for kind in [k for k in KINDS if k in kinds] if dp > 1 else at_one:
            # HSDP: every shard group size strictly between 1 and dp, at most max_shard
            # (intra-node), tp = 1
            shards = [0]
            if kind == OFFLOAD and tp > 1:
                continue
            if kind == "HSDP":
                cap = max_shard if max_shard is not None else dp
                shards = [s for s in divisors(dp)[1:-1] if s <= cap] if tp == 1 else []
            sps = (False, True) if sequence_parallel and tp > 1 else (False,)
            for sh in shards:
                for rc in (False, True) if recompute else (False,):
                    for sp in sps:
                        out.append(Strategy(dp, tp, kind, rc, sh, sp))
    return out


def layer_strategies(
    layer: Layer,
    strategies: list[Strategy],
    microbatch_size: int,
    input_bytes_per_sample: float = 0.0,
) -> list[int]:
    """Indices into ``strategies`` that ``layer`` may use at this micro-batch size (those for
    which :func:`why_not` has no objection)."""
    return [
        k
        for k, s in enumerate(strategies)
        if why_not(layer, s, microbatch_size, input_bytes_per_sample) is None
    ]


def why_not(
    layer: Layer, strategy: Strategy, microbatch_size: int, input_bytes_per_sample: float = 0.0
) -> str | None:
    """Why ``layer`` may not use ``strategy`` (one of its stage's strategies) at this micro-batch
    size, or None when it may. The rules:

    - TP degree > 1 only on a layer with a tensor-parallel plan that this degree divides;
    - sequence parallelism only where :meth:`uniap.graph.Layer.sp_why_not` has no objection;
    - the micro-batch splits evenly over the data-parallel degree;
    - recompute only where it saves memory: the layer keeps more for backward than twice its
      input (which checkpointing keeps instead)."""
    reason = layer.why_not_tp(strategy.tp)
    if reason is not None:
        return f"tensor parallelism of degree {strategy.tp} is not possible: {reason}"
    if strategy.sp:
        reason = layer.sp_why_not(strategy.tp)
        if reason is not None:
            return f"sequence parallelism is not possible: {reason}"
    if microbatch_size % strategy.dp:
        return (
            f"the micro-batch of {microbatch_size} samples does not split over dp = {strategy.dp}"
        )
    if strategy.recompute and not layer.saved_bytes_per_sample > 2 * input_bytes_per_sample:
        return (
            "recompute saves no memory here: the layer keeps no more for backward than twice its "
            "input, which checkpointing would keep instead"
        )
    return None
