"""Tensor-parallel pair discovery: the Megatron column-/row-wise Linear pairs of a layer, found
from the autograd graph of its meta trace (no model-specific names), the TP degrees its
shapes allow, and the share of its saved bytes that TP shards.

A pair is a row-wise Linear ``R`` whose input derives, through non-Linear ops only and not
from the layer input, from column-wise Linears ``C`` with ``R.out_features`` equal to some
``C.in_features``, and whose column-wise outputs reach nothing but ``R``. A layer where no
pair is found gets no TP and a one-line reason (logged by the planner).

Embedding and head layers get vocabulary-parallel TP instead (:func:`vocab_plan`,
:class:`VocabParallel`): the first layer's vocabulary table (its ``nn.Embedding`` with the
most rows; a later embedding layer keeps tp = 1, :data:`LATER_EMBEDDING_REASON`) is split by
rows, the head's output Linear (the one whose output is the layer's output)
by output features, the vocabulary; the degree must divide the vocabulary size. A weight tied
to another module (GPT-2's ``wte`` / ``lm_head``) keeps the layer at tp = 1, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from uniap._torch_utils import storage_key
from uniap.tracing import LayerTrace, LinearCall

__all__ = ["LATER_EMBEDDING_REASON", "TPPair", "TPPlan", "VocabParallel", "tp_plan", "vocab_plan"]


@dataclass(frozen=True)
class TPPair:
    """A Megatron-style tensor-parallel pair inside a layer.

    The ``colwise`` Linears consume the same input and are split by output features; the
    ``rowwise`` Linear consumes their (combined) output and is split by input features, so one
    all-reduce of the row-wise output per pair is needed forward and one backward.
    """

    colwise: tuple[str, ...]
    """FQNs of the column-wise Linears, relative to the layer (e.g. ``attn.q_proj``)."""
    rowwise: str
    """FQN of the row-wise Linear, relative to the layer (e.g. ``attn.o_proj``)."""
    allreduce_bytes_per_sample: float
    """Bytes of the row-wise output for one sample: the tensor all-reduced in forward."""
    input_bytes_per_sample: tuple[float, ...] = ()
    """Bytes per sample of each distinct input of the column-wise Linears: in backward, the
    gradient of each is all-reduced once (self-attention/MLP: one input; cross-attention: two).
    Empty means one input of ``allreduce_bytes_per_sample`` bytes."""


_HEAD_COUNT_ATTRS = (
    "n_heads",
    "num_heads",
    "num_attention_heads",
    "n_head",
    "n_kv_heads",
    "num_key_value_heads",
)
_MAX_WALK_NODES = 200_000
LATER_EMBEDDING_REASON = (
    "embedding/head: only the first layer's embedding (of the model's input ids) is "
    "vocabulary-parallel; a later embedding layer (a position table, GPT-2's wpe) may return "
    "a tensor without the batch dim, whose gradient differs across the TP ranks"
)


def _direct_linear_sources(
    starts: Iterable[Any], linear_of: dict[Any, int], stop_nodes: set
) -> tuple[set[int], bool]:
    """Walk the autograd graph back from ``starts``; return the Linear calls whose outputs are
    reached without passing through another Linear, and whether a layer input was reached."""
    found: set[int] = set()
    reached_input = False
    seen: set = set()
    todo = [n for n in starts if n is not None]
    while todo and len(seen) < _MAX_WALK_NODES:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in linear_of:
            found.add(linear_of[node])
        elif node in stop_nodes:
            reached_input = True
        else:
            todo += [nxt for nxt, _ in node.next_functions if nxt is not None]
    return found, reached_input


def _head_counts(layer: nn.Module) -> set[int]:
    """Head counts stored as int attributes (or in a ``config``) of the layer's submodules."""
    counts: set[int] = set()
    for sub in layer.modules():
        for holder in (sub, getattr(sub, "config", None)):
            for attr in _HEAD_COUNT_ATTRS:
                value = getattr(holder, attr, None) if holder is not None else None
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    counts.add(value)
    return counts


def _no_pair_reason(layer: nn.Module, calls: list[LinearCall]) -> str:
    base = "no column-wise/row-wise Linear pair found"
    projections = sorted(
        {
            type(m).__name__
            for m in layer.modules()
            if not isinstance(m, (nn.Linear, nn.Embedding, nn.EmbeddingBag))
            and any(p.dim() >= 2 for p in m.parameters(recurse=False))
        }
    )
    if projections:
        return f"{base} (fused or non-Linear projections: {', '.join(projections)})"
    if not calls:
        return f"{base} (no nn.Linear inside)"
    names = ", ".join(
        f"{c.fqn or type(layer).__name__} ({c.module.in_features}->{c.module.out_features})"
        for c in calls
    )
    return f"{base} (Linear sizes or data flow do not line up: {names})"


_SPLIT_NODES = (
    "SliceBackward0",
    "SplitBackward0",
    "SplitWithSizesBackward0",
    "NarrowBackward0",
    "UnbindBackward0",
)


def _split_dim_size(node: Any) -> int | None:
    """For a split / slice of a tensor in the autograd graph: the size of the dimension it
    splits (None for any other node)."""
    if type(node).__name__ not in _SPLIT_NODES:
        return None
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    dim = getattr(node, "_saved_dim", None)
    if sizes is None or dim is None:
        return None
    try:
        return int(sizes[dim])
    except (IndexError, TypeError, ValueError):
        return None


def _unshardable(
    calls: list[LinearCall],
    pairs: list[tuple[list[int], int]],
    linear_of: dict[Any, int],
    trace: LayerTrace,
    batch: int,
    head_counts: set[int],
) -> str:
    """Why sharding the layer's pairs would not compute the layer (empty when it would):

    - a column-wise output split along its feature dimension after the Linear (a fused
      ``qkv_proj`` / ``gate_up_proj`` cut at global offsets): column shards would not be
      shards of each part;
    - a floating input from outside the layer indexed by attention head (an attention bias
      made for all heads, e.g. ALiBi or a relative position bias computed by another layer):
      head-sharded attention would need its shard of it."""
    for cols, r in pairs:
        widths = {calls[c].module.out_features for c in cols}
        seen: set = set()
        todo = [calls[r].input.grad_fn]
        while todo and len(seen) < _MAX_WALK_NODES:
            node = todo.pop()
            if node is None or node in seen or node in linear_of or node in trace.input_nodes:
                continue
            seen.add(node)
            size = _split_dim_size(node)
            if size is not None and size in widths:
                names = ", ".join(calls[c].fqn for c in cols)
                return (
                    f"the output of {names} ({size} features) is split after the Linear "
                    "(a fused projection): column shards would not be shards of each part"
                )
            todo += [nxt for nxt, _ in node.next_functions if nxt is not None]
    for shape in trace.extra_input_shapes:
        for heads in trace.heads | head_counts:
            by_head = (len(shape) == 4 and shape[1] == heads and heads > 1) or (
                len(shape) == 3 and shape[0] == batch * heads and heads > 1
            )
            if by_head:
                return (
                    f"an input of shape {list(shape)} is indexed by attention head (a bias for "
                    "all heads made outside the layer): head-sharded attention would need its "
                    "shard"
                )
    return ""


@dataclass(frozen=True)
class VocabParallel:
    """Vocabulary-parallel TP of an embedding or head layer (torch's ``RowwiseParallel`` on
    the ``nn.Embedding``, ``ColwiseParallel`` with logits left sharded on the vocabulary on
    the head's ``nn.Linear``; see :mod:`uniap.executor.tensor_parallel`)."""

    kind: str
    """``"embedding"`` or ``"head"``."""
    module: str
    """FQN of the sharded ``nn.Embedding`` / ``nn.Linear``, relative to the layer (``""``: the
    layer itself)."""
    vocab_size: int
    """Rows of the embedding table / output features of the head: what tp must divide."""
    allreduce_bytes_per_sample: float
    """Bytes per sample of the one all-reduce per micro-batch on the TP group: the
    embedding's output (forward; its input is token ids, nothing flows back), the gradient of
    the head's input (backward; its output stays sharded)."""
    param_fraction: float
    """Share of the layer's parameter elements that is sharded (the rest, e.g. a position
    table, stays replicated)."""
    loss_rows_per_sample: float = 0.0
    """Head only: logit rows (tokens) per sample. Loss parallel all-reduces three fp32 values
    per row forward (the max and the sum of exponentials of ``log_softmax``, the target logit
    of ``nll_loss``) and none backward."""


@dataclass(frozen=True)
class TPPlan:
    pairs: tuple[TPPair, ...] = ()
    divisors: tuple[int, ...] = ()
    excluded_reason: str = ""
    saved_fraction: float = 0.0
    vocab: VocabParallel | None = None


def tp_plan(layer: nn.Module, trace: LayerTrace, batch: int) -> TPPlan:
    """Megatron pairs of a layer: a row-wise Linear R whose input derives (through non-Linear
    ops only, not from the layer input) from column-wise Linears C, with
    ``R.out_features`` equal to some ``C.in_features``, and whose column-wise outputs reach
    nothing but R (no other Linear, not the layer output)."""
    calls = [c for c in trace.linears if c.output is not None]
    reused = [c.fqn for c in calls if c.num_calls > 1]
    if reused:
        return TPPlan(excluded_reason=f"Linear(s) {reused} called more than once per forward")
    linear_of = {c.output.grad_fn: j for j, c in enumerate(calls) if c.output.grad_fn is not None}
    sources = {
        j: _direct_linear_sources([c.input.grad_fn], linear_of, trace.input_nodes)
        for j, c in enumerate(calls)
    }
    out_sources, _ = _direct_linear_sources(trace.output_nodes, linear_of, trace.input_nodes)
    pairs: list[tuple[list[int], int]] = []
    assigned: set[int] = set()
    for r, call in enumerate(calls):
        cols, hits_input = sources[r]
        if r in assigned or not cols or hits_input or cols & assigned:
            continue
        if call.module.out_features not in {calls[c].module.in_features for c in cols}:
            continue
        consumers = [out_sources] + [s for j, (s, _) in sources.items() if j != r]
        if any(cols & other for other in consumers):
            continue  # a column-wise output escapes the pair: sharding it would be wrong
        pairs.append((sorted(cols), r))
        assigned |= cols | {r}
    if not pairs:
        return TPPlan(excluded_reason=_no_pair_reason(layer, calls))
    unsafe = _unshardable(calls, pairs, linear_of, trace, batch, _head_counts(layer))
    if unsafe:
        return TPPlan(excluded_reason=unsafe)
    divisors = set(_head_counts(layer)) | trace.heads
    tp_pairs = []
    for cols, r in pairs:
        divisors |= {calls[c].module.out_features for c in cols} | {calls[r].module.in_features}
        tp_pairs.append(
            TPPair(
                colwise=tuple(calls[c].fqn for c in cols),
                rowwise=calls[r].fqn,
                allreduce_bytes_per_sample=calls[r].output.nbytes / batch,
                input_bytes_per_sample=tuple(
                    sorted(
                        nbytes / batch
                        for nbytes in {
                            storage_key(calls[c].input)[0]: calls[c].input.nbytes for c in cols
                        }.values()
                    )
                ),
            )
        )
    # saved inside a pair's span, except the (replicated) inputs of its column-wise Linears
    spans = [(min(calls[c].start_event for c in cols), calls[r].end_event) for cols, r in pairs]
    replicated = {storage_key(calls[c].input)[0] for cols, _ in pairs for c in cols}
    total = sum(nbytes for nbytes, _ in trace.saved.values())
    inside = sum(
        nbytes
        for key, (nbytes, event) in trace.saved.items()
        if key not in replicated and any(lo <= event <= hi for lo, hi in spans)
    )
    return TPPlan(
        pairs=tuple(tp_pairs),
        divisors=tuple(sorted(divisors)),
        saved_fraction=inside / total if total else 0.0,
    )


def _tied_elsewhere(root: nn.Module, prefix: str, weight: nn.Parameter) -> list[str]:
    """Names under ``root`` that hold ``weight`` outside the module at ``prefix``."""
    inside = f"{prefix}." if prefix else ""
    return sorted(
        name
        for name, p in root.named_parameters(remove_duplicate=False)
        if p is weight and not name.startswith(inside)
    )


def vocab_plan(
    kind: str,
    layer: nn.Module,
    fqn: str,
    root: nn.Module,
    trace: LayerTrace,
    batch: int,
    num_params: int,
) -> TPPlan:
    """Vocabulary-parallel TP of an embedding (``kind="embedding"``) or head layer ``layer``
    (at ``fqn`` in ``root``, the traced model; ``num_params``: the parameter elements the
    graph counts for it), or the reason there is none."""
    if kind == "embedding":
        tables = [(name, m) for name, m in layer.named_modules() if isinstance(m, nn.Embedding)]
        if not tables:
            bags = [type(m).__name__ for m in layer.modules() if isinstance(m, nn.EmbeddingBag)]
            return TPPlan(excluded_reason=f"embedding/head: {', '.join(bags)} has no row-wise TP")
        name, table = max(tables, key=lambda nm: nm[1].num_embeddings)
        if table.sparse or table.max_norm is not None or table.scale_grad_by_freq:
            # the masked lookup of a row shard would count, renorm or sparsify the wrong rows
            return TPPlan(
                excluded_reason="embedding/head: a sparse, max_norm or scale_grad_by_freq "
                "nn.Embedding has no row-wise TP"
            )
        weight, vocab = table.weight, table.num_embeddings
        comm = trace.output_bytes / batch
        rows = 0.0
    else:
        outputs = set(trace.output_nodes)
        heads = [c for c in trace.linears if c.output is not None and c.output.grad_fn in outputs]
        if len(heads) != 1 or heads[0].num_calls != 1:
            return TPPlan(
                excluded_reason="embedding/head: no single nn.Linear computes the head's output"
            )
        call = heads[0]
        name, weight, vocab = call.fqn, call.module.weight, call.module.out_features
        comm = call.input.nbytes / batch
        rows = call.output.numel() / vocab / batch
    path = f"{fqn}.{name}" if name else fqn
    tied = _tied_elsewhere(root, path, weight)
    if tied:
        return TPPlan(
            excluded_reason=f"embedding/head: the vocabulary weight {path}.weight is tied to "
            f"{', '.join(tied)}; vocabulary-parallel TP needs untied input and output embeddings"
        )
    vocab_tp = VocabParallel(
        kind=kind,
        module=name,
        vocab_size=vocab,
        allreduce_bytes_per_sample=comm,
        param_fraction=min(weight.numel() / max(num_params, 1), 1.0),
        loss_rows_per_sample=rows,
    )
    return TPPlan(divisors=(vocab,), vocab=vocab_tp)
