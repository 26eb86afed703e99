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
found from the autograd graph, no model-specific names). The trace's machinery lives in
:mod:`uniap.tracing`, the pair discovery in :mod:`uniap.tp_pairs`; this module holds the
types, the layer chain and :func:`build_graph`, which reads them in order.

Attention is traced as a fused (flash) kernel, as on GPUs: it saves q, k, v, the output and
the log-sum-exp, never the (seq x seq) probabilities; its FLOPs follow torch's SDPA formula
(causal masking not discounted).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from uniap._gc import collector_paused
from uniap._torch_utils import call_args, storage_key, tensors_in
from uniap.errors import UniapError
from uniap.sp_plan import SPPlan, sp_plan
from uniap.tp_pairs import (
    LATER_EMBEDDING_REASON,
    TPPair,
    TPPlan,
    VocabParallel,
    tp_plan,
    vocab_plan,
)
from uniap.tracing import (
    FUSED_SDPA_FLOPS,
    FusedAttentionMode,
    LayerReuse,
    NotReusableError,
    Tracer,
    default_loss,
    fake_copy,
    fake_inputs,
    pipeline_split_reason,
)

__all__ = [
    "TRACE_BATCH_SIZE",
    "Layer",
    "ModelGraph",
    "TPPair",
    "VocabParallel",
    "build_graph",
    "is_declared_chain",
    "layer_chain",
    "run_chain",
]

logger = logging.getLogger(__name__)

TRACE_BATCH_SIZE = 2
"""Batch size of the meta trace; per-sample numbers are the traced numbers divided by it."""


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
    tp_vocab: VocabParallel | None = None
    """Vocabulary-parallel TP of an embedding or head layer (instead of pairs); None if not."""
    sp_seq_dim: int = 0
    """Dimension of the layer's first input that sequence parallelism shards (0: no SP plan);
    found from the trace (:mod:`uniap.sp_plan`)."""
    sp_seq_len: int = 0
    """Size of that dimension in the trace: every SP degree must divide it."""
    sp_regions: tuple[str, ...] = ()
    """Submodules (relative FQNs) holding one TP pair each, whose inputs SP all-gathers."""
    sp_saved_fraction: float = 0.0
    """Fraction of ``saved_bytes_per_sample`` that SP shards by 1/tp on top of TP's
    ``tp_saved_fraction`` (saved outside the pairs: norm inputs, residual-stream ops)."""
    sp_excluded_reason: str = ""
    """Why the layer has no SP plan, empty if it has one."""
    wgrad_flops_per_sample: float | None = None
    """Backward FLOPs for one sample that compute parameter gradients (the weight-gradient
    half of a zero-bubble backward): the forward FLOPs of the layer's matrix products with a
    parameter operand (``mm``, ``addmm``, convolutions: each costs one product of the same
    size for the weight gradient; batched products, attention and elementwise ops have no
    parameter and add nothing). None when unknown."""
    sp_replicated_param_bytes: tuple[float, ...] = ()
    """Bytes of each parameter outside the SP regions (norms): SP all-reduces their gradients
    over the TP group."""
    free_params: int = 0
    """Elements of ``num_params`` that the executor keeps out of the layer's data-parallel
    wrapping (:class:`uniap.executor.model_forward.FreeParamSync`): parameters outside every
    layer (counted on the first layer) and weights tied to a later layer (on their first
    owner). They stay whole on every rank that holds them and their gradient is all-reduced
    once per iteration, whatever the layer's kind."""
    tied_copy_params: int = 0
    """Elements of the weights this layer shares with an earlier one (counted there, not in
    ``num_params``): with pipeline stages the executor holds a copy on this layer's stage."""

    @property
    def tp_enabled(self) -> bool:
        """True when the layer has a tensor-parallel plan (Megatron pairs or vocabulary)."""
        return bool(self.tp_pairs) or self.tp_vocab is not None

    @property
    def tp_param_fraction(self) -> float:
        """Share of the parameter elements TP shards (vocabulary TP: the vocabulary table's
        share; pairs: all, the replicated norms and biases being negligible)."""
        return self.tp_vocab.param_fraction if self.tp_vocab is not None else 1.0

    def why_not_tp(self, tp_degree: int) -> str | None:
        """Why the layer cannot run at this TP degree (None when it can): one source of truth
        for planner and executor."""
        if tp_degree == 1:
            return None
        if not self.tp_enabled:
            return self.tp_excluded_reason or "it has no tensor-parallel plan"
        if self.tp_vocab is not None and self.tp_vocab.vocab_size % tp_degree:
            return (
                f"the vocabulary size ({self.tp_vocab.vocab_size}) of the {self.tp_vocab.kind} "
                f"is not divisible by tp={tp_degree}"
            )
        if any(d % tp_degree for d in self.tp_divisors):
            return f"tp must divide each of {list(self.tp_divisors)}"
        return None

    def supports_tp(self, tp_degree: int) -> bool:
        """True when the layer can run at this TP degree (:meth:`why_not_tp`)."""
        return self.why_not_tp(tp_degree) is None

    def sp_why_not(self, tp_degree: int) -> str | None:
        """Why the layer cannot run sequence parallel at this TP degree, or None when it can:
        one source of truth for planner and executor."""
        if tp_degree <= 1:
            return "sequence parallelism needs tp > 1"
        if not self.supports_tp(tp_degree):
            return f"it cannot run tensor parallel at tp={tp_degree}"
        if not self.sp_regions:
            return self.sp_excluded_reason or "it has no sequence-parallel plan"
        if self.sp_seq_len % tp_degree:
            return (
                f"its sequence length ({self.sp_seq_len}, dimension {self.sp_seq_dim} of its "
                f"input) is not divisible by tp={tp_degree}"
            )
        return None

    def supports_sp(self, tp_degree: int) -> bool:
        """True when the layer can run sequence parallel at this TP degree."""
        return self.sp_why_not(tp_degree) is None


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


_WEIGHT_OPS = ("aten.mm", "aten.addmm", "aten.convolution", "aten._convolution")


def _weight_grad_flops(counts: Mapping[Any, int]) -> float:
    """FLOPs of the weight gradients of the forward ops in ``counts`` (op -> FLOPs): those of
    the matrix products and convolutions, whose second operand is a parameter in a layer (a
    Linear or a convolution); see :attr:`Layer.wgrad_flops_per_sample`."""
    return float(sum(n for op, n in counts.items() if str(op) in _WEIGHT_OPS))


def _trace(
    model: nn.Module,
    fqns: list[str],
    example_inputs: Any,
    dtype: torch.dtype,
    loss_fn: Callable[[Any], Tensor] | None,
    mode: Any,
    reuse: bool = False,
) -> tuple[nn.Module, list[tuple[str, nn.Module]], Tracer, dict, dict, dict[int, int]]:
    """One forward and backward of a meta copy of ``model`` (tensors made by ``mode``:
    :class:`_MetaMode` or a ``FakeTensorMode``) at ``TRACE_BATCH_SIZE``, recorded per layer:
    ``(traced copy, chain, tracer, forward FLOP counts, all FLOP counts, copies)``. With
    ``reuse``, layers that copy an earlier one are replayed (:class:`uniap.tracing.LayerReuse`)
    and ``copies`` maps each to the layer whose numbers it takes; otherwise it is empty."""
    traced = fake_copy(model, dtype, mode)
    chain = [(fqn, _submodule(traced, fqn)) for fqn in fqns]
    inputs = fake_inputs(example_inputs, TRACE_BATCH_SIZE, dtype, mode)
    excluded = {storage_key(t)[0] for t in [*traced.parameters(), *traced.buffers()]}
    replay = LayerReuse(chain) if reuse else None
    tracer = Tracer(chain, excluded)
    tracer.install()
    counter = FlopCounterMode(display=False, custom_mapping=FUSED_SDPA_FLOPS)
    try:
        with (
            mode,
            torch.enable_grad(),
            counter,
            FusedAttentionMode(tracer.on_heads, tracer.on_call),
        ):
            with torch.autograd.graph.saved_tensors_hooks(tracer.pack, lambda t: t):
                args, kwargs = call_args(inputs)
                output = traced(*args, **kwargs)
            fwd_counts = counter.get_flop_counts()
            loss = loss_fn(output) if loss_fn is not None else default_loss(output)
            loss.backward()
        all_counts = counter.get_flop_counts()
    finally:
        tracer.remove()
        if replay is not None:
            replay.remove()
    if replay is None:
        return traced, chain, tracer, fwd_counts, all_counts, {}
    replay.check()
    return traced, chain, tracer, fwd_counts, all_counts, dict(replay.copies)


def _trace_any(
    model: nn.Module,
    fqns: list[str],
    example_inputs: Any,
    dtype: torch.dtype,
    loss_fn: Callable[[Any], Tensor] | None,
    mode: Any,
    reuse: bool,
) -> tuple[nn.Module, list[tuple[str, nn.Module]], Tracer, dict, dict, dict[int, int]]:
    """:func:`_trace`, replaying repeated layers when ``reuse``; a replay that does not hold
    (a replayed layer ran twice, or its output could not carry gradients) traces every layer."""
    if reuse:
        try:
            return _trace(model, fqns, example_inputs, dtype, loss_fn, mode, reuse=True)
        except NotReusableError as e:
            logger.debug("repeated layers not replayed (%s); tracing every layer", e)
    return _trace(model, fqns, example_inputs, dtype, loss_fn, mode)


def _execution_order(fqns: list[str], tracer: Any) -> list[str]:
    """The layers in the order of their first call in the trace (a layer never called stays
    right after the layer before it in ``fqns``)."""
    keys: list[tuple[float, int]] = []
    last = -1.0
    for i, trace in enumerate(tracer.layers):
        if trace.first_event is not None:
            last = float(trace.first_event)
        keys.append((last, i))
    return [fqns[i] for _, i in sorted(keys)]


@collector_paused
def build_graph(
    model: nn.Module,
    example_inputs: Any,
    *,
    name: str | None = None,
    dtype: torch.dtype | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    layer_fqns: list[str] | None = None,
    pipeline_check: bool = True,
    reuse_repeated_layers: bool = True,
) -> ModelGraph:
    """Trace ``model`` on the meta device and return its layer chain with per-layer costs.

    Per layer: forward/backward FLOPs, output and saved-for-backward bytes, all per sample;
    parameters (shared ones on their first layer); the TP plan (pairs, divisors, or the reason
    there is none; embedding and head layers get vocabulary-parallel TP,
    :func:`uniap.tp_pairs.vocab_plan`); a ``cost_key``.

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs
    (real or meta tensors; only their dtypes and per-sample shapes are used, dim 0 is the
    batch). The model is deep-copied to the meta device (its weights are never read), cast to
    ``dtype`` (default: its first floating parameter's), and run once forward and backward at
    batch ``TRACE_BATCH_SIZE``; ``loss_fn(output) -> scalar`` defaults to the sum of the
    floating outputs. ``layer_fqns`` overrides ``layer_chain(model)``.

    Whether the planner may split the model into pipeline stages is recorded in ``extra``:
    ``pipeline_split`` is ``"chain"`` for a declared chain, ``"traced"`` for a model whose own
    forward ``torch.export`` traces with its layers running in chain order (the executor splits
    that trace, at tp = 1), else None with ``pipeline_split_error`` saying why
    (:func:`uniap.tracing.pipeline_split_reason`; ``pipeline_check=False`` skips that export
    and records None, for a graph planned at pp = 1 only).

    ``reuse_repeated_layers`` (default): a layer equal to an earlier one in class, attributes,
    parameter shapes and input shapes (the decoder blocks of an LLM) is not run again; it takes
    the numbers of the first (:class:`uniap.tracing.LayerReuse`), so the trace costs one run
    per distinct layer. The graph is the same as with ``False`` (every layer run), which
    ``tests/unit/test_graph.py`` checks.
    """
    start_s = time.perf_counter()
    fqns = list(layer_fqns) if layer_fqns is not None else [f for f, _ in layer_chain(model)]
    clashes = sorted({(a, b) for a in fqns for b in fqns if b.startswith(f"{a}.")})
    if len(set(fqns)) != len(fqns) or clashes:
        raise UniapError(f"layer FQNs must be unique and not nested ({clashes[:3]}), got {fqns}")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    batch = TRACE_BATCH_SIZE
    mode: Any = _MetaMode()
    reuse = reuse_repeated_layers
    try:
        traced, chain, tracer, fwd_counts, all_counts, copies = _trace_any(
            model, fqns, example_inputs, dtype, loss_fn, mode, reuse
        )
    except Exception as e:  # noqa: BLE001 - any op a plain meta tensor cannot answer
        # fake (not plain meta) tensors: libraries such as transformers skip their
        # data-dependent checks (`.all()`, `.item()`) on fake tensors, as under torch.compile;
        # they cost about 3x the time, so they are the fallback
        logger.debug(
            "meta-tensor trace failed (%s: %s); tracing with fake tensors", type(e).__name__, e
        )
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        traced, chain, tracer, fwd_counts, all_counts, copies = _trace_any(
            model, fqns, example_inputs, dtype, loss_fn, mode, reuse
        )
    if layer_fqns is None and not is_declared_chain(model):
        ordered = _execution_order(fqns, tracer)
        if ordered != fqns:  # a discovered chain runs in the order its forward calls it
            logger.info("%s: layers reordered as the forward runs them", type(model).__name__)
            fqns = ordered
            if isinstance(mode, FakeTensorMode):
                mode = FakeTensorMode(allow_non_fake_inputs=True)
            traced, chain, tracer, fwd_counts, all_counts, copies = _trace_any(
                model, fqns, example_inputs, dtype, loss_fn, mode, reuse
            )

    unused = [fqn for (fqn, _), t in zip(chain, tracer.layers) if t.num_calls == 0]
    if unused:
        logger.warning("layers %s did not run in the forward; their costs are zero", unused)
    root = type(traced).__name__
    last = len(chain) - 1
    seen_params: set[int] = set()
    sp_plans: dict[int, SPPlan] = {}
    # parameters outside every layer (model-level ones) are trained with the first layer's
    # data-parallel group by the executor: counted there
    in_layers = {id(p) for _, module in chain for p in module.parameters()}
    outside = [p for p in traced.parameters() if id(p) not in in_layers]
    holders: dict[int, int] = {}  # parameter -> number of chain layers holding it
    for _, module in chain:
        for p in module.parameters():
            holders[id(p)] = holders.get(id(p), 0) + 1
    tied = {pid for pid, n in holders.items() if n > 1}
    layers: list[Layer] = []
    for i, (fqn, module) in enumerate(chain):
        trace = tracer.layers[i]
        measured = chain[copies.get(i, i)][0]  # a replayed layer reads its representative
        fwd = sum(fwd_counts.get(f"{root}.{measured}", {}).values())
        total = sum(all_counts.get(f"{root}.{measured}", {}).values())
        held = list(module.parameters())
        own = [p for p in held if id(p) not in seen_params]
        if i == 0:
            own += outside
        seen_params |= {id(p) for p in own}
        free = sum(p.numel() for p in own if id(p) in tied or id(p) not in in_layers)
        owned = {id(p) for p in own}
        tied_copies = sum(p.numel() for p in held if id(p) not in owned)
        is_embedding = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in module.modules())
        is_head = i == last and trace.input_last_dim != trace.output_last_dim
        num_params = sum(p.numel() for p in own)
        if is_embedding and i > 0:
            tp = TPPlan(excluded_reason=LATER_EMBEDDING_REASON)
        elif is_embedding or is_head:
            kind = "embedding" if is_embedding else "head"
            tp = vocab_plan(kind, module, fqn, traced, trace, batch, num_params)
        elif i in copies:
            rep = layers[copies[i]]
            tp = TPPlan(
                rep.tp_pairs, rep.tp_divisors, rep.tp_excluded_reason, rep.tp_saved_fraction
            )
        else:
            tp = tp_plan(module, trace, batch)
        # a replayed layer's Linears, attention and saved tensors are its representative's,
        # and so is its sequence-parallel plan (equal structure, equal trace, equal TP plan)
        if i in copies and not (is_embedding or is_head):
            sp = sp_plans[copies[i]]
        else:
            sp = sp_plan(module, trace, tp)
        sp_plans[i] = sp
        saved_bytes = sum(b for b, _ in tracer.layers[copies.get(i, i)].saved.values())
        numbers = {
            "num_params": num_params,
            "param_bytes": sum(p.numel() * p.element_size() for p in own),
            "fwd_flops_per_sample": fwd / batch,
            "bwd_flops_per_sample": (total - fwd) / batch,
            "output_bytes_per_sample": trace.output_bytes / batch,
            "saved_bytes_per_sample": saved_bytes / batch,
            "tp_pairs": tp.pairs,
            "tp_divisors": tp.divisors,
            "tp_excluded_reason": tp.excluded_reason,
            "tp_saved_fraction": tp.saved_fraction,
            "tp_vocab": tp.vocab,
        }
        layers.append(
            Layer(
                fqn=fqn,
                type_name=type(module).__name__,
                cost_key=_cost_key(module, numbers),  # (profile files are keyed by it)
                wgrad_flops_per_sample=_weight_grad_flops(fwd_counts.get(f"{root}.{measured}", {}))
                / batch,
                **numbers,
                sp_seq_dim=sp.seq_dim,
                sp_seq_len=sp.seq_len,
                sp_regions=sp.regions,
                sp_saved_fraction=sp.saved_fraction,
                sp_excluded_reason=sp.excluded_reason,
                sp_replicated_param_bytes=sp.replicated_param_bytes,
                free_params=free,
                tied_copy_params=tied_copies,
            )
        )

    split, split_error = ("chain", None) if is_declared_chain(model) else (None, None)
    if split is None and pipeline_check and len(fqns) > 1:
        split_error = pipeline_split_reason(model, example_inputs, fqns)
        split = "traced" if split_error is None else None
    elif split is None:
        split_error = "not checked (pipeline_check=False)"
    first_input = next(iter(tensors_in(example_inputs)), None)
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
            "pipeline_split": split,
            "pipeline_splittable": split is not None,
            **({"pipeline_split_error": split_error} if split_error else {}),
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
