"""Measured compute: forward and backward seconds of each layer, per local batch and TP degree.

Timers: CUDA events on a GPU, ``time.perf_counter`` with a synchronisation on CPU (where the
work is synchronous anyway). Every number is the median of ``repeats`` runs after ``warmup``
runs. A layer is timed on its own (its real input, captured from one forward of the whole
model at that batch), forward with grad enabled, then backward from a fixed output gradient.

At ``tp > 1`` the layer is sharded with the executor's own tensor parallelism
(:func:`uniap.executor.tensor_parallel.apply_tp`) over a real TP group of consecutive ranks,
so the timed pass includes its all-reduces; the cost model adds those separately, so the
collective model's all-reduce time (one per TP pair per pass) is subtracted:
``fwd_s = measured_fwd_s - sum_pairs all_reduce(pair_bytes * b)`` (same for backward),
floored at a fifth of the measured time.

Between measured batches the cost model interpolates piecewise-linearly; beyond them it uses
the least-squares fit ``t(b) = a + slope * b`` (:func:`fit_line`), whose worst relative
residual is reported as ``fit_error``.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from uniap._torch_utils import call_args, map_tensors, tensors_in
from uniap.profiles.fits import fit_line

__all__ = [
    "LayerCall",
    "LayerTiming",
    "Timer",
    "call_model",
    "capture_layer_inputs",
    "resize_batch",
    "time_input_grad",
    "time_layer",
    "time_median_s",
    "time_samples_s",
]

logger = logging.getLogger(__name__)


class Timer:
    """Wall time of a region on ``device``: CUDA events on a GPU, ``perf_counter`` after a
    synchronisation elsewhere. ``with Timer(dev) as t: ...; t.elapsed_s``."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.elapsed_s = float("nan")
        self._cuda = self.device.type == "cuda"

    def __enter__(self) -> Timer:
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._cuda:
            self._end.record()
            self._end.synchronize()
            self.elapsed_s = self._start.elapsed_time(self._end) / 1e3
        else:
            self.elapsed_s = time.perf_counter() - self._t0


def time_samples_s(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 5,
    synchronized: bool = False,
) -> list[float]:
    """Seconds of each of ``repeats`` runs of ``fn()`` after ``warmup`` runs; with
    ``synchronized``, every run starts after a barrier of the default process group (so all
    ranks time the same calls together; every rank must call it)."""
    samples = []
    for i in range(warmup + repeats):
        if synchronized:
            dist.barrier()
        with Timer(device) as t:
            fn()
        if i >= warmup:
            samples.append(t.elapsed_s)
    return samples


def time_median_s(
    fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, repeats: int = 5
) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    return statistics.median(time_samples_s(fn, device, warmup=warmup, repeats=repeats))


@dataclass
class LayerTiming:
    """Measured seconds of one layer at one TP degree, per local batch."""

    batches: list[int] = field(default_factory=list)
    """Local batch sizes measured, ascending."""
    fwd_s: list[float] = field(default_factory=list)
    """Median forward seconds at each batch."""
    bwd_s: list[float] = field(default_factory=list)
    """Median backward seconds at each batch."""

    def fits(self) -> dict[str, list[float]]:
        """``{"fwd": [a, slope, err], "bwd": [...]}``."""
        return {
            "fwd": list(fit_line(self.batches, self.fwd_s)),
            "bwd": list(fit_line(self.batches, self.bwd_s)),
        }


def resize_batch(value: Any, batch: int) -> Any:
    """Every batch-first tensor of ``value`` with dim 0 set to ``batch`` (rows repeated
    cyclically or cut); other values as they are."""

    def resize(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            return t
        idx = torch.arange(batch, device=t.device) % t.shape[0]
        return t.index_select(0, idx).contiguous()

    return map_tensors(resize, value)


@dataclass
class LayerCall:
    """One call of a layer as the model makes it: positional ``args`` and keyword ``kwargs``
    (a Hugging Face decoder layer gets its mask and rotary tables as keywords). Captured
    detached; :meth:`prepared` gives the floating positional inputs ``requires_grad`` (as
    inside a model, so input gradients are computed), keywords (masks, position tables) as
    they are."""

    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: LayerCall | tuple) -> LayerCall:
        """``value`` as a call: a plain tuple is positional inputs."""
        return value if isinstance(value, LayerCall) else cls(tuple(value))

    @classmethod
    def detached(cls, args: tuple, kwargs: dict[str, Any]) -> LayerCall:
        """A copy of a call's inputs that outlives it: tensors detached and cloned, at any
        depth (a tuple of rotary tables)."""
        return cls(_detached(tuple(args)), _detached(dict(kwargs)))

    def prepared(self) -> LayerCall:
        """Fresh leaves for one timed call: floating positional tensors require grad."""
        args = tuple(
            a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
            for a in self.args
        )
        return LayerCall(args, self.kwargs)

    def __call__(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)


def _detached(value: Any) -> Any:
    return map_tensors(lambda t: t.detach().clone(), value)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model`` on example ``inputs`` (:func:`uniap._torch_utils.call_args`) as a training
    step calls it (:func:`uniap.tracing.training_call`)."""
    from uniap.tracing import training_call

    args, kwargs = call_args(inputs)
    return model(*args, **training_call(model, args, kwargs))


def capture_layer_inputs(
    model: nn.Module, fqns: Sequence[str], example_inputs: Any
) -> dict[str, LayerCall]:
    """The inputs (positional and keyword) each layer receives in one no-grad forward of
    ``model``."""
    seen: dict[str, LayerCall] = {}
    handles = []
    for fqn in fqns:

        def hook(module: nn.Module, args: tuple, kwargs: dict, fqn: str = fqn) -> None:
            if fqn not in seen:
                seen[fqn] = LayerCall.detached(args, kwargs)

        handles.append(model.get_submodule(fqn).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [f for f in fqns if f not in seen]
    if missing:
        raise RuntimeError(f"layers {missing} did not run in the model's forward")
    return seen


def _float_tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tensors_in(value) if t.is_floating_point()]


def time_layer(
    module: nn.Module,
    inputs: LayerCall | tuple,
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 5,
) -> tuple[float, float]:
    """Median (forward_s, backward_s) of ``module`` on ``inputs`` (a :class:`LayerCall`, or
    a tuple of positional inputs) and its backward.

    Floating positional inputs require grad (as inside a model, so input gradients are
    computed); the output gradient is a fixed random tensor."""
    call = LayerCall.of(inputs).prepared()
    with torch.enable_grad():
        outs = _float_tensors(call(module))
    grads = [torch.randn_like(o) for o in outs]
    fwd, bwd = [], []
    for i in range(warmup + repeats):
        with Timer(device) as tf, torch.enable_grad():
            outs = [o for o in _float_tensors(call(module))]
        with Timer(device) as tb:
            torch.autograd.backward([o for o in outs if o.requires_grad], grads[: len(outs)])
        if i >= warmup:
            fwd.append(tf.elapsed_s)
            bwd.append(tb.elapsed_s)
    return statistics.median(fwd), statistics.median(bwd)


def time_input_grad(
    module: nn.Module,
    inputs: LayerCall | tuple,
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 5,
) -> float:
    """Median seconds of ``module``'s backward computing only its input gradients
    (``torch.autograd.grad`` with respect to the floating positional inputs): the B of a
    zero-bubble schedule, what torch's ``stage_backward_input`` computes; the backward of
    :func:`time_layer` less this is the weight gradients' W. 0 when no input takes a gradient
    (an embedding: its whole backward is W)."""
    call = LayerCall.of(inputs).prepared()
    leaves = [a for a in call.args if isinstance(a, torch.Tensor) and a.requires_grad]
    if not leaves:
        return 0.0
    with torch.enable_grad():
        outs = _float_tensors(call(module))
    grads = [torch.randn_like(o) for o in outs]
    times = []
    for i in range(warmup + repeats):
        with torch.enable_grad():
            outs = _float_tensors(call(module))
        live = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
        with Timer(device) as tb:
            torch.autograd.grad(
                [o for o, _ in live], leaves, [g for _, g in live], allow_unused=True
            )
        if i >= warmup:
            times.append(tb.elapsed_s)
    return statistics.median(times)


def layer_copy(model: nn.Module, fqn: str, device: torch.device) -> nn.Module:
    """A private copy of layer ``fqn`` on ``device`` (to shard without touching the model)."""
    return copy.deepcopy(model.get_submodule(fqn)).to(device)
