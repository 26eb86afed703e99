"""Model -> ordered chain of pipeline-splittable layers.

A *layer* is a module of the model (named by its FQN) that the planner may place on a pipeline
stage and give an intra-layer strategy: the embedding, each transformer block, the final norm,
the head. The chain is ordered so that, for chain-executable models, feeding the output of
layer ``u`` into layer ``u + 1`` reproduces ``model(inputs)``.

Everything here runs on the meta device: no real weights are allocated.

``layer_chain(model)`` finds the chain; ``build_graph(model, example_inputs)`` traces one
forward + backward of a meta copy at batch ``TRACE_BATCH_SIZE`` and measures, per layer, the
FLOPs (``torch.utils.flop_counter``), the output and saved-for-backward bytes (forward hooks and
``saved_tensors_hooks``) and the tensor-parallel plan (Megatron column-/row-wise Linear pairs,
found from the autograd graph, no model-specific names).

Attention is traced as a fused (flash) kernel, as on GPUs: it saves q, k, v, the output and
the log-sum-exp, never the (seq x seq) probabilities; its FLOPs follow torch's SDPA formula
(causal masking not discounted).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from uniap.errors import UniapError

__all__ = [
    "TRACE_BATCH_SIZE",
    "Layer",
    "ModelGraph",
    "TPPair",
    "build_graph",
    "is_declared_chain",
    "layer_chain",
    "run_chain",
]

logger = logging.getLogger(__name__)

TRACE_BATCH_SIZE = 2
"""Batch size of the meta trace; per-sample numbers are the traced numbers divided by it."""


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


@dataclass(frozen=True)
class Layer:
    """One pipeline-splittable layer and the static numbers the cost model needs."""

    fqn: str
    """Fully qualified module name in the model (``blocks.3``, ``encoder.layers.0``)."""
    type_name: str
    """Class name of the module (``Block``, ``Embedding``)."""
    num_params: int
    """Number of parameter elements (shared parameters counted on their first owner)."""
    param_bytes: int
    """Bytes of the parameters at the training dtype."""
    fwd_flops_per_sample: float
    """Forward FLOPs for one sample (``torch.utils.flop_counter``)."""
    bwd_flops_per_sample: float
    """Backward FLOPs for one sample."""
    output_bytes_per_sample: float
    """Bytes of everything the layer returns for one sample: what travels to the next layer."""
    saved_bytes_per_sample: float
    """Bytes of the activations autograd keeps for backward, for one sample."""
    tp_pairs: tuple[TPPair, ...] = ()
    """Tensor-parallel pairs; empty when the layer has no TP plan."""
    tp_divisors: tuple[int, ...] = ()
    """Sizes every TP degree must divide (heads, kv heads, feature sizes of the TP Linears)."""
    tp_excluded_reason: str = ""
    """Why the layer has no TP plan (logged once by the planner), empty if it has one."""
    tp_saved_fraction: float = 1.0
    """Fraction of ``saved_bytes_per_sample`` that sits inside TP pairs and shrinks by 1/tp."""
    cost_key: str = ""
    """Layers with equal keys have identical costs (same type, shapes and TP plan)."""

    @property
    def tp_enabled(self) -> bool:
        """True when the layer has a tensor-parallel plan."""
        return bool(self.tp_pairs)

    def supports_tp(self, tp_degree: int) -> bool:
        """True when the layer can run at this TP degree: one source of truth for planner and
        executor."""
        if tp_degree == 1:
            return True
        if not self.tp_pairs:
            return False
        return all(d % tp_degree == 0 for d in self.tp_divisors)


@dataclass(frozen=True)
class ModelGraph:
    """The ordered layer chain of a model, plus what identifies the model."""

    name: str
    """Model name (class name or preset name)."""
    layers: tuple[Layer, ...]
    """The chain, in execution order."""
    dtype: str = "float32"
    """Training dtype of the parameters and activations (``float32``, ``bfloat16``...)."""
    sample_shape: tuple[int, ...] = ()
    """Shape of one input sample (e.g. ``(seq_len,)`` for token ids)."""
    extra: dict = field(default_factory=dict, compare=False)
    """Free-form facts (seq_len, vocab size...) for display."""

    @property
    def num_layers(self) -> int:
        """Number of layers in the chain."""
        return len(self.layers)

    @property
    def fqns(self) -> tuple[str, ...]:
        """Layer FQNs in chain order."""
        return tuple(layer.fqn for layer in self.layers)

    @property
    def signature(self) -> str:
        """Hash of the layer FQNs, parameter sizes and dtype: a plan or profile made for another
        model (or another shape of this one) has another signature."""
        h = hashlib.sha256()
        h.update(self.dtype.encode())
        h.update(repr(self.sample_shape).encode())
        for layer in self.layers:
            h.update(f"{layer.fqn}|{layer.type_name}|{layer.num_params}|{layer.cost_key};".encode())
        return h.hexdigest()[:16]

    def layer(self, fqn: str) -> Layer:
        """The layer with this FQN (KeyError-free: raises ValueError naming the known FQNs)."""
        for layer in self.layers:
            if layer.fqn == fqn:
                return layer
        raise ValueError(f"no layer {fqn!r} in model {self.name!r}; layers: {list(self.fqns)}")


# --------------------------------------------------------------------------------------------
# Layer chain
# --------------------------------------------------------------------------------------------

_CONTAINERS = (nn.ModuleList, nn.Sequential)


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _has_container_below(module: nn.Module) -> bool:
    return any(isinstance(m, _CONTAINERS) for m in module.modules() if m is not module)


def _discover(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    chain: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        fqn = f"{prefix}{name}"
        if isinstance(child, _CONTAINERS):
            for item_name, item in child.named_children():
                if isinstance(item, _CONTAINERS):  # nested lists expand too
                    chain += _discover(item, f"{fqn}.{item_name}.")
                elif _has_params(item):
                    chain.append((f"{fqn}.{item_name}", item))
        elif _has_container_below(child):  # a wrapper such as `encoder`, `transformer`
            chain += _discover(child, f"{fqn}.")
        elif _has_params(child):
            chain.append((fqn, child))
        # parameterless children (dropout, activations, rotary caches) are folded away
    return chain


def layer_chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ordered ``(fqn, module)`` layer chain of ``model``.

    ``model.uniap_layer_fqns()`` when the model defines it (the reference models, which are
    chain-executable); the children of an ``nn.Sequential``; otherwise discovered, for planning
    only: top-level children in registration order, a ModuleList/Sequential expands into its
    items, a child holding a ModuleList/Sequential somewhere below (``encoder``,
    ``transformer``) expands recursively, any other child with parameters is one layer and
    parameterless children are dropped (e.g. Hugging Face GPT-2 gives ``transformer.wte``,
    ``transformer.wpe``, ``transformer.h.0`` .. ``transformer.ln_f``, ``lm_head``).
    """
    fqns_fn = getattr(model, "uniap_layer_fqns", None)
    if callable(fqns_fn):
        return [(fqn, _submodule(model, fqn)) for fqn in fqns_fn()]
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    chain = _discover(model, "")
    if not chain:
        raise UniapError(
            f"{type(model).__name__} has no parameterised children to split into layers; "
            "wrap it in nn.Sequential or define uniap_layer_fqns()"
        )
    return chain


def is_declared_chain(model: nn.Module) -> bool:
    """True when ``model`` declares its forward to be its layer chain (``nn.Sequential`` or
    ``uniap_layer_fqns()``): the executor may split it into pipeline stages by running its
    layers one after the other. Any other model runs its own forward, at ``pp == 1``."""
    return isinstance(model, nn.Sequential) or callable(getattr(model, "uniap_layer_fqns", None))


def _submodule(model: nn.Module, fqn: str) -> nn.Module:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise UniapError(
            f"layer {fqn!r} is not a submodule of {type(model).__name__} (children: {names})"
        ) from None


def run_chain(modules: Iterable[nn.Module | tuple[str, nn.Module]], x: Any) -> Any:
    """Feed ``x`` through ``modules`` (modules or ``(fqn, module)`` pairs) in order."""
    for item in modules:
        module = item[1] if isinstance(item, tuple) else item
        x = module(x)
    return x


# --------------------------------------------------------------------------------------------
# Meta tracing helpers
# --------------------------------------------------------------------------------------------


def _tensors(obj: Any) -> list[Tensor]:
    """Every tensor in a (nested) output: tensors, tuples, lists, dicts, HF ModelOutputs."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _storage_key(t: Tensor) -> tuple[int, int]:
    """(storage id, bytes) of the storage a tensor keeps alive; views share their base's."""
    try:
        storage = t.untyped_storage()
        return storage._cdata, storage.nbytes()
    except (RuntimeError, NotImplementedError):  # storage-less tensor subclasses
        return id(t), t.nbytes


def _fake_copy(model: nn.Module, dtype: torch.dtype, fake_mode: FakeTensorMode) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are fake meta tensors (shared
    parameters stay shared, floating ones trainable and cast to ``dtype``); real weights are
    never read or copied."""

    def fake(t: Tensor) -> Tensor:
        dt = dtype if t.is_floating_point() else t.dtype
        return fake_mode.from_tensor(torch.empty_like(t, device="meta", dtype=dt))

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(fake(p), requires_grad=p.is_floating_point())
    for b in model.buffers():
        memo[id(b)] = fake(b)
    return copy.deepcopy(model, memo)


def _fake_inputs(obj: Any, batch: int, dtype: torch.dtype, fake_mode: FakeTensorMode) -> Any:
    """Fake meta tensors of the inputs' dtypes and shapes, with dim 0 (the batch) set to
    ``batch``; floating inputs are cast to ``dtype``."""
    if isinstance(obj, Tensor):
        shape = (batch, *obj.shape[1:]) if obj.dim() else obj.shape
        dt = dtype if obj.is_floating_point() else obj.dtype
        return fake_mode.from_tensor(torch.empty(shape, dtype=dt, device="meta"))
    if isinstance(obj, Mapping):
        return {k: _fake_inputs(v, batch, dtype, fake_mode) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_fake_inputs(v, batch, dtype, fake_mode) for v in obj)
    return obj


def _fused_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _fused_sdpa_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_FUSED_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FUSED_SDPA_FLOPS = {
    _FUSED_SDPA: _fused_sdpa_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _fused_sdpa_backward_flop,
}


class _FusedAttentionMode(TorchFunctionMode):
    """Reroutes ``F.scaled_dot_product_attention`` to the fused (flash) kernel during the meta
    trace (meta tensors would otherwise take the unfused math path, which saves the
    probabilities) and reports the query / key-value head counts of every call."""

    def __init__(self, on_heads: Callable[[int, int], None]) -> None:
        super().__init__()
        self.on_heads = on_heads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        call = {**dict(zip(names, args)), **kwargs}
        q, k, v = call["query"], call["key"], call["value"]
        if q.dim() < 3:
            return func(*args, **kwargs)
        self.on_heads(q.shape[-3], k.shape[-3])
        if q.dim() != 4:
            return func(*args, **kwargs)
        if k.shape[-3] != q.shape[-3]:  # grouped-query attention (enable_gqa)
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        mask = call.get("attn_mask")
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~mask, float("-inf")
            )
        try:
            out, _ = _FUSED_SDPA(
                q,
                k,
                v,
                call.get("dropout_p", 0.0),
                call.get("is_causal", False),
                attn_mask=mask,
                scale=call.get("scale"),
            )
        except RuntimeError as e:  # unsupported shapes: the unfused path is still correct
            logger.debug("fused attention unavailable (%s); tracing the math path", e)
            return func(*args, **kwargs)
        return out


def _default_loss(output: Any) -> Tensor:
    """Sum of every floating output that requires grad: the backward FLOPs of the layers are
    those of any real loss (loss functions themselves do no matmuls)."""
    parts = [t.float().sum() for t in _tensors(output) if t.is_floating_point() and t.requires_grad]
    if not parts:
        raise UniapError(
            "the model output has no floating tensor that requires grad; pass loss_fn=..."
        )
    return torch.stack(parts).sum()


# --------------------------------------------------------------------------------------------
# The trace
# --------------------------------------------------------------------------------------------


@dataclass
class _LinearCall:
    """One nn.Linear call inside a layer during the trace."""

    fqn: str
    module: nn.Linear
    input: Tensor
    start_event: int
    output: Tensor | None = None
    end_event: int = -1
    num_calls: int = 1


@dataclass
class _LayerTrace:
    """What the hooks saw of one chain layer."""

    input_nodes: set = field(default_factory=set)
    input_last_dim: int | None = None
    output_nodes: list = field(default_factory=list)
    output_last_dim: int | None = None
    output_bytes: int = 0
    saved: dict[int, tuple[int, int]] = field(default_factory=dict)
    """storage id -> (bytes, event index), first save only."""
    linears: list[_LinearCall] = field(default_factory=list)
    heads: set[int] = field(default_factory=set)
    num_calls: int = 0


class _Tracer:
    """Hooks that attribute outputs, saved tensors, Linear calls and attention heads to the
    chain layer currently running."""

    def __init__(self, chain: list[tuple[str, nn.Module]], excluded_storages: set[int]) -> None:
        self.chain = chain
        self.excluded = excluded_storages
        self.layers = [_LayerTrace() for _ in chain]
        self.stack: list[int] = []
        self.event = 0
        self.handles: list[Any] = []

    def install(self) -> None:
        for i, (_, layer) in enumerate(self.chain):
            self.handles.append(
                layer.register_forward_pre_hook(partial(self._enter, i), with_kwargs=True)
            )
            self.handles.append(layer.register_forward_hook(partial(self._exit, i)))
            for rel, sub in layer.named_modules():
                if isinstance(sub, nn.Linear):
                    hook = partial(self._linear_pre, i, rel)
                    self.handles.append(sub.register_forward_pre_hook(hook))
                    self.handles.append(sub.register_forward_hook(partial(self._linear_post, i)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _tick(self) -> int:
        self.event += 1
        return self.event

    def _enter(self, i: int, module, args, kwargs) -> None:
        trace = self.layers[i]
        tensors = _tensors(list(args)) + _tensors(kwargs)
        trace.num_calls += 1
        trace.input_nodes |= {t.grad_fn for t in tensors if t.grad_fn is not None}
        if tensors and trace.input_last_dim is None and tensors[0].dim():
            trace.input_last_dim = tensors[0].shape[-1]
        self.stack.append(i)

    def _exit(self, i: int, module, args, output) -> None:
        trace = self.layers[i]
        tensors = _tensors(output)
        trace.output_bytes += sum(t.nbytes for t in tensors)
        trace.output_nodes += [t.grad_fn for t in tensors if t.grad_fn is not None]
        if tensors and tensors[0].dim():
            trace.output_last_dim = tensors[0].shape[-1]
        self.stack.pop()

    def _linear_pre(self, i: int, rel: str, module, args) -> None:
        trace = self.layers[i]
        for call in trace.linears:
            if call.module is module:
                call.num_calls += 1
                return
        if args and isinstance(args[0], Tensor):
            trace.linears.append(_LinearCall(rel, module, args[0], self._tick()))

    def _linear_post(self, i: int, module, args, output) -> None:
        for call in self.layers[i].linears:
            if call.module is module and call.output is None and isinstance(output, Tensor):
                call.output, call.end_event = output, self._tick()

    def pack(self, t: Tensor) -> Tensor:
        if self.stack:
            key, nbytes = _storage_key(t)
            saved = self.layers[self.stack[-1]].saved
            if key not in self.excluded and key not in saved:
                saved[key] = (nbytes, self._tick())
        return t

    def on_heads(self, q_heads: int, kv_heads: int) -> None:
        if self.stack:
            self.layers[self.stack[-1]].heads |= {q_heads, kv_heads}


# --------------------------------------------------------------------------------------------
# Tensor-parallel plan
# --------------------------------------------------------------------------------------------

_HEAD_COUNT_ATTRS = (
    "n_heads",
    "num_heads",
    "num_attention_heads",
    "n_head",
    "n_kv_heads",
    "num_key_value_heads",
)
_EMBEDDING_HEAD_REASON = "embedding/head: vocabulary-parallel TP not supported"
_MAX_WALK_NODES = 200_000


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


def _no_pair_reason(layer: nn.Module, calls: list[_LinearCall]) -> str:
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


@dataclass(frozen=True)
class _TPPlan:
    pairs: tuple[TPPair, ...] = ()
    divisors: tuple[int, ...] = ()
    excluded_reason: str = ""
    saved_fraction: float = 0.0


def _tp_plan(layer: nn.Module, trace: _LayerTrace, batch: int) -> _TPPlan:
    """Megatron pairs of a layer: a row-wise Linear R whose input derives (through non-Linear
    ops only, not from the layer input) from column-wise Linears C, with
    ``R.out_features`` equal to some ``C.in_features``, and whose column-wise outputs reach
    nothing but R (no other Linear, not the layer output)."""
    calls = [c for c in trace.linears if c.output is not None]
    reused = [c.fqn for c in calls if c.num_calls > 1]
    if reused:
        return _TPPlan(excluded_reason=f"Linear(s) {reused} called more than once per forward")
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
        return _TPPlan(excluded_reason=_no_pair_reason(layer, calls))
    divisors = set(_head_counts(layer)) | trace.heads
    tp_pairs = []
    for cols, r in pairs:
        divisors |= {calls[c].module.out_features for c in cols} | {calls[r].module.in_features}
        tp_pairs.append(
            TPPair(
                colwise=tuple(calls[c].fqn for c in cols),
                rowwise=calls[r].fqn,
                allreduce_bytes_per_sample=calls[r].output.nbytes / batch,
                input_bytes_per_sample=tuple(sorted(
                    nbytes / batch
                    for nbytes in {_storage_key(calls[c].input)[0]: calls[c].input.nbytes for c in cols}.values()
                )),
            )
        )
    # saved inside a pair's span, except the (replicated) inputs of its column-wise Linears
    spans = [(min(calls[c].start_event for c in cols), calls[r].end_event) for cols, r in pairs]
    replicated = {_storage_key(calls[c].input)[0] for cols, _ in pairs for c in cols}
    total = sum(nbytes for nbytes, _ in trace.saved.values())
    inside = sum(
        nbytes
        for key, (nbytes, event) in trace.saved.items()
        if key not in replicated and any(lo <= event <= hi for lo, hi in spans)
    )
    return _TPPlan(
        pairs=tuple(tp_pairs),
        divisors=tuple(sorted(divisors)),
        saved_fraction=inside / total if total else 0.0,
    )


# --------------------------------------------------------------------------------------------
# build_graph
# --------------------------------------------------------------------------------------------


def _cost_key(layer: nn.Module, fields: dict[str, Any]) -> str:
    h = hashlib.sha256(type(layer).__name__.encode())
    for name, p in layer.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    h.update(repr(sorted(fields.items())).encode())
    return h.hexdigest()[:16]


class _MetaMode(contextlib.nullcontext):
    """Plain meta tensors in the place of a ``FakeTensorMode``: the fast trace."""

    def from_tensor(self, t: Tensor) -> Tensor:
        return t


def _trace(
    model: nn.Module,
    fqns: list[str],
    example_inputs: Any,
    dtype: torch.dtype,
    loss_fn: Callable[[Any], Tensor] | None,
    mode: Any,
) -> tuple[nn.Module, list[tuple[str, nn.Module]], _Tracer, dict, dict]:
    """One forward and backward of a meta copy of ``model`` (tensors made by ``mode``:
    :class:`_MetaMode` or a ``FakeTensorMode``) at ``TRACE_BATCH_SIZE``, recorded per layer:
    ``(traced copy, chain, tracer, forward FLOP counts, all FLOP counts)``."""
    traced = _fake_copy(model, dtype, mode)
    chain = [(fqn, _submodule(traced, fqn)) for fqn in fqns]
    inputs = _fake_inputs(example_inputs, TRACE_BATCH_SIZE, dtype, mode)
    excluded = {_storage_key(t)[0] for t in [*traced.parameters(), *traced.buffers()]}
    tracer = _Tracer(chain, excluded)
    tracer.install()
    counter = FlopCounterMode(display=False, custom_mapping=_FUSED_SDPA_FLOPS)
    try:
        with mode, torch.enable_grad(), counter, _FusedAttentionMode(tracer.on_heads):
            with torch.autograd.graph.saved_tensors_hooks(tracer.pack, lambda t: t):
                if isinstance(inputs, Mapping):
                    output = traced(**inputs)
                elif isinstance(inputs, (tuple, list)):
                    output = traced(*inputs)
                else:
                    output = traced(inputs)
            fwd_counts = counter.get_flop_counts()
            loss = loss_fn(output) if loss_fn is not None else _default_loss(output)
            loss.backward()
        all_counts = counter.get_flop_counts()
    finally:
        tracer.remove()
    return traced, chain, tracer, fwd_counts, all_counts


def build_graph(
    model: nn.Module,
    example_inputs: Any,
    *,
    name: str | None = None,
    dtype: torch.dtype | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    layer_fqns: list[str] | None = None,
) -> ModelGraph:
    """Trace ``model`` on the meta device and return its layer chain with per-layer costs.

    Per layer: forward/backward FLOPs, output and saved-for-backward bytes, all per sample;
    parameters (shared ones on their first layer); the TP plan (pairs, divisors, or the reason
    there is none; embedding and head layers never get one); a ``cost_key``.

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs
    (real or meta tensors; only their dtypes and per-sample shapes are used, dim 0 is the
    batch). The model is deep-copied to the meta device (its weights are never read), cast to
    ``dtype`` (default: its first floating parameter's), and run once forward and backward at
    batch ``TRACE_BATCH_SIZE``; ``loss_fn(output) -> scalar`` defaults to the sum of the
    floating outputs. ``layer_fqns`` overrides ``layer_chain(model)``.
    """
    start_s = time.perf_counter()
    fqns = list(layer_fqns) if layer_fqns is not None else [f for f, _ in layer_chain(model)]
    clashes = sorted({(a, b) for a in fqns for b in fqns if b.startswith(f"{a}.")})
    if len(set(fqns)) != len(fqns) or clashes:
        raise UniapError(f"layer FQNs must be unique and not nested ({clashes[:3]}), got {fqns}")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    batch = TRACE_BATCH_SIZE
    try:
        traced, chain, tracer, fwd_counts, all_counts = _trace(
            model, fqns, example_inputs, dtype, loss_fn, _MetaMode()
        )
    except Exception as e:  # noqa: BLE001 - any op a plain meta tensor cannot answer
        # fake (not plain meta) tensors: libraries such as transformers skip their
        # data-dependent checks (`.all()`, `.item()`) on fake tensors, as under torch.compile;
        # they cost about 3x the time, so they are the fallback
        logger.debug("meta-tensor trace failed (%s: %s); tracing with fake tensors", type(e).__name__, e)
        traced, chain, tracer, fwd_counts, all_counts = _trace(
            model, fqns, example_inputs, dtype, loss_fn, FakeTensorMode(allow_non_fake_inputs=True)
        )

    unused = [fqn for (fqn, _), t in zip(chain, tracer.layers) if t.num_calls == 0]
    if unused:
        logger.warning("layers %s did not run in the forward; their costs are zero", unused)
    root = type(traced).__name__
    last = len(chain) - 1
    seen_params: set[int] = set()
    # parameters outside every layer (model-level ones) are trained with the first layer's
    # data-parallel group by the executor: counted there
    in_layers = {id(p) for _, module in chain for p in module.parameters()}
    outside = [p for p in traced.parameters() if id(p) not in in_layers]
    layers = []
    for i, (fqn, module) in enumerate(chain):
        trace = tracer.layers[i]
        fwd = sum(fwd_counts.get(f"{root}.{fqn}", {}).values())
        total = sum(all_counts.get(f"{root}.{fqn}", {}).values())
        own = [p for p in module.parameters() if id(p) not in seen_params]
        if i == 0:
            own += outside
        seen_params |= {id(p) for p in own}
        is_embedding = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in module.modules())
        is_head = i == last and trace.input_last_dim != trace.output_last_dim
        if is_embedding or is_head:
            tp = _TPPlan(excluded_reason=_EMBEDDING_HEAD_REASON)
        else:
            tp = _tp_plan(module, trace, batch)
        numbers = {
            "num_params": sum(p.numel() for p in own),
            "param_bytes": sum(p.numel() * p.element_size() for p in own),
            "fwd_flops_per_sample": fwd / batch,
            "bwd_flops_per_sample": (total - fwd) / batch,
            "output_bytes_per_sample": trace.output_bytes / batch,
            "saved_bytes_per_sample": sum(b for b, _ in trace.saved.values()) / batch,
            "tp_pairs": tp.pairs,
            "tp_divisors": tp.divisors,
            "tp_excluded_reason": tp.excluded_reason,
            "tp_saved_fraction": tp.saved_fraction,
        }
        layers.append(
            Layer(
                fqn=fqn,
                type_name=type(module).__name__,
                cost_key=_cost_key(module, numbers),
                **numbers,
            )
        )

    first_input = next(iter(_tensors(example_inputs)), None)
    total_params = sum(p.numel() for p in traced.parameters())
    graph = ModelGraph(
        name=name or getattr(model, "uniap_name", None) or type(model).__name__,
        layers=tuple(layers),
        dtype=str(dtype).removeprefix("torch."),
        sample_shape=tuple(first_input.shape[1:]) if first_input is not None else (),
        extra={
            "model_class": type(model).__name__,
            "num_params": total_params,
            "fwd_flops_per_sample": sum(layer.fwd_flops_per_sample for layer in layers),
            "trace_batch_size": batch,
            # read by the planner (plan_graph): pp > 1 only for a model the executor can split
            "pipeline_splittable": is_declared_chain(model),
        },
    )
    if outside:
        logger.info(
            "%s: %d parameter(s) outside every layer (%d elements) counted with layer %s",
            graph.name,
            len(outside),
            sum(p.numel() for p in outside),
            layers[0].fqn,
        )
    logger.info(
        "traced %s: %d layers, %.3g params, %.3g fwd FLOP/sample, %d with a TP plan (%.2f s)",
        graph.name,
        len(layers),
        total_params,
        graph.extra["fwd_flops_per_sample"],
        sum(layer.tp_enabled for layer in layers),
        time.perf_counter() - start_s,
    )
    return graph
