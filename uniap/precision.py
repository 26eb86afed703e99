"""Numeric precision of a plan: which dtype parameters compute in, gradients are reduced in,
and the optimizer's master copy is kept in.

``Precision(param_dtype, reduce_dtype, master_dtype)``; the presets:

=============== ============ ============= ============
name            param_dtype  reduce_dtype  master_dtype
=============== ============ ============= ============
``bf16-mixed``  bfloat16     float32       float32
``fp16-mixed``  float16      float32       float32
``fp32``        float32      float32       float32
=============== ============ ============= ============

Mixed precision, as the executor runs it (and the cost model charges it):

* **master** parameters, their gradients and the optimizer state are ``master_dtype``
  (fp32): the model's floating-point parameters are cast to it on the rank that holds them;
* **compute and activations** are ``param_dtype``: the stage's forward and the loss run under
  ``torch.autocast(param_dtype)`` (matmuls and convolutions in bf16, reductions such as
  softmax / norms / cross-entropy in fp32, as autocast decides), so activations, activation
  gradients, TP all-reduces and pipeline sends are ``param_dtype``;
* **FSDP and** ``replicate`` layers: FSDP2's ``MixedPrecisionPolicy(param_dtype,
  reduce_dtype)``: the parameters are all-gathered in ``param_dtype`` (half the bytes of
  fp32), computed with directly, and their gradients are reduce-scattered / all-reduced in
  ``reduce_dtype`` into fp32 shards;
* **classic DDP and TP-only layers** keep fp32 parameters; autocast casts each weight to
  ``param_dtype`` per forward (the copy is saved for backward), their gradients are fp32 and
  DDP all-reduces them in fp32 (= ``reduce_dtype``).

Per parameter that is 4 (master) + 4 (gradient) + 8 (AdamW moments) = 16 bytes, the same as
``2 * 2 + 12`` the cost model charges for a bf16 model with an fp32 master copy.
``fp16-mixed`` is planned like ``bf16-mixed`` but the executor refuses it for now: fp16 needs
a loss scaler with a global inf check, which is not implemented.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from uniap.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "Precision",
    "default_precision",
    "install_autocast",
    "precision_for_dtype",
    "resolve_precision",
]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _dtype_name(value: Any, field: str) -> str:
    name = value if isinstance(value, str) else str(value).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ConfigError(
            f"precision {field} {value!r} is not supported; use one of {sorted(DTYPE_BYTES)}"
        )
    return name


@dataclass(frozen=True)
class Precision:
    """Dtypes of compute, gradient reduction and the master copy (names or torch dtypes)."""

    param_dtype: str = "float32"
    """Dtype parameters are computed with (and of activations): autocast / FSDP2's
    ``param_dtype``."""
    reduce_dtype: str = "float32"
    """Dtype gradients are reduced in over data-parallel groups."""
    master_dtype: str = "float32"
    """Dtype of the stored parameters, their gradients and the optimizer state."""

    def __post_init__(self) -> None:
        for f in ("param_dtype", "reduce_dtype", "master_dtype"):
            object.__setattr__(self, f, _dtype_name(getattr(self, f), f))
        if DTYPE_BYTES[self.master_dtype] < DTYPE_BYTES[self.param_dtype]:
            raise ConfigError(
                f"precision: master_dtype {self.master_dtype} is narrower than param_dtype "
                f"{self.param_dtype}; keep the master copy at least as wide (float32)"
            )

    @property
    def name(self) -> str:
        """The preset's name, or ``custom``."""
        for name, p in PRECISIONS.items():
            if p == self:
                return name
        return "custom"

    @property
    def mixed(self) -> bool:
        """True when compute runs in a narrower dtype than the master copy."""
        return self.param_dtype != self.master_dtype

    @property
    def param_bytes(self) -> int:
        """Bytes of one element in ``param_dtype``."""
        return DTYPE_BYTES[self.param_dtype]

    @property
    def reduce_bytes(self) -> int:
        """Bytes of one element in ``reduce_dtype``."""
        return DTYPE_BYTES[self.reduce_dtype]

    def describe(self) -> str:
        """``bf16-mixed (compute bfloat16, gradient reduction float32, master float32)``."""
        return (
            f"{self.name} (compute {self.param_dtype}, gradient reduction {self.reduce_dtype}, "
            f"master {self.master_dtype})"
        )

    def to_dict(self) -> dict[str, str]:
        """``{name, param_dtype, reduce_dtype, master_dtype}``."""
        return {
            "name": self.name,
            "param_dtype": self.param_dtype,
            "reduce_dtype": self.reduce_dtype,
            "master_dtype": self.master_dtype,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Precision:
        """Inverse of :meth:`to_dict` (``name`` is informative; the dtypes decide)."""
        if isinstance(d, str):
            return resolve_precision(d)
        if not isinstance(d, dict):
            raise ConfigError(f"precision must be a mapping or a name, got {d!r}")
        unknown = sorted(set(d) - {"name", "param_dtype", "reduce_dtype", "master_dtype"})
        if unknown:
            raise ConfigError(
                f"precision: unknown field(s) {unknown}; known: param_dtype, reduce_dtype, "
                "master_dtype, name"
            )
        return cls(
            d.get("param_dtype", "float32"),
            d.get("reduce_dtype", "float32"),
            d.get("master_dtype", "float32"),
        )

    # ---------------------------------------------------------------- torch side
    def torch_dtype(self, field: str = "param_dtype") -> Any:
        """The torch dtype of ``field``."""
        import torch

        return getattr(torch, getattr(self, field))

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """``torch.autocast(device_type, param_dtype)`` when mixed, else a null context."""
        if not self.mixed:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type, dtype=self.torch_dtype())


PRECISIONS: dict[str, Precision] = {
    "bf16-mixed": Precision("bfloat16", "float32", "float32"),
    "fp16-mixed": Precision("float16", "float32", "float32"),
    "fp32": Precision("float32", "float32", "float32"),
}


def resolve_precision(value: Precision | str | None, *, cluster: Any = None) -> Precision:
    """A :class:`Precision` from a preset name or an instance; None: :func:`default_precision`
    of ``cluster`` (``fp32`` without one)."""
    if value is None:
        return default_precision(cluster)
    if isinstance(value, Precision):
        return value
    if isinstance(value, str) and value in PRECISIONS:
        return PRECISIONS[value]
    raise ConfigError(
        f"unknown precision {value!r}; use one of {sorted(PRECISIONS)} or "
        "uniap.Precision(param_dtype=..., reduce_dtype=..., master_dtype=...)"
    )


def precision_for_dtype(dtype: Any) -> Precision:
    """The precision a model in ``dtype`` is planned with when none is given: ``fp32`` for
    float32, else mixed with that compute dtype (fp32 master copy and reduction)."""
    name = _dtype_name(dtype, "dtype")
    return {"float32": PRECISIONS["fp32"], "bfloat16": PRECISIONS["bf16-mixed"]}.get(
        name, PRECISIONS["fp16-mixed"]
    )


def default_precision(cluster: Any) -> Precision:
    """``bf16-mixed`` on a CUDA cluster, ``fp32`` on a CPU one (or without a cluster)."""
    device_type = getattr(cluster, "device_type", None)
    return PRECISIONS["bf16-mixed" if device_type == "cuda" else "fp32"]


def install_autocast(module: Any, precision: Precision, device_type: str) -> None:
    """Run ``module``'s forward under :meth:`Precision.autocast` (forward hooks, so it also
    holds inside a DDP wrapper or a pipeline stage around ``module``, and activation
    checkpointing replays it in backward). No-op when ``precision`` is not mixed."""
    if not precision.mixed:
        return
    active: list[contextlib.AbstractContextManager] = []

    def enter(*_: Any) -> None:
        ctx = precision.autocast(device_type)
        ctx.__enter__()
        active.append(ctx)

    def leave(*_: Any) -> None:
        if active:
            active.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)
