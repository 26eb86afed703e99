"""Intra-layer strategies: how one layer uses the ``g`` devices of its pipeline stage.

A strategy ``k = (dp, tp, kind, recompute)`` splits the stage's ``g`` ranks into ``dp`` data-parallel
groups of ``tp`` consecutive tensor-parallel ranks (``dp * tp = g``); ``kind`` says whether the
parameters are replicated over the data-parallel group (``DDP``) or sharded over it (``FSDP``).
A layer gets ``tp > 1`` only when :meth:`uniap.graph.Layer.supports_tp` says so (the executor
asks the same question), and a strategy is offered only if its ``dp`` splits the micro-batch.
FSDP with ``dp = 1`` is the same as DDP and is not offered twice. ``recompute`` is activation
checkpointing of the layer (torch.utils.checkpoint): less memory, one more forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from uniap.graph import Layer

__all__ = ["Strategy", "stage_strategies", "layer_strategies", "divisors", "uses_classic_ddp"]

DDP_BUCKET_BYTES = 25 * 2**20
"""Bucket size of classic DDP's gradient all-reduce (``bucket_cap_mb``, torch's default)."""


def uses_classic_ddp(kind: str, dp: int, tp: int) -> bool:
    """Whether the executor synchronises a layer with the stage's classic
    ``DistributedDataParallel`` wrapper (bucketed all-reduce, plain-tensor parameters): DDP
    over the whole stage (``tp == 1``). DDP with ``tp > 1`` uses FSDP2's ``replicate`` per
    layer. One rule for the cost model and the executor."""
    return kind == "DDP" and dp > 1 and tp == 1


@dataclass(frozen=True, order=True)
class Strategy:
    """One intra-layer strategy for a stage of ``dp * tp`` devices."""

    dp: int
    """Data-parallel degree."""
    tp: int
    """Tensor-parallel degree (consecutive ranks)."""
    kind: str
    """``DDP`` or ``FSDP``."""
    recompute: bool = False
    """Activation checkpointing: keep the layer's input only, recompute forward in backward."""

    def __str__(self) -> str:
        return f"dp{self.dp}xtp{self.tp}-{self.kind}" + ("-ckpt" if self.recompute else "")

    @property
    def classic_ddp(self) -> bool:
        """Synchronised by the stage's classic DDP wrapper (see :func:`uses_classic_ddp`)."""
        return uses_classic_ddp(self.kind, self.dp, self.tp)

    @property
    def dtensor_params(self) -> bool:
        """Whether the executor holds the layer's parameters as DTensors (TP shards, FSDP2
        shards, ``replicate``), so that the optimizer pays DTensor dispatch per tensor."""
        return self.tp > 1 or (self.dp > 1 and not self.classic_ddp)


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


def stage_strategies(stage_size: int, *, max_tp: int | None = None, recompute: bool = True) -> list[Strategy]:
    """Every strategy for a stage of ``stage_size`` devices, in a fixed order (tp ascending,
    then DDP before FSDP, then without before with recompute). ``max_tp`` caps the TP degree
    (e.g. devices per node); ``recompute`` offers activation checkpointing."""
    out = []
    for tp in divisors(stage_size):
        if max_tp is not None and tp > max_tp:
            continue
        dp = stage_size // tp
        for kind in ("DDP", "FSDP") if dp > 1 else ("DDP",):
            out.append(Strategy(dp, tp, kind))
            if recompute:
                out.append(Strategy(dp, tp, kind, True))
    return out


def layer_strategies(layer: Layer, strategies: list[Strategy], microbatch_size: int,
                     input_bytes_per_sample: float = 0.0) -> list[int]:
    """Indices into ``strategies`` that ``layer`` may use at this micro-batch size (those for
    which :func:`why_not` has no objection)."""
    return [k for k, s in enumerate(strategies) if why_not(layer, s, microbatch_size, input_bytes_per_sample) is None]


def why_not(layer: Layer, strategy: Strategy, microbatch_size: int, input_bytes_per_sample: float = 0.0) -> str | None:
    """Why ``layer`` may not use ``strategy`` (one of its stage's strategies) at this micro-batch
    size, or None when it may. The rules:

    - TP degree > 1 only on a layer with a tensor-parallel plan that this degree divides;
    - the micro-batch splits evenly over the data-parallel degree;
    - recompute only where it saves memory: the layer keeps more for backward than twice its
      input (which checkpointing keeps instead)."""
    if not layer.supports_tp(strategy.tp):
        reason = layer.tp_excluded_reason or "it has no tensor-parallel plan for this degree"
        return f"tensor parallelism of degree {strategy.tp} is not possible: {reason}"
    if microbatch_size % strategy.dp:
        return f"the micro-batch of {microbatch_size} samples does not split over dp = {strategy.dp}"
    if strategy.recompute and not layer.saved_bytes_per_sample > 2 * input_bytes_per_sample:
        return ("recompute saves no memory here: the layer keeps no more for backward than twice its "
                "input, which checkpointing would keep instead")
    return None
