"""Where the profiler takes its layers from: one layer on the device at a time.

The profiler never puts the whole model on the device, so a model that fits no single device
(built on the meta device, or held on the host) can be profiled. :class:`LayerSource` hands
out private copies of single layers (:meth:`LayerSource.copy`) and captures the inputs the
model's own forward gives its layers (:meth:`LayerSource.capture_inputs`):

- The model itself is never changed or moved.
- **A layer copy** of a meta model is allocated on the device and initialised as the executor
  initialises that init unit under every plan
  (:func:`uniap.executor.materialize.materialize_unit`: the same seed, ``init_weights`` or the
  Hugging Face model's own init); a layer of a real model is copied to the device.
- **Capturing** runs the model's own forward on a *shell*: a copy of the model whose layers
  are placeholders (the deep copy never copies them), with everything outside the layers (a
  rotary table, a norm that is no layer) on the device. Each placeholder, when the forward
  calls it, materialises its layer, runs it on the inputs it got (kept for the layers asked
  for, positional and keyword), and drops it before the next layer runs.

Peak device memory while profiling: the parts outside the layers, the few layer copies one
measuring step holds at once (a plain copy next to its DDP and FSDP versions), the captured
inputs and the activations of one forward, whatever the model's depth.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from uniap._torch_utils import map_tensors, tensors_in
from uniap.errors import ConfigError
from uniap.executor.materialize import (
    default_init,
    fill_unit,
    init_units,
    is_meta,
    materialize_unit,
)
from uniap.profiler.compute import LayerCall, call_model

__all__ = ["LayerSource"]

logger = logging.getLogger(__name__)


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor, at any depth, on ``device``."""
    return map_tensors(lambda t: t.to(device), value)


class _StreamedLayer(nn.Module):
    """A layer's place in the shell: materialised by its :class:`LayerSource` when called,
    dropped right after. Attributes the model reads from the layer outside its forward come
    from the original (meta) layer."""

    def __init__(self, source: LayerSource, fqn: str, original: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_fqn", fqn)
        object.__setattr__(self, "_original", original)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._source._run_streamed(self._fqn, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


class LayerSource:
    """Single layers of ``model`` on ``device``, one at a time (see the module docstring).

    ``layer_fqns``: the model's layers (the graph's chain); ``seed`` and ``init_weights``:
    how layers of a meta model are initialised (as :func:`uniap.parallelize` does)."""

    def __init__(
        self,
        model: nn.Module,
        layer_fqns: Sequence[str],
        device: torch.device,
        *,
        seed: int = 0,
        init_weights: Callable[[nn.Module], None] | None = None,
    ) -> None:
        self.model, self.device, self.seed = model, torch.device(device), seed
        self.layer_fqns = list(layer_fqns)
        self.meta = is_meta(model)
        self._init = init_weights
        self._units: list[str] = []
        if self.meta:
            try:
                self._units = init_units(model, self.layer_fqns)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            self._init = init_weights or default_init(model)
        self._wanted: set[str] = set()
        self._captured: dict[str, LayerCall] = {}
        self._shell: nn.Module | None = None

    def copy(self, fqn: str) -> nn.Module:
        """A private copy of layer ``fqn`` on the device, with real (initialised or copied)
        weights, to time, shard or wrap without touching the model."""
        template = self.model.get_submodule(fqn)
        if not self.meta:
            return copy.deepcopy(template).to(self.device)
        return materialize_unit(
            template,
            self._units.index(fqn),
            device=self.device,
            seed=self.seed,
            init_weights=self._init,
        )

    def capture_inputs(self, fqns: Sequence[str], example_inputs: Any) -> dict[str, LayerCall]:
        """The inputs layers ``fqns`` receive in one no-grad forward of the model on
        ``example_inputs`` (moved to the device), with one layer on the device at a time."""
        if any(t.is_meta for t in tensors_in(example_inputs)):
            raise ConfigError(
                "the example inputs are on the meta device: the profiler runs the model, so "
                "give real inputs (the model itself may stay on the meta device)"
            )
        shell = self._shell_model()
        self._wanted, self._captured = set(fqns), {}
        try:
            with torch.no_grad():
                call_model(shell, to_device(example_inputs, self.device))
            missing = [f for f in fqns if f not in self._captured]
            if missing:
                raise RuntimeError(f"layers {missing} did not run in the model's forward")
            return self._captured
        finally:
            self._wanted, self._captured = set(), {}

    def _run_streamed(self, fqn: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        if fqn in self._wanted and fqn not in self._captured:
            self._captured[fqn] = LayerCall.detached(args, kwargs)
        layer = self.copy(fqn)
        try:
            return layer(*args, **kwargs)
        finally:
            del layer

    def _shell_model(self) -> nn.Module:
        """The model with its layers as :class:`_StreamedLayer` placeholders and the rest on
        the device (built once)."""
        if self._shell is not None:
            return self._shell
        memo: dict[int, Any] = {}
        for fqn in self.layer_fqns:
            original = self.model.get_submodule(fqn)
            memo[id(original)] = _StreamedLayer(self, fqn, original)
        shell = copy.deepcopy(self.model, memo)
        if self.meta:  # the init units outside the layers, in module order (parents first)
            for index in range(len(self.layer_fqns), len(self._units)):
                path = self._units[index]
                fill_unit(
                    shell.get_submodule(path),
                    self.model.get_submodule(path),
                    index,
                    device=self.device,
                    seed=self.seed,
                    init_weights=self._init,
                )
        self._shell = shell.to(self.device).train(self.model.training)
        logger.info(
            "profiling shell: %d layer(s) streamed, %d byte(s) outside them on %s",
            len(self.layer_fqns),
            sum(t.nbytes for t in (*shell.parameters(), *shell.buffers())),
            self.device,
        )
        return self._shell
