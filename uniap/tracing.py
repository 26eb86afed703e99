"""The meta-device trace's machinery: copies of a model and its inputs on meta (or fake)
tensors, attention traced as a fused kernel, and the hooks that attribute outputs, saved
tensors, Linear calls and head counts to the chain layer running.

:func:`uniap.graph.build_graph` drives one forward and backward through these; the
tensor-parallel pairs are read from what :class:`Tracer` recorded (:mod:`uniap.tp_pairs`).
Nothing here allocates real weights.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from uniap._torch_utils import call_args, map_tensors, storage_key, tensors_in
from uniap.errors import UniapError

__all__ = [
    "FUSED_SDPA_FLOPS",
    "FusedAttentionMode",
    "LayerReuse",
    "LayerTrace",
    "LinearCall",
    "NotReusableError",
    "Tracer",
    "default_loss",
    "fake_copy",
    "fake_inputs",
    "mixes_positions",
    "pipeline_split_reason",
    "structure_key",
    "training_call",
]

logger = logging.getLogger(__name__)


def fake_copy(model: nn.Module, dtype: torch.dtype, fake_mode: FakeTensorMode) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are fake meta tensors (shared
    parameters stay shared, floating ones trainable and cast to ``dtype``); real weights are
    never read or copied."""

    def fake(t: Tensor) -> Tensor:
        dt = dtype if t.is_floating_point() else t.dtype
        if t.is_contiguous():  # empty_like goes through Python references: 15 times slower
            return fake_mode.from_tensor(torch.empty(t.shape, dtype=dt, device="meta"))
        return fake_mode.from_tensor(torch.empty_like(t, device="meta", dtype=dt))

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(fake(p), requires_grad=p.is_floating_point())
    for b in model.buffers():
        memo[id(b)] = fake(b)
    return _deepcopy_module(model, memo)


_SHARED_AS_IS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
"""Immutable values, which ``copy.deepcopy`` returns as they are."""


def _deepcopy_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module, memo)``, four times faster on a module tree (a 128-layer Llama on
    meta: 0.11 -> 0.025 s): a module that
    copies itself the default way (``nn.Module``'s ``__getstate__`` / ``__setstate__``, no
    ``__deepcopy__``, ``__reduce__`` or slots of its own) is rebuilt here, its submodules
    recursively and its empty hook dictionaries new and empty, without ``deepcopy``'s
    reduce-and-reconstruct round per dictionary; every other value (and any other module) goes
    through ``copy.deepcopy`` with the same ``memo``, so what is shared stays shared."""
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if (
        cls.__getstate__ is not nn.Module.__getstate__
        or cls.__setstate__ is not nn.Module.__setstate__
        or cls.__reduce_ex__ is not object.__reduce_ex__
        or cls.__reduce__ is not object.__reduce__
        or hasattr(cls, "__deepcopy__")
        or hasattr(cls, "__slots__")
    ):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for k, v in module.__dict__.items():
        kind = type(v)
        if k == "_modules":
            state[k] = kind(
                (n, None if m is None else _deepcopy_module(m, memo)) for n, m in v.items()
            )
        elif kind in _SHARED_AS_IS:
            state[k] = v
        elif kind in (dict, OrderedDict, set) and not v:
            state[k] = kind()
        else:
            state[k] = copy.deepcopy(v, memo)
    new.__setstate__(state)
    return new


def fake_inputs(obj: Any, batch: int, dtype: torch.dtype, fake_mode: FakeTensorMode) -> Any:
    """Fake meta tensors of the inputs' dtypes and shapes, with dim 0 (the batch) set to
    ``batch``; floating inputs are cast to ``dtype``."""

    def fake(t: Tensor) -> Tensor:
        shape = (batch, *t.shape[1:]) if t.dim() else t.shape
        dt = dtype if t.is_floating_point() else t.dtype
        return fake_mode.from_tensor(torch.empty(shape, dtype=dt, device="meta"))

    return map_tensors(fake, obj)


def _fused_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _fused_sdpa_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_FUSED_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FUSED_SDPA_FLOPS = {
    _FUSED_SDPA: _fused_sdpa_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _fused_sdpa_backward_flop,
}


class FusedAttentionMode(TorchFunctionMode):
    """Reroutes ``F.scaled_dot_product_attention`` to the fused (flash) kernel during the meta
    trace (meta tensors would otherwise take the unfused math path, which saves the
    probabilities) and reports the query / key-value head counts of every call. ``on_call``,
    when given, sees every other torch function call (the outermost ones: the mode is off
    inside them) with its arguments and output."""

    def __init__(
        self,
        on_heads: Callable[[int, int, int], None],
        on_call: Callable[[Any, tuple, dict, Any], None] | None = None,
    ) -> None:
        super().__init__()
        self.on_heads = on_heads
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            out = func(*args, **kwargs)
            if self.on_call is not None:
                self.on_call(func, args, kwargs, out)
            return out
        if self.on_call is not None:
            self.on_call(func, args, kwargs, None)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        call = {**dict(zip(names, args)), **kwargs}
        q, k, v = call["query"], call["key"], call["value"]
        if q.dim() < 3:
            return func(*args, **kwargs)
        self.on_heads(q.shape[-3], k.shape[-3], q.shape[-2])
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


_POSITION_WISE = frozenset(
    """linear layer_norm rms_norm group_norm dropout dropout1d alpha_dropout gelu silu relu
    relu6 leaky_relu elu selu celu mish hardswish hardsigmoid hardtanh sigmoid tanh softplus
    softsign logsigmoid glu add sub mul div true_divide floor_divide pow neg abs exp exp2 expm1
    log log1p log2 sqrt rsqrt square reciprocal sin cos erf erfc clamp clamp_min clamp_max clip
    sign lerp addcmul addcdiv where masked_fill maximum minimum fmax fmin to type float half
    bfloat16 double contiguous clone detach detach_ requires_grad_ add_ sub_ mul_ div_ pow_
    neg_ clamp_ masked_fill_ copy_ fill_ zero_ __add__ __radd__ __iadd__ __sub__ __rsub__
    __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ __itruediv__ __floordiv__
    __pow__ __rpow__ __neg__ __pos__ __abs__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __and__
    __or__ __invert__ __set__ __len__ __format__ __repr__ size dim ndimension numel
    element_size is_floating_point is_contiguous stride storage_offset data_ptr type_as
    view_as reshape_as expand_as float_power register_hook retain_grad __hash__ __deepcopy__
    untyped_storage""".split()
)
"""Calls that act on each position of dimension 1 apart (elementwise, or along the last
dimension: norms, Linears), and calls that read a tensor's metadata or hook its gradient."""

_DIM_ARG: dict[str, tuple[int, int | None]] = {
    **dict.fromkeys(
        """sum mean amax amin max min var std norm logsumexp softmax log_softmax cumsum cumprod
        argmax argmin prod all any count_nonzero narrow select flip""".split(),
        (1, None),
    ),
    **dict.fromkeys("cat concat concatenate stack unbind".split(), (1, 0)),
    **dict.fromkeys("split chunk split_with_sizes".split(), (2, 0)),
    "roll": (2, None),
}
"""Calls along the dimensions their ``dim`` argument names (its position, and its default;
None: every dimension): position-wise when each of them is past the first two."""


def mixes_positions(
    func: Any, args: tuple, kwargs: dict, out: Any, lead: tuple[int, ...]
) -> str | None:
    """The name of the call ``func(*args, **kwargs) -> out`` when it may mix the positions
    along dimension 1 of a tensor whose first two dimensions are ``lead`` (the batch and the
    sequence of a layer's input), None when it acts on every position apart or touches no such
    tensor. Conservative: a call it does not know counts as mixing. Sequence parallelism
    (:mod:`uniap.sp_plan`) shards that dimension between the layer's regions, where such a
    call would make DTensor gather it (communication the cost model does not charge)."""
    lead = tuple(lead)
    stream = [t for t in tensors_in([args, kwargs]) if tuple(t.shape[:2]) == lead]
    if not stream:
        return None
    name = getattr(func, "__name__", None) or repr(func)
    if name in _POSITION_WISE:
        return None
    ndim = stream[0].dim()
    outs = [t for t in tensors_in(out) if t.dim() >= 2]
    if name in _DIM_ARG:
        at, default = _DIM_ARG[name]
        if name in ("max", "min") and len(args) > 1 and isinstance(args[1], Tensor):
            return None  # elementwise maximum / minimum
        dims = kwargs.get("dim", kwargs.get("dims", kwargs.get("axis")))
        if dims is None:
            dims = args[at] if len(args) > at else default
        if dims is None or not isinstance(dims, int | tuple | list):
            return name
        dims = [dims] if isinstance(dims, int) else list(dims)
        return None if all(isinstance(d, int) and d % ndim >= 2 for d in dims) else name
    if name == "__get__":  # an attribute: metadata, or a tensor (``.mT`` swaps dims 1 and 2)
        if all(tuple(t.shape[:2]) == lead for t in outs):
            return None
        return str(getattr(getattr(func, "__self__", None), "__name__", name))
    if name in ("view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "expand"):
        return None if outs and tuple(outs[0].shape[:2]) == lead else name
    if name in ("transpose", "swapaxes", "swapdims"):
        dims = [a for a in args[1:] if isinstance(a, int)]
        return None if len(dims) == 2 and all(d % ndim >= 2 for d in dims) else name
    if name == "permute":
        perm = args[1] if len(args) == 2 and isinstance(args[1], tuple | list) else args[1:]
        return None if [p % ndim for p in perm][:2] == [0, 1] else name
    if name in ("__getitem__", "__setitem__"):
        key = args[1] if len(args) > 1 else None
        key = key if isinstance(key, tuple) else (key,)
        if key and key[0] is Ellipsis:
            past = [k for k in key[1:] if k is not None]
            ok = len(past) <= ndim - 2 and not any(isinstance(k, Tensor) for k in past)
        else:
            full = [isinstance(k, slice) and k == slice(None) for k in key[:2]]
            ok = len(full) == 2 and all(full) and not any(isinstance(k, Tensor) for k in key)
        return None if ok else name
    if name in ("matmul", "__matmul__", "bmm", "mm"):
        other = args[1] if len(args) > 1 else None
        return None if isinstance(other, Tensor) and other.dim() <= 2 else name
    return name


def default_loss(output: Any) -> Tensor:
    """Sum of every floating output that requires grad: the backward FLOPs of the layers are
    those of any real loss (loss functions themselves do no matmuls)."""
    parts = [
        t.float().sum() for t in tensors_in(output) if t.is_floating_point() and t.requires_grad
    ]
    if not parts:
        raise UniapError(
            "the model output has no floating tensor that requires grad; pass loss_fn=..."
        )
    return torch.stack(parts).sum()


# --------------------------------------------------------------------------------------------
# The trace
# --------------------------------------------------------------------------------------------


@dataclass
class LinearCall:
    """One nn.Linear call inside a layer during the trace."""

    fqn: str
    module: nn.Linear
    input: Tensor
    start_event: int
    output: Tensor | None = None
    end_event: int = -1
    num_calls: int = 1


@dataclass
class LayerTrace:
    """What the hooks saw of one chain layer."""

    input_nodes: set = field(default_factory=set)
    input_last_dim: int | None = None
    input_shape: tuple[int, ...] = ()
    """Shape of the layer's first tensor input (first call)."""
    output_nodes: list = field(default_factory=list)
    output_last_dim: int | None = None
    output_bytes: int = 0
    saved: dict[int, tuple[int, int]] = field(default_factory=dict)
    """storage id -> (bytes, event index), first save only."""
    linears: list[LinearCall] = field(default_factory=list)
    heads: set[int] = field(default_factory=set)
    attention_lengths: set[int] = field(default_factory=set)
    """Query lengths of the attention calls inside the layer."""
    num_calls: int = 0
    first_event: int | None = None
    """Event index of the layer's first call (None: never called)."""
    extra_input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    """Shapes of the floating tensors passed to the layer besides its first input (masks,
    attention biases, rotary tables), first call."""
    position_mixing: list[tuple[int, str]] = field(default_factory=list)
    """``(event, name)`` of the calls that may mix the positions of dimension 1 of a tensor
    led by the layer's input's first two dimensions (:func:`mixes_positions`), first call of
    the layer only."""


class Tracer:
    """Hooks that attribute outputs, saved tensors, Linear calls and attention heads to the
    chain layer currently running."""

    def __init__(self, chain: list[tuple[str, nn.Module]], excluded_storages: set[int]) -> None:
        self.chain = chain
        self.excluded = excluded_storages
        self.layers = [LayerTrace() for _ in chain]
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
        tensors = tensors_in(list(args)) + tensors_in(kwargs)
        trace.num_calls += 1
        if trace.num_calls == 1:
            trace.first_event = self._tick()
            floats = [t for t in tensors[1:] if t.is_floating_point()]
            trace.extra_input_shapes = [tuple(t.shape) for t in floats]
        trace.input_nodes |= {t.grad_fn for t in tensors if t.grad_fn is not None}
        if tensors and trace.input_last_dim is None and tensors[0].dim():
            trace.input_last_dim = tensors[0].shape[-1]
            trace.input_shape = tuple(tensors[0].shape)
        self.stack.append(i)

    def _exit(self, i: int, module, args, output) -> None:
        trace = self.layers[i]
        tensors = tensors_in(output)
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
            trace.linears.append(LinearCall(rel, module, args[0], self._tick()))

    def _linear_post(self, i: int, module, args, output) -> None:
        for call in self.layers[i].linears:
            if call.module is module and call.output is None and isinstance(output, Tensor):
                call.output, call.end_event = output, self._tick()

    def pack(self, t: Tensor) -> Tensor:
        if self.stack:
            key, nbytes = storage_key(t)
            saved = self.layers[self.stack[-1]].saved
            if key not in self.excluded and key not in saved:
                saved[key] = (nbytes, self._tick())
        return t

    def on_call(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Records a call of the running layer's first call that may mix positions."""
        if not self.stack:
            return
        trace = self.layers[self.stack[-1]]
        if trace.num_calls != 1 or len(trace.input_shape) != 3:
            return
        name = mixes_positions(func, args, kwargs, out, trace.input_shape[:2])
        if name is not None:
            trace.position_mixing.append((self._tick(), name))

    def on_heads(self, q_heads: int, kv_heads: int, q_len: int = 0) -> None:
        if self.stack:
            self.layers[self.stack[-1]].heads |= {q_heads, kv_heads}
            if q_len:
                self.layers[self.stack[-1]].attention_lengths.add(int(q_len))


_INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx"})
"""Attributes that number a layer in its stack: ignored when comparing two layers (they key
the generation cache, off in training; an attribute derived from the index, such as a
sliding-window flag, is compared)."""

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _leaf_key(value: Any) -> Any:
    """A comparable stand-in for an attribute or input value: primitives by value, tensors by
    shape, dtype and grad requirement, containers element-wise, any other object by identity
    (two distinct objects never compare equal: conservative)."""
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.requires_grad, value.stride())
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return (type(value).__name__, value)
    if isinstance(value, Mapping):
        return ("map", tuple((repr(k), _leaf_key(v)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_leaf_key(v) for v in value))
    return ("object", type(value).__qualname__, id(value))


def _hook_names(module: nn.Module) -> tuple:
    return tuple(
        getattr(h, "__qualname__", type(h).__qualname__)
        for name in _HOOK_DICTS
        for h in getattr(module, name, {}).values()
    )


def structure_key(layer: nn.Module) -> tuple:
    """Everything a meta trace of ``layer`` can depend on besides its inputs: per submodule its
    name, class, hooks and plain attributes (layer indices aside), its parameters' and
    buffers' shapes and dtypes (values are never read on meta tensors). Layers of a stack
    built from one class and config (the decoder blocks of an LLM) have equal keys."""
    parts: list = []
    for rel, sub in layer.named_modules():
        attrs = tuple(
            (k, _leaf_key(v))
            for k, v in sorted(vars(sub).items())
            if not k.startswith("_") and k not in _INDEX_ATTRS
        )
        tensors = tuple(
            (k, tuple(t.shape), t.dtype, t.requires_grad)
            for k, t in [*sub._parameters.items(), *sub._buffers.items()]
            if t is not None
        )
        forward = getattr(sub.forward, "__func__", sub.forward)
        parts.append((rel, type(sub).__qualname__, id(forward), _hook_names(sub), attrs, tensors))
    return tuple(parts)


class NotReusableError(Exception):
    """A layer that was replayed turned out not to be a copy of its representative."""


@dataclass
class LayerReuse:
    """Replays layers that are copies of an earlier one during the trace.

    A chain layer whose :func:`structure_key` and input signature (shapes, dtypes, grad
    requirements of its tensor inputs; other inputs by value or identity) equal those of a
    layer traced earlier, its *representative*, does not run: it returns fresh tensors of the
    representative's output shapes, joined for autograd to its inputs (or, when none needs a
    gradient, its first parameter) by :class:`_Replay`, so that autograd reaches the layers
    before it exactly as the real layer would. Its
    FLOPs, bytes and TP plan are the representative's (:attr:`copies`); the trace costs one
    run of each distinct layer instead of one per layer. :meth:`check` confirms after the
    trace that every replayed layer and its representative ran exactly once.
    """

    chain: list[tuple[str, nn.Module]]
    copies: dict[int, int] = field(default_factory=dict)
    """Index of a replayed layer -> index of its representative."""

    def __post_init__(self) -> None:
        self._keys = [structure_key(module) for _, module in self.chain]
        self._seen: dict[tuple, tuple[int, Any]] = {}
        self._calls = [0] * len(self.chain)
        for i, (_, module) in enumerate(self.chain):
            module.forward = partial(self._forward, i, module.forward)

    def remove(self) -> None:
        for _, module in self.chain:
            vars(module).pop("forward", None)

    def _forward(self, i: int, forward: Callable, *args, **kwargs) -> Any:
        self._calls[i] += 1
        key = (self._keys[i], _leaf_key(list(args)), _leaf_key(kwargs))
        hit = self._seen.get(key)
        if hit is None or hit[0] == i or self._calls[i] > 1:
            output = forward(*args, **kwargs)
            self._seen.setdefault(key, (i, output))
            return output
        rep, output = hit
        self.copies[i] = rep
        anchors = [t for t in tensors_in([args, kwargs]) if t.requires_grad]
        if not anchors:  # outputs that need grad hang on the layer's first trainable parameter
            anchors = [p for p in self.chain[i][1].parameters() if p.requires_grad][:1]
        return _fresh_like(output, anchors)

    def check(self) -> None:
        """Raise :class:`NotReusableError` when a replayed layer or its representative ran more
        than once (a layer called twice costs twice what its representative measured)."""
        for i, rep in self.copies.items():
            if self._calls[i] != 1 or self._calls[rep] != 1:
                raise NotReusableError(f"layer {self.chain[i][0]} ran {self._calls[i]} times")


class _Replay(torch.autograd.Function):
    """Fresh tensors of given shapes that depend on ``anchors`` for autograd: backward hands
    each anchor that is an activation a zero gradient of its shape (so the layers before run
    their backward as they would), none to a parameter. Two ops per replayed layer where
    arithmetic on the anchors would take a dozen, each through the trace's dispatch modes."""

    @staticmethod
    def forward(ctx, spec: list, *anchors: Tensor) -> tuple[Tensor, ...]:
        ctx.shapes = [(a.shape, a.dtype, a.device, isinstance(a, nn.Parameter)) for a in anchors]
        outs = tuple(torch.empty(shape, dtype=dt, device=dev) for shape, dt, dev, _ in spec)
        ctx.mark_non_differentiable(*(o for o, sp in zip(outs, spec) if not sp[3]))
        return outs

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple:
        return (
            None,
            *(
                None if is_param else torch.zeros(shape, dtype=dt, device=dev)
                for shape, dt, dev, is_param in ctx.shapes
            ),
        )


def _fresh_like(obj: Any, anchors: list[Tensor]) -> Any:
    """``obj`` with every tensor replaced by a new one of its shape and dtype (on its own
    storage); those that required grad depend on ``anchors`` (:class:`_Replay`)."""
    found = tensors_in(obj)
    spec = [
        (t.shape, t.dtype, t.device, bool(t.requires_grad and t.is_floating_point())) for t in found
    ]
    if any(t.requires_grad for t in found):
        if not anchors or not all(sp[3] for sp, t in zip(spec, found) if t.requires_grad):
            raise NotReusableError("a replayed output needs grad but has no input to carry it")
        fresh = iter(_Replay.apply(spec, *anchors))
    else:
        fresh = iter(torch.empty(sp[0], dtype=sp[1], device=sp[2]) for sp in spec)
    return map_tensors(lambda _: next(fresh), obj)


def training_call(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for a training forward: a Hugging Face model returns its generation cache by
    default (``use_cache``), which is no training output and no tensor a tracer can carry, so
    ``use_cache=False`` is added when the forward takes it and the call does not set it (the
    loss and logits are unchanged)."""
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    if "use_cache" in params and "use_cache" not in kwargs:
        index = params.index("use_cache")
        if index >= len(args):
            return {**kwargs, "use_cache": False}
    return kwargs


def pipeline_split_reason(
    model: nn.Module, example_inputs: Any, layer_fqns: list[str]
) -> str | None:
    """Why ``model``'s own forward cannot be split into pipeline stages in front of any of its
    layers, or None when it can: ``torch.export`` traces it (on meta tensors, nothing is
    computed) and its layers run one after the other, each once, in ``layer_fqns`` order (so
    every contiguous group of layers is one piece of the forward)."""
    args, kwargs = call_args(example_inputs)
    meta = copy.deepcopy(model).to("meta")

    def to_meta(t: Tensor) -> Tensor:
        return torch.empty_like(t, device="meta")

    args = tuple(to_meta(a) if isinstance(a, Tensor) else a for a in args)
    kwargs = {k: to_meta(v) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
    kwargs = training_call(meta, args, kwargs)
    try:
        ep = torch.export.export(meta, args, kwargs)
    except Exception as e:  # noqa: BLE001 - any tracer failure is the reason
        first = (str(e).strip().splitlines() or [""])[0][:240]
        return f"torch.export cannot trace its forward ({type(e).__name__}: {first})"
    order: list[int] = []
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [str(v[0]) for v in stack.values()]
        u = next(
            (i for i, f in enumerate(layer_fqns) for p in paths if p == f or p.startswith(f + ".")),
            None,
        )
        if u is not None and (not order or order[-1] != u):
            order.append(u)
    for a, b in zip(order, order[1:]):
        if b < a:
            return (
                f"its layers do not run one after the other: {layer_fqns[b]} runs after "
                f"{layer_fqns[a]}"
            )
    if len(order) != len(set(order)):
        again = next(u for u in order if order.count(u) > 1)
        return f"layer {layer_fqns[again]} runs more than once, interleaved with other layers"
    return None
