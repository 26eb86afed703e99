"""The hardware a plan runs on: nodes, devices, memory, peak FLOP/s and links.

A `Cluster` is loaded from a YAML file written in human units ("40 GiB", "300 GB/s",
"25 Gb/s", "5 us", "312 TFLOP/s"; parsed by :mod:`uniap.units`), or from a preset in
`uniap/clusters/`, and holds everything in SI units (bytes, bytes/s, seconds, FLOP/s)::

    name: a100-2x8
    num_nodes: 2
    devices_per_node: 8
    device:
      memory: 40 GiB
      peak_flops: {bfloat16: 312 TFLOP/s, float16: 312 TFLOP/s, float32: 19.5 TFLOP/s}
      compute_efficiency: 0.5
      type: cuda
    intra_node: {bandwidth: 300 GB/s, latency: 5 us}
    inter_node: {bandwidth: 25 GB/s, latency: 10 us}
    backend: nccl
    host:                       # optional: what CPU offload may use (uniap.cost_model)
      memory: 880 GiB           # host (CPU) memory of one node
      link_bandwidth: 24 GB/s   # host <-> device (PCIe), per device and direction
      optimizer_time_per_param: 1.4 ns  # AdamW on the node's CPUs, per parameter

Bandwidths are per device and per direction. Without a ``host`` section the cluster declares
no host memory and no plan offloads to the CPU. A number without a unit is refused ("did you
mean 24 GiB?"): `memory: 24` is not 24 bytes. A bad file
raises `ConfigError` naming the file, the dotted field (`intra_node.bandwidth`) and the fix.
`to_yaml` writes the same layout and `from_yaml` reads it back exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from uniap.errors import ConfigError, UniapError
from uniap.units import (
    QUANTITY_EXAMPLES,
    check_choice,
    check_number,
    did_you_mean,
    format_quantity,
    parse_quantity,
)

if TYPE_CHECKING:
    import torch

__all__ = ["Cluster", "list_presets", "load_cluster"]

logger = logging.getLogger(__name__)

_EXAMPLES = {
    **QUANTITY_EXAMPLES,
    "peak_flops": "{bfloat16: 312 TFLOP/s, float32: 19.5 TFLOP/s}",
    "device": "{memory: 40 GiB, peak_flops: {bfloat16: 312 TFLOP/s}}",
    "intra_node": "{bandwidth: 300 GB/s, latency: 5 us}",
    "inter_node": "{bandwidth: 25 GB/s, latency: 10 us}",
    "name": "a100-2x8",
    "num_nodes": "2",
    "devices_per_node": "8",
    "host": "{memory: 880 GiB, link_bandwidth: 24 GB/s, optimizer_time_per_param: 1.4 ns}",
    "link_bandwidth": "24 GB/s",
    "optimizer_time_per_param": "1.4 ns",
}

DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("nccl", "gloo")
DEVICE_TYPES = ("cuda", "cpu")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def _dtype_name(dtype: object) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


class _FrozenDict(dict):
    """A read-only, hashable dict, so a frozen Cluster stays hashable, picklable and comparable."""

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("Cluster.peak_flops_per_s is read-only; use cluster.replace(...)")

    __setitem__ = __delitem__ = __ior__ = _read_only  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self),))


# ---------------------------------------------------------------------------------------------
# The Cluster

_SI_FIELDS = ("device_memory_bytes", "intra_node_bandwidth_bytes_per_s", "intra_node_latency_s")
_SI_FIELDS += ("inter_node_bandwidth_bytes_per_s", "inter_node_latency_s")
_HOST_FIELDS = ("host_memory_bytes", "host_link_bandwidth_bytes_per_s")
_HOST_FIELDS += ("host_optimizer_s_per_param",)


@dataclass(frozen=True)
class Cluster:
    """A homogeneous cluster: `num_nodes` nodes of `devices_per_node` identical devices.

    Everything is in SI units. Build one with `load_cluster(name_or_path)`, `Cluster.preset`,
    `Cluster.from_yaml` or `Cluster.detect`; `with_memory` / `replace` derive variants.
    """

    name: str
    """Label used in plans and logs, e.g. "a100-2x8"."""
    num_nodes: int
    """Number of nodes (hosts)."""
    devices_per_node: int
    """Devices (GPUs, or processes on CPU) per node; ranks 0..devices_per_node-1 are node 0."""
    device_memory_bytes: float
    """Memory one device may use for parameters, gradients, optimizer state and activations."""
    peak_flops_per_s: Mapping[str, float]
    """Dense peak FLOP/s of one device per dtype name ("float32", "bfloat16", "float16")."""
    intra_node_bandwidth_bytes_per_s: float
    """Per-device, per-direction bandwidth of the link between devices of one node."""
    intra_node_latency_s: float
    """Latency (alpha) of one message between devices of one node."""
    inter_node_bandwidth_bytes_per_s: float
    """Per-device, per-direction bandwidth between nodes (the NIC share of one device)."""
    inter_node_latency_s: float
    """Latency (alpha) of one message between nodes."""
    compute_efficiency: float = 0.5
    """Fraction of peak FLOP/s a dense matmul reaches in practice, in (0, 1]."""
    backend: str = "nccl"
    """torch.distributed backend: "nccl" or "gloo"."""
    device_type: str = "cuda"
    """Device kind: "cuda" or "cpu"."""
    host_memory_bytes: float = 0.0
    """Host (CPU) memory of one node that offloaded state may use; 0: not declared (no CPU
    offload is planned)."""
    host_link_bandwidth_bytes_per_s: float = 0.0
    """Per-device, per-direction bandwidth between a device and its host (PCIe H2D / D2H)."""
    host_optimizer_s_per_param: float = 0.0
    """Seconds per parameter of an AdamW step on one node's CPUs (all of the node's ranks
    stepping at once share them)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"cluster name must be a non-empty string, got {self.name!r}")
        where = f"cluster {self.name!r}:"
        for field in ("num_nodes", "devices_per_node"):
            check_number(getattr(self, field), f"{where} {field}", "8", "count")
        for field in _SI_FIELDS:
            example = "5e-06" if field.endswith("latency_s") else "25e9"
            value = check_number(getattr(self, field), f"{where} {field}", example)
            object.__setattr__(self, field, value)
        efficiency = check_number(
            self.compute_efficiency, f"{where} compute_efficiency", "0.5", "fraction"
        )
        object.__setattr__(self, "compute_efficiency", efficiency)
        host = [getattr(self, f) for f in _HOST_FIELDS]
        if any(h != 0 for h in host):  # declared: all three, positive
            for field, example in zip(_HOST_FIELDS, ("880e9", "24e9", "1.4e-9")):
                value = check_number(getattr(self, field), f"{where} {field}", example)
                object.__setattr__(self, field, value)
        check_choice(self.backend, BACKENDS, f"{where} backend")
        check_choice(self.device_type, DEVICE_TYPES, f"{where} device_type")
        if self.backend == "nccl" and self.device_type != "cuda":
            raise ConfigError(
                f"{where} backend 'nccl' needs device type 'cuda', got {self.device_type!r}; "
                "set backend: gloo for CPU devices"
            )
        flops = self.peak_flops_per_s
        if not isinstance(flops, Mapping) or not flops:
            raise ConfigError(
                f"{where} peak_flops_per_s must map dtype names to FLOP/s, got {flops!r}; "
                "e.g. {'bfloat16': 312e12, 'float32': 19.5e12}"
            )
        checked = {
            check_choice(_dtype_name(d), DTYPES, f"{where} dtype"): f for d, f in flops.items()
        }
        for dtype, value in checked.items():
            checked[dtype] = check_number(value, f"{where} peak_flops_per_s.{dtype}", "312e12")
        ordered = _FrozenDict({d: checked[d] for d in DTYPES if d in checked})
        object.__setattr__(self, "peak_flops_per_s", ordered)

    @property
    def offload_enabled(self) -> bool:
        """Whether the cluster declares host memory (and its link and CPU optimizer rate), so
        that plans may offload layers to the CPU (the ``FSDP-offload`` kind)."""
        return self.host_memory_bytes > 0

    @property
    def world_size(self) -> int:
        """Total number of devices (ranks)."""
        return self.num_nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        """The node that holds global `rank` (ranks fill node 0 first)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise UniapError(
                f"rank must be an integer in [0, {self.world_size}) on cluster {self.name!r}, "
                f"got {rank!r}"
            )
        return rank // self.devices_per_node

    def same_node(self, ranks: Iterable[int]) -> bool:
        """Whether all `ranks` sit on one node (true for zero or one rank)."""
        ranks = list(ranks)
        if not ranks:
            return True
        # Nodes hold contiguous rank ranges: the extremes decide (the planner asks this often).
        return self.node_of(min(ranks)) == self.node_of(max(ranks))

    def link(self, ranks: Iterable[int]) -> tuple[float, float]:
        """(latency_s, bandwidth_bytes_per_s) of the slowest link a group of `ranks` uses."""
        if self.same_node(ranks):
            return self.intra_node_latency_s, self.intra_node_bandwidth_bytes_per_s
        return self.inter_node_latency_s, self.inter_node_bandwidth_bytes_per_s

    def peak_flops(self, dtype: str | torch.dtype) -> float:
        """Peak FLOP/s of one device for `dtype` (a name like "bfloat16" or a torch.dtype)."""
        name = _dtype_name(dtype)
        if name not in self.peak_flops_per_s:
            raise ConfigError(
                f"cluster {self.name!r} has no peak FLOP/s for dtype {name!r}; available: "
                f"{', '.join(self.peak_flops_per_s)}; add it under device.peak_flops in the "
                "cluster YAML, e.g. bfloat16: 312 TFLOP/s"
            )
        return self.peak_flops_per_s[name]

    def replace(self, **changes: Any) -> Cluster:
        """A copy with `changes` applied (validated like a new Cluster)."""
        return dataclasses.replace(self, **changes)

    def with_memory(self, device_memory_bytes: float) -> Cluster:
        """A copy with another per-device memory budget."""
        return self.replace(device_memory_bytes=device_memory_bytes)

    def describe(self) -> str:
        """One line for logs and the CLI, in human units."""
        d = self.to_dict()
        dev, intra, inter = d["device"], d["intra_node"], d["inter_node"]
        flops = ", ".join(f"{k} {v}" for k, v in dev["peak_flops"].items())
        host = d.get("host")
        return (
            f"{self.name}: {self.num_nodes} x {self.devices_per_node} {self.device_type} "
            f"({self.backend}), {dev['memory']} and {flops} each; intra-node "
            f"{intra['bandwidth']} {intra['latency']}, inter-node {inter['bandwidth']} "
            f"{inter['latency']}"
            + (
                f"; host {host['memory']} per node, {host['link_bandwidth']} to each device"
                if host
                else ""
            )
        )

    def to_dict(self) -> dict[str, Any]:
        """The nested human layout of a cluster file (quantities as strings with units)."""
        flops = {d: format_quantity(f, "flops") for d, f in self.peak_flops_per_s.items()}
        return {
            "name": self.name,
            "num_nodes": self.num_nodes,
            "devices_per_node": self.devices_per_node,
            "device": {
                "type": self.device_type,
                "memory": format_quantity(self.device_memory_bytes, "memory"),
                "peak_flops": flops,
                "compute_efficiency": self.compute_efficiency,
            },
            "intra_node": _link_dict(
                self.intra_node_bandwidth_bytes_per_s, self.intra_node_latency_s
            ),
            "inter_node": _link_dict(
                self.inter_node_bandwidth_bytes_per_s, self.inter_node_latency_s
            ),
            "backend": self.backend,
            **(
                {
                    "host": {
                        "memory": format_quantity(self.host_memory_bytes, "memory"),
                        "link_bandwidth": format_quantity(
                            self.host_link_bandwidth_bytes_per_s, "bandwidth"
                        ),
                        "optimizer_time_per_param": format_quantity(
                            self.host_optimizer_s_per_param, "latency"
                        ),
                    }
                }
                if self.offload_enabled
                else {}
            ),
        }

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """The cluster as YAML text, also written to `path` if given; `from_yaml` reads it back."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike[str]) -> Cluster:
        """Load a cluster from a YAML file path, or from YAML text (a string with a newline)."""
        if not _looks_like_path(path_or_text):
            if not isinstance(path_or_text, str):
                raise ConfigError(f"expected a YAML path or text, got {path_or_text!r}")
            return _load_text(path_or_text, "<string>")
        path = Path(path_or_text)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: cluster file not found; check the path, or use a preset "
                f"({', '.join(list_presets())})"
            ) from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the cluster file: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text (UTF-8 YAML) cluster file") from None
        return _load_text(text, str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Cluster:
        """Build a cluster from the nested human layout; `source` names it in errors."""
        return _from_layout(data, source)

    @classmethod
    def preset(cls, name: str) -> Cluster:
        """A preset from `uniap/clusters/<name>.yaml`; `list_presets()` names them."""
        presets = list_presets()
        if name not in presets:
            raise ConfigError(
                f"unknown cluster preset {name!r}{did_you_mean(str(name), presets)}; available "
                f"presets: {', '.join(presets)}; or pass the path to a cluster YAML file"
            )
        text = (resources.files("uniap.clusters") / f"{name}.yaml").read_text(encoding="utf-8")
        return _load_text(text, f"{name}.yaml (preset)")

    @classmethod
    def detect(cls) -> Cluster:
        """The cluster this process runs on, from torch and the torchrun environment.

        World size from WORLD_SIZE and LOCAL_WORLD_SIZE. On CUDA: device memory, and the peak
        FLOP/s and links of the preset for that GPU (ConfigError for an unknown GPU: write a
        YAML). On CPU: the `cpu-4` preset with this host's memory split between its processes.
        """
        import torch

        cluster = _detect(torch, _env_count("WORLD_SIZE"), _env_count("LOCAL_WORLD_SIZE"))
        logger.info("detected cluster %s", cluster.describe())
        return cluster


def list_presets() -> list[str]:
    """Names of the bundled cluster presets, sorted."""
    root = resources.files("uniap.clusters")
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def load_cluster(spec: str | os.PathLike[str] | Cluster) -> Cluster:
    """A cluster from a preset name ("a100-2x8"), a YAML file path, or a Cluster (as is)."""
    if isinstance(spec, Cluster):
        return spec
    if isinstance(spec, str) and (
        spec in list_presets() or not ("/" in spec or _looks_like_path(spec))
    ):
        return Cluster.preset(spec)  # an unknown name raises, listing the presets
    return Cluster.from_yaml(Path(spec))  # a Path: a missing file says "not found"


# ---------------------------------------------------------------------------------------------
# Reading the nested layout

_REQUIRED_TOP = ("name", "num_nodes", "devices_per_node", "device", "intra_node")
_TOP_KEYS = (*_REQUIRED_TOP, "inter_node", "backend", "host")
_HOST_KEYS = ("memory", "link_bandwidth", "optimizer_time_per_param")
_DEVICE_KEYS = ("memory", "peak_flops", "compute_efficiency", "type")
_LINK_KEYS = ("bandwidth", "latency")


def _link_dict(bandwidth_bytes_per_s: float, latency_s: float) -> dict[str, str]:
    bandwidth = format_quantity(bandwidth_bytes_per_s, "bandwidth")
    return {"bandwidth": bandwidth, "latency": format_quantity(latency_s, "latency")}


def _looks_like_path(spec: object) -> bool:
    """A PathLike, or a one-line string that ends in .yaml/.yml or names an existing file."""
    if isinstance(spec, os.PathLike):
        return True
    if not isinstance(spec, str) or "\n" in spec:
        return False
    return spec.strip().endswith((".yaml", ".yml")) or Path(spec).is_file()


def _load_text(text: str, source: str) -> Cluster:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"{source}{line}: YAML syntax error: {problem}; check the indentation, the colons "
            "and the quoting on that line"
        ) from None
    return _from_layout(data, source)


def _section(
    data: Any,
    path: str,
    source: str,
    keys: tuple[str, ...],
    required: tuple[str, ...],
    aliases: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Check one mapping of the layout: a mapping, only known keys, the required ones present."""
    aliases = aliases or {}
    if not isinstance(data, dict):
        got = "an empty file" if data is None and not path else f"{type(data).__name__} {data!r}"
        leaf = path.rpartition(".")[2]
        hint = f"e.g. {leaf}: {_EXAMPLES.get(leaf, '...')}"
        if not path:
            hint = (
                "a cluster file is a mapping with keys name, num_nodes, devices_per_node, device, "
                f"intra_node, ...; for a preset use load_cluster(name): {', '.join(list_presets())}"
            )
        raise ConfigError(f"{source}: {path or 'top level'} must be a mapping, got {got}; {hint}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        # a key that is not a printable string is quoted, so the message stays one readable line
        shown = (
            str(key) if isinstance(key, str) and key.isprintable() and key.strip() else repr(key)
        )
        dotted = f"{path}.{shown}" if path else shown
        if name not in keys:
            hint = did_you_mean(str(key), [*keys, *aliases])
            raise ConfigError(
                f"{source}: {dotted}: unknown key{hint}; valid keys here: {', '.join(keys)}"
            )
        if name in out:
            raise ConfigError(f"{source}: {dotted}: {name!r} is given twice; keep one")
        out[name] = value
    for key in required:
        if key not in out:
            dotted = f"{path}.{key}" if path else key
            raise ConfigError(
                f"{source}: {dotted}: missing field; add e.g. {key}: {_EXAMPLES.get(key, '...')}"
            )
    return out


def _link(data: Any, path: str, source: str) -> tuple[float, float]:
    link = _section(data, path, source, _LINK_KEYS, _LINK_KEYS)
    return (
        parse_quantity(
            link["bandwidth"], "bandwidth", f"{source}: {path}.bandwidth", unit_required=True
        ),
        parse_quantity(link["latency"], "latency", f"{source}: {path}.latency", unit_required=True),
    )


def _from_layout(data: Any, source: str) -> Cluster:
    def at(field: str) -> str:
        return f"{source}: {field}"

    top = _section(data, "", source, _TOP_KEYS, _REQUIRED_TOP)
    name = top["name"]
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{at('name')} must be a non-empty string, got {name!r}; e.g. name: a100-2x8"
        )
    num_nodes = check_number(top["num_nodes"], at("num_nodes"), "2", "count")
    per_node = check_number(top["devices_per_node"], at("devices_per_node"), "8", "count")
    device = _section(top["device"], "device", source, _DEVICE_KEYS, ("memory", "peak_flops"))
    memory = parse_quantity(device["memory"], "memory", at("device.memory"), unit_required=True)
    flops = _section(device["peak_flops"], "device.peak_flops", source, DTYPES, (), _DTYPE_ALIASES)
    if not flops:
        example = _EXAMPLES["peak_flops"]
        raise ConfigError(f"{at('device.peak_flops')}: needs a dtype; e.g. peak_flops: {example}")
    flops = {
        d: parse_quantity(v, "flops", at(f"device.peak_flops.{d}"), unit_required=True)
        for d, v in flops.items()
    }
    efficiency = device.get("compute_efficiency", 0.5)
    efficiency = check_number(efficiency, at("device.compute_efficiency"), "0.5", "fraction")
    device_type = check_choice(device.get("type", "cuda"), DEVICE_TYPES, at("device.type"))
    backend = top.get("backend", "nccl" if device_type == "cuda" else "gloo")
    backend = check_choice(backend, BACKENDS, at("backend"))
    intra = _link(top["intra_node"], "intra_node", source)
    if "inter_node" in top:
        inter = _link(top["inter_node"], "inter_node", source)
    elif num_nodes == 1:
        inter = intra  # one node: no inter-node link is ever used
    else:
        raise ConfigError(
            f"{at('inter_node')}: missing field (needed with num_nodes: {num_nodes}); "
            f"add e.g. inter_node: {_EXAMPLES['inter_node']}"
        )
    host = {}
    if "host" in top:
        section = _section(top["host"], "host", source, _HOST_KEYS, _HOST_KEYS)
        kinds = ("memory", "bandwidth", "latency")
        host = dict(
            zip(
                _HOST_FIELDS,
                (
                    parse_quantity(section[k], kind, at(f"host.{k}"), unit_required=True)
                    for k, kind in zip(_HOST_KEYS, kinds)
                ),
            )
        )
    sizes = (name, num_nodes, per_node, memory, flops, *intra, *inter)
    try:  # positional, in the field order of Cluster
        return Cluster(*sizes, efficiency, backend, device_type, **host)
    except ConfigError as e:  # a cross-field check: name the file too
        raise ConfigError(f"{source}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Detection

# torch.cuda.get_device_properties(0).name, lower-cased -> the preset whose datasheet numbers
# (peak FLOP/s, NVLink/PCIe and NIC bandwidth) that GPU has; first match wins. H100 PCIe and
# the NVL parts have other peaks and no preset: they must fail rather than borrow SXM numbers.
_GPU_PRESETS = (
    (r"h200(?!.*nvl)", "h200-1x8"),  # "NVIDIA H200"
    (r"h100(?!.*(pcie|nvl)).*(hbm3|sxm)", "h100-1x8"),  # "NVIDIA H100 80GB HBM3"
    (r"a100.*sxm", "a100-1x8"),  # "NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB"
    (r"a100.*pcie", "a100-pcie-2x8"),  # "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"
)


def _env_count(var: str) -> int | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    if not raw.strip().isdigit() or int(raw) <= 0:
        raise ConfigError(f"environment variable {var} must be a positive integer, got {raw!r}")
    return int(raw)


def _detect(torch: Any, world_size: int | None, local: int | None) -> Cluster:
    if torch.cuda.is_available():  # not torch.accelerator: it also reports MPS/XPU
        gpu = torch.cuda.get_device_properties(0)
        preset = next((p for pat, p in _GPU_PRESETS if re.search(pat, gpu.name.lower())), None)
        if preset is None:
            raise ConfigError(
                f"GPU {gpu.name!r} has no entry in uniap's peak-FLOP/s table (A100, H100 SXM, "
                "H200); write a cluster YAML for it (copy uniap/clusters/h100-1x8.yaml) and "
                "pass it to load_cluster(path)"
            )
        local = local or world_size or torch.cuda.device_count()
        memory_bytes, kind = float(gpu.total_memory), "cuda"
    else:
        preset, local = "cpu-4", local or world_size or 1
        host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory_bytes, kind = float(host_bytes // local), "cpu"
    world_size = world_size or local
    if world_size % local:
        raise ConfigError(
            f"WORLD_SIZE ({world_size}) must be a multiple of LOCAL_WORLD_SIZE ({local}); "
            "uniap assumes the same number of devices on every node"
        )
    num_nodes = world_size // local
    if num_nodes > 1:
        logger.warning(
            "inter-node link taken from preset %s; pass a cluster YAML to set it", preset
        )
    return Cluster.preset(preset).replace(
        name=f"detected-{kind}-{num_nodes}x{local}",
        num_nodes=num_nodes,
        devices_per_node=local,
        device_memory_bytes=memory_bytes,
    )
