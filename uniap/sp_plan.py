"""Sequence-parallel plan of a layer: where Megatron-SP can run it, found from its meta trace.

Sequence parallelism (:mod:`uniap.executor.sequence_parallel`) shards the layer's residual
stream along the sequence dimension between its tensor-parallel pairs and gathers it at the
entry of each pair's *region*, the smallest submodule holding the pair's Linears (``attn``,
``mlp``). A layer gets an SP plan when all of these hold (else ``excluded_reason`` says which
does not):

- it has a TP plan (:mod:`uniap.tp_pairs`);
- its first input is ``(batch, sequence, features)``: the sequence dimension is dimension 1,
  the one dimension between the batch and the features; when the layer runs attention, its
  query length must be that dimension's size (found, not assumed from names);
- every pair lies in a proper submodule of the layer, regions are distinct and not nested,
  and a region holds no parameters besides its pair's Linears (a post-norm residual inside
  the region would mix the gathered input with the sharded output; a parameter-free one is
  not seen here, and fails at run time: DTensor refuses to add a plain and a sharded tensor);
- each pair's column-wise Linears read one tensor of the input's shape and its row-wise
  Linear returns one (self-attention, MLP; cross-attention reads a second, replicated tensor
  and is left out);
- outside the pairs' spans (from a pair's first column-wise Linear to its row-wise Linear's
  return) every call on a tensor led by the input's batch and sequence dimensions acts on
  each position apart (elementwise ops, norms and reductions over later dimensions, Linears,
  reshapes that keep the two: :func:`uniap.tracing.mixes_positions`, conservative). A call
  that mixes positions there (a causal convolution or a cumulative sum over the sequence, a
  shift of the sequence) would make DTensor gather the sharded sequence, which neither the
  executor's communication plan nor the cost model has.

``replicated_param_bytes``: the parameters outside the regions (norm weights and biases), one
entry per tensor: SP computes their gradients on sequence chunks and sums them over the TP
group (one all-reduce each).

``saved_fraction``: the part of the layer's saved-for-backward bytes saved outside every
pair's span (from its first column-wise Linear's call to its row-wise Linear's return), i.e.
by the norms and other ops of the residual stream; SP runs those on ``1 / tp`` of the
sequence. The sequence length must be divisible by the TP degree
(:meth:`uniap.graph.Layer.sp_why_not`; the executor checks the real input too).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from uniap.tp_pairs import TPPlan
from uniap.tracing import LayerTrace

__all__ = ["SPPlan", "sp_plan"]


@dataclass(frozen=True)
class SPPlan:
    """What :func:`sp_plan` found (see :class:`uniap.graph.Layer`'s ``sp_*`` fields)."""

    seq_dim: int = 0
    seq_len: int = 0
    regions: tuple[str, ...] = ()
    saved_fraction: float = 0.0
    excluded_reason: str = ""
    replicated_param_bytes: tuple[float, ...] = ()


def _parent(fqn: str) -> list[str]:
    return fqn.split(".")[:-1]


def sp_plan(layer: nn.Module, trace: LayerTrace, tp: TPPlan) -> SPPlan:
    """The sequence-parallel plan of ``layer`` from its trace and TP plan (module docstring)."""
    if not tp.pairs:
        why = (
            "its tensor parallelism is vocabulary-parallel, which has no sequence-parallel plan"
            if tp.vocab is not None
            else "it has no Megatron column-/row-wise pairs"
        )
        return SPPlan(excluded_reason=why)
    shape = tuple(trace.input_shape)
    if len(shape) != 3:
        return SPPlan(
            excluded_reason=f"its input has shape {list(shape)}, not (batch, sequence, features)"
        )
    seq_dim, seq_len = 1, shape[1]
    if trace.attention_lengths and trace.attention_lengths != {seq_len}:
        return SPPlan(
            excluded_reason=f"its attention runs over {sorted(trace.attention_lengths)} "
            f"positions, not the {seq_len} of dimension 1 of its input"
        )
    calls = {c.fqn: c for c in trace.linears}
    regions: list[str] = []
    for pair in tp.pairs:
        names = [*pair.colwise, pair.rowwise]
        common: list[str] = []
        for parts in zip(*(_parent(n) for n in names)):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        region = ".".join(common)
        if not region:
            return SPPlan(
                excluded_reason=f"the Linears {names} are not inside one submodule of the layer "
                "(no region whose input could be gathered)"
            )
        inputs = {id(calls[c].input) for c in pair.colwise}
        col_shapes = {tuple(calls[c].input.shape) for c in pair.colwise}
        out = calls[pair.rowwise].output
        if len(inputs) != 1 or col_shapes != {shape} or out is None or tuple(out.shape) != shape:
            return SPPlan(
                excluded_reason=f"the pair {names} does not read and return one tensor of the "
                f"input's shape {list(shape)} (cross-attention or a reshaped stream)"
            )
        module = layer.get_submodule(region)
        pair_params = {id(p) for n in names for p in layer.get_submodule(n).parameters()}
        extra = sorted(name for name, p in module.named_parameters() if id(p) not in pair_params)
        if extra:
            return SPPlan(
                excluded_reason=f"region {region!r} holds parameters besides its Linear pair "
                f"({', '.join(extra[:3])}): ops after the pair inside it would mix whole and "
                "sequence-sharded tensors"
            )
        regions.append(region)
    for a in regions:
        for b in regions:
            if a == b and regions.count(a) > 1 or b.startswith(a + "."):
                return SPPlan(excluded_reason=f"regions {a!r} and {b!r} overlap")
    spans = [
        (
            min(calls[c].start_event for c in pair.colwise),
            calls[pair.rowwise].end_event,
        )
        for pair in tp.pairs
    ]
    for event, name in trace.position_mixing:
        if not any(lo <= event <= hi for lo, hi in spans):
            return SPPlan(
                excluded_reason=f"its call {name!r} outside the regions {regions} may mix the "
                "positions of dimension 1, which sequence parallelism shards there (DTensor "
                "would gather them: communication the cost model does not charge)"
            )
    total = sum(nbytes for nbytes, _ in trace.saved.values())
    outside = sum(
        nbytes
        for nbytes, event in trace.saved.values()
        if not any(lo <= event <= hi for lo, hi in spans)
    )
    inside = {id(m) for r in regions for m in layer.get_submodule(r).modules()}
    replicated = tuple(
        float(p.numel() * p.element_size())
        for m in layer.modules()
        if id(m) not in inside
        for p in m.parameters(recurse=False)
        if p.requires_grad
    )
    return SPPlan(
        seq_dim=seq_dim,
        seq_len=seq_len,
        regions=tuple(regions),
        saved_fraction=outside / total if total else 0.0,
        replicated_param_bytes=replicated,
    )
