"""The measured profile: numbers from real runs, saved as YAML, refused when stale.

A :class:`MeasuredProfile` answers the cost model's questions from measurements
(:mod:`uniap.profiler.collect` makes one):

- ``layer_compute_s(layer, b, tp)``: the layer's measured forward / backward seconds (looked up
  by ``layer.cost_key``: layers of equal shape share one measurement) at TP degree ``tp``,
  piecewise-linear between the measured local batches, the fit ``a + slope * b`` beyond;
  then ``compute_scale * t + layer_overhead_s / 2`` per pass (``layer_overhead_s`` calibrated).
- ``collective_s(op, S, ranks)``: ``comm_scale *`` the measured time of the group's shape
  (size, intra/inter node, consecutive/strided), interpolated between measured sizes.
- ``dp_residual_s(layer, kind, phase)``: what the executor's DDP / FSDP wrapping of the layer
  costs beyond the cost model's collective terms, measured.
- ``optimizer_step_s(n, layer, dtensor)``: the layer's measured AdamW fixed cost (plain or
  DTensor parameters) ``+ optimizer_s_per_param * n``.
- ``loss_s(layer, b, tp)``, ``loss_working_bytes(layer, b, tp)``: measured seconds and bytes
  of the loss's forward and backward at the last layer; for a vocabulary-parallel head at
  ``tp > 1`` measured at that degree under ``loss_parallel()`` (else the tp = 1 numbers
  ``/ tp``).
- ``activation_bytes(layer, b, tp)``: measured saved-for-backward bytes, interpolated.
- ``weight_grad_s(layer, b, tp)``: the weight-gradient part of the backward (zero-bubble
  schedules), measured when the file has it (``wgrad_s``: the backward less one computing the
  input gradients only); files without it (every file written before it existed) get the
  backward's FLOP share (:func:`uniap.profiles.analytic.weight_grad_fraction`), said once in an
  INFO line.
- ``overlap_coefficient``: measured (:mod:`uniap.profiler.overlap`).

The file records the model (name, signature, dtype, sample shape, layer FQNs), the hardware
(device type and name, world size, devices per node, backend, threads) and the library
versions; :meth:`MeasuredProfile.check_compatible` raises a ``ConfigError`` naming every field
that differs from the model and cluster being planned (a stale profile).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uniap.cluster import Cluster
from uniap.errors import ConfigError
from uniap.graph import Layer, ModelGraph
from uniap.profiles.analytic import COLLECTIVES, Profile, loss_parallel_bytes, loss_tp_share
from uniap.profiles.fits import CollectiveFit, fit_line, group_shape_key, interpolate

__all__ = ["LayerProfile", "MeasuredProfile", "cpu_name", "hardware_info", "library_versions"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2


def library_versions() -> dict[str, str]:
    """Versions that change measured numbers: uniap and torch."""
    import torch

    from uniap._version import __version__

    return {"uniap": __version__, "torch": torch.__version__.split("+")[0]}


def hardware_info(
    *, world_size: int, devices_per_node: int, backend: str, device_type: str
) -> dict[str, Any]:
    """What identifies the machine a profile was measured on."""
    import torch

    if device_type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = cpu_name()
    return {
        "device_type": device_type,
        "device_name": name,
        "world_size": world_size,
        "devices_per_node": devices_per_node,
        "backend": backend,
        "threads_per_rank": torch.get_num_threads(),
    }


def cpu_name() -> str:
    """This machine's CPU model (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class LayerProfile:
    """Measurements of one layer shape (every layer with this ``cost_key``)."""

    fqns: list[str]
    """Layers that share these numbers; the first one was measured."""
    batches: list[int]
    """Local batch sizes measured, ascending."""
    fwd_s: dict[int, list[float]] = field(default_factory=dict)
    """TP degree -> median forward seconds per batch (TP all-reduces subtracted)."""
    bwd_s: dict[int, list[float]] = field(default_factory=dict)
    """TP degree -> median backward seconds per batch (TP all-reduces subtracted)."""
    activation_bytes: dict[int, list[float]] = field(default_factory=dict)
    """TP degree -> bytes saved for backward per batch."""
    sp_activation_bytes: dict[int, list[float]] = field(default_factory=dict)
    """TP degree -> bytes saved for backward per batch with sequence parallelism (layers that
    support it; absent in profiles measured before it was)."""
    wgrad_s: dict[int, list[float]] = field(default_factory=dict)
    """TP degree -> median seconds of the backward's weight gradients per batch (empty: not
    measured)."""
    state_bytes: dict[int, dict[str, int]] = field(default_factory=dict)
    """TP degree -> ``param_bytes``, ``grad_bytes``, ``optimizer_bytes`` of the local shard."""
    dp_residual_s: dict[str, dict[str, float]] = field(default_factory=dict)
    """Kind (``DDP``/``FSDP``) -> phase -> seconds the executor's data-parallel wrapping of
    this layer costs beyond what the cost model's collective terms charge, measured over the
    whole world (may be negative where the terms over-charge): ``microbatch`` (a forward +
    backward without gradient sync), ``sync`` (the extra of the synchronising backward, less
    ``all_reduce`` for DDP or ``all_gather + reduce_scatter`` for FSDP: a lone layer has no
    backward after it to hide its sync, see :mod:`uniap.cost_model`) and, FSDP only,
    ``single`` (a forward + backward resharding after forward, as with one micro-batch, less
    ``(1 - rho) * 2 all_gather + reduce_scatter``)."""
    optimizer_s: dict[str, float] = field(default_factory=dict)
    """AdamW step seconds over the layer's parameters: ``plain`` tensors, and ``dtensor``:
    the shards FSDP2 holds over the whole world (DTensor dispatch per tensor)."""
    loss_s: list[float] = field(default_factory=list)
    """Last layer only, per batch: seconds of the loss's forward + backward on its output."""
    loss_working_bytes: list[float] = field(default_factory=list)
    """Last layer only, per batch: peak bytes beyond its state, input and saved activations
    while its output goes through the loss and back (output, the loss's saved tensors,
    gradient buffers)."""
    loss_tp: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    """A vocabulary-parallel head only: TP degree > 1 -> ``loss_s`` and
    ``loss_working_bytes`` per batch, measured with the head sharded on a real TP group and
    the loss under ``loss_parallel()`` (its all-reduces included, as in the layer times)."""

    def fit(self, which: str, tp: int) -> tuple[float, float, float]:
        """``(a, slope, worst relative residual)`` of ``which`` (fwd_s, bwd_s,
        activation_bytes) at ``tp`` over the measured batches."""
        return fit_line(self.batches, getattr(self, which)[tp])

    def value(self, which: str, batch: float, tp: int) -> float:
        """``which`` at local ``batch`` and ``tp``, interpolated (see the module docstring)."""
        ys = getattr(self, which)[tp]
        a, slope, _ = self.fit(which, tp)
        return interpolate(batch, self.batches, ys, (a, slope))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"fqns": list(self.fqns), "batches": list(self.batches)}
        for name in ("fwd_s", "bwd_s", "activation_bytes", "sp_activation_bytes", "wgrad_s"):
            if name in ("sp_activation_bytes", "wgrad_s") and not getattr(self, name):
                continue  # profiles without SP layers or a weight-gradient split stay as they were
            d[name] = {
                f"tp{tp}": [float(v) for v in vs] for tp, vs in sorted(getattr(self, name).items())
            }
        d["state_bytes"] = {f"tp{tp}": dict(v) for tp, v in sorted(self.state_bytes.items())}
        d["dp_residual_s"] = {
            k: {ph: float(v) for ph, v in sorted(r.items())}
            for k, r in sorted(self.dp_residual_s.items())
        }
        d["optimizer_s"] = {k: float(v) for k, v in sorted(self.optimizer_s.items())}
        d["loss_s"] = [float(v) for v in self.loss_s]
        d["loss_working_bytes"] = [float(v) for v in self.loss_working_bytes]
        if self.loss_tp:
            d["loss_tp"] = {
                f"tp{tp}": {k: [float(v) for v in vs] for k, vs in sorted(m.items())}
                for tp, m in sorted(self.loss_tp.items())
            }
        d["fit"] = {
            f"tp{tp}": {
                name: dict(zip(("a", "slope", "error"), (float(x) for x in self.fit(name, tp))))
                for name in ("fwd_s", "bwd_s")
            }
            for tp in sorted(self.fwd_s)
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerProfile:
        def by_tp(m: dict[str, Any]) -> dict[int, Any]:
            return {int(k.removeprefix("tp")): v for k, v in (m or {}).items()}

        return cls(
            fqns=list(d["fqns"]),
            batches=[int(b) for b in d["batches"]],
            fwd_s=by_tp(d["fwd_s"]),
            bwd_s=by_tp(d["bwd_s"]),
            activation_bytes=by_tp(d.get("activation_bytes")),
            sp_activation_bytes=by_tp(d.get("sp_activation_bytes")),
            wgrad_s=by_tp(d.get("wgrad_s")),
            state_bytes=by_tp(d.get("state_bytes")),
            dp_residual_s={
                str(k): {str(ph): float(v) for ph, v in r.items()}
                for k, r in (d.get("dp_residual_s") or {}).items()
            },
            optimizer_s={str(k): float(v) for k, v in (d.get("optimizer_s") or {}).items()},
            loss_s=[float(v) for v in d.get("loss_s") or []],
            loss_working_bytes=[float(v) for v in d.get("loss_working_bytes") or []],
            loss_tp={
                tp: {str(k): [float(v) for v in vs] for k, vs in m.items()}
                for tp, m in by_tp(d.get("loss_tp")).items()
            },
        )


_CALIBRATION_DEFAULTS = {"compute_scale": 1.0, "comm_scale": 1.0, "layer_overhead_s": 0.0}


@dataclass
class MeasuredProfile(Profile):
    """A profile measured on real hardware (see the module docstring)."""

    model: dict[str, Any]
    """``name``, ``signature``, ``dtype``, ``sample_shape``, ``layers`` (FQNs)."""
    hardware: dict[str, Any]
    """See :func:`hardware_info`."""
    versions: dict[str, str]
    """See :func:`library_versions`."""
    layers: dict[str, LayerProfile]
    """``cost_key`` -> measurements."""
    collectives: dict[str, dict[str, CollectiveFit]]
    """Collective -> group shape key -> fit."""
    overlap_coefficient: float = 0.0
    """Measured fraction of gradient synchronisation hidden behind backward."""
    overlap: dict[str, float] = field(default_factory=dict)
    """The overlap measurement (compute_s, comm_s, both_s, raw)."""
    pipeline_overhead_s: float = 0.0
    """Measured seconds a pipeline stage spends per micro-batch on the schedule itself
    (:mod:`uniap.profiler.pipeline`)."""
    tp_comm_in_compute: bool = True
    """The TP layer times were measured on a real TP group and include the layer's TP
    collectives (profiles written before this field: False, the collectives were
    subtracted)."""
    optimizer_a_s: float = 0.0
    """Fixed seconds per optimizer call (per layer)."""
    optimizer_s_per_param: float = 0.0
    """Seconds per local parameter of an AdamW step."""
    calibration: dict[str, float] = field(default_factory=lambda: dict(_CALIBRATION_DEFAULTS))
    """Correction coefficients fitted from measured steps (:func:`uniap.calibrate`):
    ``compute_scale``, ``comm_scale``, ``layer_overhead_s``."""
    settings: dict[str, Any] = field(default_factory=dict)
    """How it was measured (warm-up, repeats, batches, TP degrees, wall time)."""
    source: str = "measured"

    # ------------------------------------------------------------------ Profile
    def _layer(self, layer: Layer) -> LayerProfile:
        lp = self.layers.get(layer.cost_key)
        if lp is None:
            raise ConfigError(
                f"the measured profile has no numbers for layer {layer.fqn!r} (cost key "
                f"{layer.cost_key}); re-run `uniap profile` for this model"
            )
        return lp

    def layer_compute_s(self, layer: Layer, batch: float, tp: int) -> tuple[float, float]:
        lp = self._layer(layer)
        cal = self.calibration
        if tp in lp.fwd_s:
            fwd, bwd = lp.value("fwd_s", batch, tp), lp.value("bwd_s", batch, tp)
        else:  # not measured at this degree: the tp=1 time shared out
            fwd, bwd = lp.value("fwd_s", batch, 1) / tp, lp.value("bwd_s", batch, 1) / tp
        half = cal.get("layer_overhead_s", 0.0) / 2
        scale = cal.get("compute_scale", 1.0)
        return scale * fwd + half, scale * bwd + half

    def weight_grad_s(self, layer: Layer, batch: float, tp: int) -> float:
        lp = self._layer(layer)
        if tp in lp.wgrad_s:  # (at most the backward it is part of)
            wgrad = self.calibration.get("compute_scale", 1.0) * lp.value("wgrad_s", batch, tp)
            return min(max(wgrad, 0.0), self.layer_compute_s(layer, batch, tp)[1])
        if not getattr(self, "_wgrad_default_said", False):
            self._wgrad_default_said = True
            logger.info(
                "the measured profile has no weight-gradient split of the backward; zero-bubble "
                "schedules get each layer's FLOP share (re-run `uniap profile` to measure it)"
            )
        return super().weight_grad_s(layer, batch, tp)

    def collective_s(self, op: str, nbytes: float, ranks: Sequence[int]) -> float:
        if op not in COLLECTIVES:
            raise ValueError(f"unknown collective {op!r}; one of {COLLECTIVES}")
        if (op != "p2p" and len(ranks) <= 1) or nbytes <= 0:
            return 0.0
        fits = self.collectives.get(op, {})
        key = group_shape_key(ranks, int(self.hardware["devices_per_node"]))
        fit = fits.get(key)
        if fit is None:  # same size, other placement: the closest measured shape
            same = sorted(k for k in fits if k.startswith(f"n{len(ranks)}-"))
            if not same:
                raise ConfigError(
                    f"the measured profile has no {op} on groups of {len(ranks)} ranks; "
                    f"measured: {sorted(fits)}; re-run `uniap profile` on this cluster"
                )
            fit = fits[same[0]]
        return self.calibration.get("comm_scale", 1.0) * fit.time_s(nbytes)

    def optimizer_step_s(
        self, num_params: float, layer: Layer | None = None, *, dtensor: bool = False
    ) -> float:
        if num_params <= 0:
            return 0.0
        lp = self.layers.get(layer.cost_key) if layer is not None else None
        variant = "dtensor" if dtensor else "plain"
        if lp is None or variant not in lp.optimizer_s:
            return self.optimizer_a_s + self.optimizer_s_per_param * num_params
        # the layer's own fixed cost (per tensor; DTensor dispatch) + the per-parameter work
        world = int(self.hardware.get("world_size", 1)) if dtensor else 1
        measured_params = layer.num_params / world
        fixed = max(lp.optimizer_s[variant] - self.optimizer_s_per_param * measured_params, 0.0)
        return fixed + self.optimizer_s_per_param * num_params

    def dp_residual_s(self, layer: Layer, kind: str, phase: str) -> float:
        lp = self.layers.get(layer.cost_key)
        if lp is None:
            return 0.0
        return lp.dp_residual_s.get(kind, {}).get(phase, 0.0)

    def _per_batch(self, layer: Layer, which: str, batch: float, tp: int = 1) -> float | None:
        """``which`` (``loss_s``, ``loss_working_bytes``) at ``batch`` and TP degree ``tp``:
        measured at that degree, else the tp = 1 measurement shared out over the ranks that
        share the loss (:func:`~uniap.profiles.analytic.loss_tp_share`; the working memory by
        :func:`~uniap.profiles.analytic.loss_parallel_bytes`); None if unmeasured."""
        lp = self.layers.get(layer.cost_key)
        if lp is None:
            return None
        share = loss_tp_share(layer, tp)
        ys = lp.loss_tp.get(tp, {}).get(which) if share > 1 else None
        if not ys or len(ys) != len(lp.batches):
            whole = getattr(lp, which, None) or []
            if which == "loss_working_bytes":
                ys = [loss_parallel_bytes(layer, b, tp, y) for y, b in zip(whole, lp.batches)]
            else:
                ys = [y / share for y in whole]
        if not ys or len(ys) != len(lp.batches):
            return None
        a, slope, _ = fit_line(lp.batches, ys)
        return interpolate(batch, lp.batches, ys, (a, slope))

    def loss_working_bytes(self, layer: Layer, batch: float, tp: int = 1) -> float:
        v = self._per_batch(layer, "loss_working_bytes", batch, tp)
        return super().loss_working_bytes(layer, batch, tp) if v is None else v

    def loss_s(self, layer: Layer, batch: float, tp: int = 1) -> float:
        v = self._per_batch(layer, "loss_s", batch, tp)
        return 0.0 if v is None else self.calibration.get("compute_scale", 1.0) * v

    def activation_bytes(self, layer: Layer, batch: float, tp: int, *, sp: bool = False) -> float:
        lp = self._layer(layer)
        if sp and tp > 1 and tp in lp.sp_activation_bytes:
            return lp.value("sp_activation_bytes", batch, tp)
        if tp in lp.activation_bytes:
            v = lp.value("activation_bytes", batch, tp)
            if sp and tp > 1:
                # SP not measured (an older profile): the traced share SP shards on top of
                # the measured TP bytes (uniap.profiles.analytic's formula)
                v -= layer.saved_bytes_per_sample * batch * layer.sp_saved_fraction * (1 - 1 / tp)
            return v
        return super().activation_bytes(layer, batch, tp, sp=sp)

    def check_compatible(self, graph: ModelGraph, cluster: Cluster) -> None:
        """Refuse a profile made for another model, machine or library version."""
        diffs = []
        m = self.model
        if m.get("signature") != graph.signature:
            diffs.append(
                f"model signature: profile {m.get('signature')} ({m.get('name')}), "
                f"model {graph.signature} ({graph.name})"
            )
        if m.get("dtype") != graph.dtype:
            diffs.append(f"dtype: profile {m.get('dtype')}, model {graph.dtype}")
        if list(m.get("sample_shape", [])) != list(graph.sample_shape):
            diffs.append(
                f"sample shape: profile {m.get('sample_shape')}, model {list(graph.sample_shape)}"
            )
        hw = self.hardware
        if hw.get("world_size") != cluster.world_size:
            diffs.append(
                f"world size: profile {hw.get('world_size')}, cluster {cluster.world_size}"
            )
        if hw.get("devices_per_node") != cluster.devices_per_node:
            diffs.append(
                f"devices per node: profile {hw.get('devices_per_node')}, cluster "
                f"{cluster.devices_per_node}"
            )
        if hw.get("device_type") != cluster.device_type:
            diffs.append(
                f"device type: profile {hw.get('device_type')}, cluster {cluster.device_type}"
            )
        now = library_versions()
        for lib, v in now.items():
            if self.versions.get(lib) != v:
                diffs.append(f"{lib} version: profile {self.versions.get(lib)}, installed {v}")
        if diffs:
            raise ConfigError(
                "stale profile: " + "; ".join(diffs) + "; re-run `uniap profile` for this model "
                "and cluster (or plan without --profile)"
            )

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        """The YAML layout (plain types)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "model": dict(self.model),
            "hardware": dict(self.hardware),
            "versions": dict(self.versions),
            "settings": dict(self.settings),
            "overlap_coefficient": float(self.overlap_coefficient),
            "overlap": {k: float(v) for k, v in self.overlap.items()},
            "pipeline_overhead_s": float(self.pipeline_overhead_s),
            "tp_comm_in_compute": bool(self.tp_comm_in_compute),
            "optimizer": {
                "a_s": float(self.optimizer_a_s),
                "s_per_param": float(self.optimizer_s_per_param),
            },
            "calibration": {k: float(v) for k, v in self.calibration.items()},
            "collectives": {
                op: {k: dataclasses.asdict(f) for k, f in sorted(fits.items())}
                for op, fits in sorted(self.collectives.items())
            },
            "layers": {key: lp.to_dict() for key, lp in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>") -> MeasuredProfile:
        """Inverse of :meth:`to_dict`; ``ConfigError`` naming ``source`` when malformed."""
        if not isinstance(d, dict) or d.get("schema_version") != SCHEMA_VERSION:
            got = d.get("schema_version") if isinstance(d, dict) else type(d).__name__
            raise ConfigError(
                f"{source}: not a uniap measured profile (schema_version {got!r}, expected "
                f"{SCHEMA_VERSION}); create one with `uniap profile`"
            )
        try:
            return cls(
                model=dict(d["model"]),
                hardware=dict(d["hardware"]),
                versions=dict(d["versions"]),
                layers={k: LayerProfile.from_dict(v) for k, v in d["layers"].items()},
                collectives={
                    op: {k: CollectiveFit(**f) for k, f in fits.items()}
                    for op, fits in d["collectives"].items()
                },
                overlap_coefficient=float(d["overlap_coefficient"]),
                overlap=dict(d.get("overlap", {})),
                pipeline_overhead_s=float(d.get("pipeline_overhead_s", 0.0)),
                tp_comm_in_compute=bool(d.get("tp_comm_in_compute", False)),
                optimizer_a_s=float(d["optimizer"]["a_s"]),
                optimizer_s_per_param=float(d["optimizer"]["s_per_param"]),
                calibration={**_CALIBRATION_DEFAULTS, **d.get("calibration", {})},
                settings=dict(d.get("settings", {})),
                source=str(d.get("source", "measured")),
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise ConfigError(
                f"{source}: malformed measured profile ({type(e).__name__}: {e}); "
                "re-run `uniap profile`"
            ) from None

    @classmethod
    def combine(cls, profiles: Sequence[MeasuredProfile]) -> MeasuredProfile:
        """One profile from several measurements of the same model on the same machine (e.g.
        taken at different times on a shared machine): every measured number is the median
        of its values over ``profiles``; everything else is the first profile's. Refuses
        profiles of different models, hardware or measurement settings."""
        if not profiles:
            raise ValueError("combine needs at least one profile")
        dicts = [p.to_dict() for p in profiles]
        first = dicts[0]
        for d in dicts[1:]:
            for part in ("model", "hardware", "versions"):
                if d[part] != first[part]:
                    raise ConfigError(
                        f"cannot combine profiles with different {part}: {first[part]} vs "
                        f"{d[part]}; combine measurements of one model on one machine"
                    )
            for k in ("batches", "tp_degrees"):
                if d["settings"].get(k) != first["settings"].get(k):
                    raise ConfigError(
                        f"cannot combine profiles measured at different {k}: "
                        f"{first['settings'].get(k)} vs {d['settings'].get(k)}"
                    )
        merged = _median_tree(dicts)
        merged["settings"]["combined_from"] = len(dicts)
        merged["settings"]["wall_s"] = round(
            sum(d["settings"].get("wall_s", 0.0) for d in dicts), 2
        )
        return cls.from_dict(merged, source="<combined profiles>")

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """YAML text, also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MeasuredProfile:
        """Read a profile YAML file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"{p}: profile file not found; create it with `uniap profile`"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the profile file: {e}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: YAML syntax error: {e}") from None
        return cls.from_dict(data, str(p))

    def with_calibration(self, **coefficients: float) -> MeasuredProfile:
        """A copy with calibration coefficients replaced."""
        unknown = sorted(set(coefficients) - set(_CALIBRATION_DEFAULTS))
        if unknown:
            raise ConfigError(
                f"unknown calibration coefficient(s) {unknown}; use {sorted(_CALIBRATION_DEFAULTS)}"
            )
        return dataclasses.replace(self, calibration={**self.calibration, **coefficients})

    def summary(self) -> str:
        """A few lines for the CLI: layers, fits and collectives."""
        from uniap.profiles.marks import NOISE_FIT_ERROR, measured_rate, profile_legend

        lines = [
            f"measured profile of {self.model.get('name')} ({self.model.get('signature')}) on "
            f"{self.hardware.get('world_size')} x {self.hardware.get('device_type')} "
            f"({self.hardware.get('device_name')}), overlap {self.overlap_coefficient:.2f}"
        ]
        marks: set[str] = set()
        for lp in self.layers.values():
            for tp in sorted(lp.fwd_s):
                _, fslope, ferr = lp.fit("fwd_s", tp)
                _, bslope, berr = lp.fit("bwd_s", tp)
                lines.append(
                    f"  {lp.fqns[0]:<12} x{len(lp.fqns)} tp{tp}: "
                    f"{measured_rate('fwd', fslope, ferr, marks)}, "
                    f"{measured_rate('bwd', bslope, berr, marks)}"
                )
        for op, fits in sorted(self.collectives.items()):
            for key, f in sorted(fits.items()):
                noise = f.fit_error > NOISE_FIT_ERROR
                marks.update({"noise"} if noise else set())
                lines.append(
                    f"  {op:<14} {key:<22} {f.alpha_s * 1e6:8.1f} us + S / "
                    f"{f.bandwidth_bytes_per_s / 1e9:.2f} GB/s (fit err {f.fit_error:.0%})"
                    + (" [noise]" if noise else "")
                )
        lines += [f"  {line}" for line in profile_legend(marks)]
        return "\n".join(lines)


def _median_tree(values: list[Any]) -> Any:
    """Element-wise median of equally shaped plain trees (dicts, lists, numbers); other
    leaves (strings, booleans, shapes that differ) are taken from the first tree."""
    first = values[0]
    if isinstance(first, dict):
        return {
            k: _median_tree([v[k] for v in values if isinstance(v, dict) and k in v]) for k in first
        }
    if isinstance(first, list):
        if all(isinstance(v, list) and len(v) == len(first) for v in values):
            return [_median_tree([v[i] for v in values]) for i in range(len(first))]
        return first
    if isinstance(first, int | float) and not isinstance(first, bool):
        nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        med = statistics.median(nums)
        return type(first)(med) if isinstance(first, int) and float(med).is_integer() else med
    return first
