"""Cluster: presets, unit parsing, exact YAML round-trips, error messages, topology, detection."""

from __future__ import annotations

import copy
import pickle
import types

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from uniap.cluster import Cluster, list_presets, load_cluster
from uniap.errors import ConfigError, InfeasibleError, UniapError
from uniap.units import format_quantity, parse_quantity

BASE = {
    "name": "test-2x4",
    "num_nodes": 2,
    "devices_per_node": 4,
    "device": {
        "memory": "40 GiB",
        "peak_flops": {"bfloat16": "312 TFLOP/s", "float32": "19.5 TFLOP/s"},
        "compute_efficiency": 0.5,
        "type": "cuda",
    },
    "intra_node": {"bandwidth": "300 GB/s", "latency": "5 us"},
    "inter_node": {"bandwidth": "200 Gb/s", "latency": "10 us"},
    "backend": "nccl",
}
EXPECTED_PRESETS = ["a100-1x8", "a100-2x8", "a100-pcie-2x8", "cpu-2", "cpu-4"]
EXPECTED_PRESETS += ["h100-128x8", "h100-1x8", "h100-4x8"]


def _layout(**edits: object) -> dict:
    """BASE with dotted-path edits; a value of ... deletes the key."""
    data = copy.deepcopy(BASE)
    for dotted, value in edits.items():
        *parents, leaf = dotted.split("__")
        node = data
        for key in parents:
            node = node[key]
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value
    return data


def _write(tmp_path, data: object, name: str = "my-cluster.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return str(path)


# -- presets and round-trips ---------------------------------------------------------------


def test_list_presets_has_the_documented_ones():
    """Every documented preset ships."""
    assert set(EXPECTED_PRESETS) <= set(list_presets())
    assert list_presets() == sorted(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_preset_loads_and_round_trips_exactly(name, tmp_path):
    """Each preset loads and survives to_yaml -> from_yaml bit for bit (text and file)."""
    cluster = load_cluster(name)
    assert cluster.name == name
    assert Cluster.from_yaml(cluster.to_yaml()) == cluster
    path = tmp_path / f"{name}.yaml"
    cluster.to_yaml(path)
    assert load_cluster(str(path)) == cluster
    assert load_cluster(path) == cluster


def test_a100_2x8_constants_match_the_datasheet():
    """The A100 preset holds the datasheet numbers in SI units."""
    c = Cluster.preset("a100-2x8")
    assert (c.num_nodes, c.devices_per_node, c.world_size) == (2, 8, 16)
    assert c.device_memory_bytes == 40 * 2**30
    assert c.peak_flops("bfloat16") == 312e12 and c.peak_flops("float32") == 19.5e12
    assert c.intra_node_bandwidth_bytes_per_s == 300e9
    assert c.inter_node_bandwidth_bytes_per_s == 25e9  # 200 Gb/s HDR
    assert (c.intra_node_latency_s, c.inter_node_latency_s) == (5e-6, 10e-6)


def test_h100_and_cpu_presets():
    """H100: 80 GB (decimal), 989 TFLOP/s bf16, NDR 50 GB/s; cpu-4: gloo, 4 processes."""
    h = Cluster.preset("h100-128x8")
    assert (h.world_size, h.device_memory_bytes, h.peak_flops("bf16")) == (1024, 80e9, 989e12)
    assert (h.intra_node_bandwidth_bytes_per_s, h.inter_node_bandwidth_bytes_per_s) == (450e9, 50e9)
    cpu = Cluster.preset("cpu-4")
    assert (cpu.world_size, cpu.backend, cpu.device_type) == (4, "gloo", "cpu")
    assert cpu.peak_flops("float32") == 50e9 and cpu.device_memory_bytes == 4 * 2**30
    assert Cluster.preset("cpu-2").world_size == 2
    pcie = Cluster.preset("a100-pcie-2x8")
    assert (pcie.intra_node_bandwidth_bytes_per_s, pcie.inter_node_bandwidth_bytes_per_s) == (
        24e9,
        3.125e9,
    )


_positive = st.floats(min_value=1e-12, max_value=1e18, allow_nan=False, allow_infinity=False)
_binary_bytes = st.integers(1, 2**20).map(lambda n: float(n * 2**20))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    nodes=st.integers(1, 64),
    per_node=st.integers(1, 16),
    memory=st.one_of(_positive, _binary_bytes),
    flops=st.dictionaries(
        st.sampled_from(["float32", "bfloat16", "float16"]), _positive, min_size=1
    ),
    links=st.tuples(_positive, _positive, _positive, _positive),
    efficiency=st.floats(min_value=1e-6, max_value=1.0),
)
def test_random_cluster_round_trips_exactly(nodes, per_node, memory, flops, links, efficiency):
    """Any valid cluster survives to_yaml -> from_yaml exactly."""
    cluster = Cluster("rand", nodes, per_node, memory, flops, *links, compute_efficiency=efficiency)
    assert Cluster.from_yaml(cluster.to_yaml()) == cluster


# -- units ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("40 GiB", "memory", 40 * 2**30),
        ("80GB", "memory", 80e9),
        ("512 MiB", "memory", 512 * 2**20),
        ("1.5 KiB", "memory", 1536.0),
        ("42949672960", "memory", 42949672960.0),
        (1024, "memory", 1024.0),
        ("300 GB/s", "bandwidth", 300e9),
        ("25 Gb/s", "bandwidth", 3.125e9),  # bits
        ("25 GB/s", "bandwidth", 25e9),  # bytes
        ("12.5 GB/s", "bandwidth", 12.5e9),
        ("400 Gbit/s", "bandwidth", 50e9),
        ("100 Mbps", "bandwidth", 12.5e6),
        ("5 us", "latency", 5e-6),
        ("5 µs", "latency", 5e-6),
        ("2 ms", "latency", 2e-3),
        ("1e-6 s", "latency", 1e-6),
        ("10 ns", "latency", 1e-8),
        (2.5e-5, "latency", 2.5e-5),
        ("312 TFLOP/s", "flops", 312e12),
        ("19.5 TFLOP/s", "flops", 19.5e12),
        ("1 PFLOP/s", "flops", 1e15),
        ("100 GFLOP/s", "flops", 100e9),
        ("989 TFLOPS", "flops", 989e12),
    ],
)
def test_parse_quantity(text, kind, expected):
    """Human units become exact SI floats; Gb/s is bits, GB/s bytes, GiB binary, GB decimal."""
    assert parse_quantity(text, kind) == expected


@pytest.mark.parametrize(
    ("value", "kind", "text"),
    [
        (40 * 2**30, "memory", "40 GiB"),
        (80e9, "memory", "80 GB"),
        (3.125e9, "bandwidth", "3.125 GB/s"),
        (5e-6, "latency", "5 us"),
        (19.5e12, "flops", "19.5 TFLOP/s"),
        (123.25, "memory", "123.25 B"),
    ],
)
def test_format_quantity_picks_a_readable_exact_unit(value, kind, text):
    """to_yaml writes short human units that parse back to the same float."""
    assert format_quantity(value, kind) == text
    assert parse_quantity(text, kind) == value


@pytest.mark.parametrize(
    ("text", "kind", "hints"),
    [
        ("40 GB/s", "memory", ["'GB/s' is a bandwidth unit", "GiB"]),
        ("40 GiB", "bandwidth", ["'GiB' is a memory unit", "Gb/s (bits)"]),
        ("5 GB", "latency", ["memory unit", "us"]),
        ("40 gib", "memory", ["did you mean 'GiB'"]),
        ("300 Gigabytes/s", "bandwidth", ["unknown unit"]),
        ("fast", "latency", ["must be a number with a latency unit"]),
        ("-3 us", "latency", ["positive", "'-3 us'"]),
        ("0 GiB", "memory", ["positive"]),
        (True, "memory", ["positive number"]),
        (None, "memory", ["positive number"]),
    ],
)
def test_parse_quantity_rejects_bad_values(text, kind, hints):
    """Wrong-kind, unknown and non-positive quantities give a ConfigError with the fix."""
    with pytest.raises(ConfigError) as info:
        parse_quantity(text, kind, "f.yaml: x.y")
    for hint in hints:
        assert hint in str(info.value)


# -- bad files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edits", "field", "hint"),
    [
        ({"num_node": 2, "num_nodes": ...}, "num_node", "did you mean 'num_nodes'"),
        ({"intra_node__latncy": "5 us", "intra_node__latency": ...}, "intra_node.latncy",
         "did you mean 'latency'"),
        ({"device__peak_flops__bfloat": "1 TFLOP/s"}, "device.peak_flops.bfloat",
         "did you mean 'bfloat16'"),
        ({"device__memory": ...}, "device.memory", "e.g. memory: 40 GiB"),
        ({"inter_node": ...}, "inter_node", "e.g. inter_node:"),
        ({"name": ...}, "name", "e.g. name:"),
        ({"num_nodes": "two"}, "num_nodes", "e.g. num_nodes: 2"),
        ({"num_nodes": 2.0}, "num_nodes", "positive integer"),
        ({"devices_per_node": 0}, "devices_per_node", "e.g. devices_per_node: 8"),
        ({"intra_node__bandwidth": "-300 GB/s"}, "intra_node.bandwidth",
         "e.g. bandwidth: 300 GB/s"),
        ({"device__memory": "40 GB/s"}, "device.memory", "bandwidth unit"),
        ({"device__memory": "40 parsecs"}, "device.memory", "unknown unit 'parsecs'"),
        ({"inter_node__latency": "10 GiB"}, "inter_node.latency", "memory unit"),
        ({"device__peak_flops": {}}, "device.peak_flops", "e.g. peak_flops:"),
        ({"device__peak_flops": "312 TFLOP/s"}, "device.peak_flops", "must be a mapping"),
        ({"intra_node": "300 GB/s"}, "intra_node", "e.g. intra_node: {bandwidth"),
        ({"device__compute_efficiency": 1.5}, "device.compute_efficiency", "(0, 1]"),
        ({"backend": "ncl"}, "backend", "did you mean 'nccl'"),
        ({"device__type": "gpu"}, "device.type", "cuda, cpu"),
        ({"device__type": "cpu"}, "backend", "set backend: gloo"),
    ],
)  # fmt: skip
def test_bad_field_names_file_field_and_fix(tmp_path, edits, field, hint):
    """A bad field gives a ConfigError naming the file, the dotted field and the fix."""
    path = _write(tmp_path, _layout(**edits))
    with pytest.raises(ConfigError) as info:
        Cluster.from_yaml(path)
    message = str(info.value)
    assert "my-cluster.yaml" in message and field in message and hint in message, message


@pytest.mark.parametrize(
    ("text", "hints"),
    [
        ("name: x\ndevice: {memory: 1 GiB\n", ["my-cluster.yaml:", "YAML syntax error", "line"]),
        ("- a\n- b\n", ["my-cluster.yaml", "top level must be a mapping", "a100-2x8"]),
        ("", ["my-cluster.yaml", "empty file"]),
    ],
)
def test_unreadable_file_names_the_file(tmp_path, text, hints):
    """YAML syntax errors (with line:column), non-mappings and empty files are ConfigErrors."""
    with pytest.raises(ConfigError) as info:
        Cluster.from_yaml(_write(tmp_path, text))
    for hint in hints:
        assert hint in str(info.value)
    assert info.value.__cause__ is None


def test_yaml_syntax_error_has_line_number(tmp_path):
    """The syntax error points at the offending line."""
    text = "name: x\nnum_nodes: 1\ndevice:\n  memory: 1 GiB\n bad: [\n"
    with pytest.raises(ConfigError, match=r"my-cluster\.yaml:\d+:\d+: YAML syntax error"):
        Cluster.from_yaml(_write(tmp_path, text))


def test_missing_file_and_unknown_preset(tmp_path):
    """A missing file says so; an unknown preset lists the presets and the closest one."""
    with pytest.raises(ConfigError, match="nope.yaml: cluster file not found"):
        load_cluster(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError) as info:
        load_cluster("a100-2x9")
    message = str(info.value)
    assert "did you mean 'a100-2x8'" in message
    assert all(name in message for name in EXPECTED_PRESETS)


@pytest.mark.parametrize("bad", [None, [], {}, True, "x", -1, 1.5])
@pytest.mark.parametrize(
    "dotted",
    ["name", "num_nodes", "devices_per_node", "device", "device__memory", "device__peak_flops",
     "device__peak_flops__bfloat16", "device__compute_efficiency", "device__type", "intra_node",
     "intra_node__bandwidth", "inter_node__latency", "backend"],
)  # fmt: skip
def test_any_bad_value_is_a_config_error(dotted, bad):
    """No bad value escapes as KeyError/TypeError/AttributeError: always a ConfigError."""
    data = _layout(**{dotted: bad})
    try:
        Cluster.from_dict(data, source="fuzz.yaml")
    except ConfigError as e:
        assert "fuzz.yaml" in str(e)


def test_dtype_aliases_are_accepted():
    """bf16/fp32 alias the dtype names; one node may omit inter_node."""
    data = _layout(
        num_nodes=1,
        inter_node=...,
        device__peak_flops={"bf16": "312 TFLOP/s", "fp32": "19.5 TFLOP/s"},
    )
    c = Cluster.from_dict(data)
    assert c.device_memory_bytes == 40 * 2**30 and c.intra_node_latency_s == 5e-6
    assert dict(c.peak_flops_per_s) == {"float32": 19.5e12, "bfloat16": 312e12}


@pytest.mark.parametrize(
    ("dotted", "value", "hint"),
    [
        ("device__memory", 24, "device.memory: 24 has no unit; did you mean 24 GiB?"),
        ("device__memory", "24", "device.memory: 24 has no unit; did you mean 24 GiB?"),
        ("device__memory", 42949672960, "did you mean 40 GiB?"),
        (
            "intra_node__bandwidth",
            300,
            "intra_node.bandwidth: 300 has no unit; did you mean 300 GB/s?",
        ),
        ("intra_node__latency", 5, "did you mean 5 us?"),
        ("intra_node__latency", 5e-6, "did you mean 5 us?"),
        ("device__peak_flops__bfloat16", 312, "did you mean 312 TFLOP/s?"),
    ],
)
def test_bare_number_without_unit_is_refused_at_load(dotted, value, hint):
    """`memory: 24` is not 24 bytes: a number without a unit is refused at load, with the fix."""
    with pytest.raises(ConfigError) as info:
        Cluster.from_dict(_layout(**{dotted: value}), source="c.yaml")
    assert str(info.value).startswith("c.yaml: ") and hint in str(info.value)


def test_cpu_device_defaults_to_gloo():
    """A cpu device without a backend gets gloo."""
    c = Cluster.from_dict(_layout(device__type="cpu", backend=...))
    assert (c.device_type, c.backend) == ("cpu", "gloo")


# -- the dataclass -------------------------------------------------------------------------


def test_constructor_validates_with_the_fix():
    """Direct construction validates too, naming the cluster, field and an example."""
    args = ("x", 1, 8, 1e9, {"float32": 1e12}, 1e9, 1e-6, 1e9, 1e-6)
    with pytest.raises(
        ConfigError,
        match=r"cluster 'x': devices_per_node must be a positive integer, got 0; "
        r"e.g. devices_per_node: 8",
    ):
        Cluster(*args[:2], 0, *args[3:])
    with pytest.raises(ConfigError, match="float32"):
        Cluster(*args[:4], {"tf32": 1e12}, *args[5:])
    with pytest.raises(ConfigError, match="compute_efficiency"):
        Cluster(*args, compute_efficiency=0.0)
    with pytest.raises(ConfigError, match="gloo"):
        Cluster(*args, device_type="cpu")
    assert isinstance(Cluster(*args).device_memory_bytes, float)


def test_link_world_size_and_nodes():
    """Ranks fill node 0 first; a group within one node uses the intra-node link."""
    c = Cluster.preset("a100-2x8")
    assert c.world_size == 16
    assert [c.node_of(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]
    assert c.same_node([0, 1, 7]) and not c.same_node([7, 8]) and c.same_node([])
    assert c.link([0, 3]) == (5e-6, 300e9)
    assert c.link([8, 15]) == (5e-6, 300e9)
    assert c.link([0, 8]) == (10e-6, 25e9)
    assert c.link(range(16)) == (10e-6, 25e9)
    with pytest.raises(UniapError, match=r"\[0, 16\)"):
        c.node_of(16)


def test_peak_flops_by_name_alias_and_dtype_object():
    """peak_flops takes names, aliases and torch-style dtypes; a missing dtype lists the rest."""

    class Float32:  # stands in for torch.float32 (str() is "torch.float32"; no torch import)
        def __str__(self) -> str:
            return "torch.float32"

    c = Cluster.preset("cpu-4")
    assert c.peak_flops("float32") == c.peak_flops("fp32") == c.peak_flops(Float32()) == 50e9
    with pytest.raises(ConfigError, match="available: float32, bfloat16"):
        c.peak_flops("float16")


def test_frozen_hashable_picklable_and_variants():
    """Clusters are frozen, hashable, picklable; with_memory/replace derive validated copies."""
    c = Cluster.preset("a100-1x8")
    assert hash(c) == hash(Cluster.preset("a100-1x8"))
    assert pickle.loads(pickle.dumps(c)) == c and copy.deepcopy(c) == c
    with pytest.raises(TypeError):
        c.peak_flops_per_s["float32"] = 1.0  # type: ignore[index]
    smaller = c.with_memory(8 * 2**30)
    assert smaller.device_memory_bytes == 8 * 2**30 and smaller != c
    assert c.replace(num_nodes=4).world_size == 32
    with pytest.raises(ConfigError):
        c.with_memory(-1)
    assert "a100-1x8: 1 x 8 cuda (nccl), 40 GiB" in c.describe()


def test_errors_hierarchy_and_infeasible_payload():
    """ConfigError is a ValueError; InfeasibleError carries min_memory_bytes through pickling."""
    assert issubclass(ConfigError, UniapError) and issubclass(UniapError, ValueError)
    e = InfeasibleError("no plan fits in 8 GiB; relax memory", min_memory_bytes=9e9)
    again = pickle.loads(pickle.dumps(e))
    assert isinstance(e, RuntimeError) and again.min_memory_bytes == 9e9
    assert str(again) == str(e)
    assert InfeasibleError("x").min_memory_bytes is None


# -- detection -----------------------------------------------------------------------------


def _fake_torch(gpu_name: str | None, total_memory: int = 80 * 10**9, count: int = 8):
    props = types.SimpleNamespace(name=gpu_name, total_memory=total_memory)
    cuda = types.SimpleNamespace(
        is_available=lambda: gpu_name is not None,
        get_device_properties=lambda index: props,
        device_count=lambda: count,
    )
    return types.SimpleNamespace(cuda=cuda)


@pytest.fixture
def fake_torch(monkeypatch):
    """Install a stand-in torch module so detect() runs without CUDA (and fast)."""

    def install(*args, **kwargs):
        monkeypatch.setitem(__import__("sys").modules, "torch", _fake_torch(*args, **kwargs))

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return install


def test_detect_cpu_uses_env_world_size(fake_torch, monkeypatch):
    """On CPU: cpu-4 constants, world size from the torchrun env, host memory per process."""
    fake_torch(None)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    c = Cluster.detect()
    assert (c.num_nodes, c.devices_per_node, c.device_type, c.backend) == (2, 2, "cpu", "gloo")
    assert c.device_memory_bytes > 0 and c.peak_flops("float32") == 50e9
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="multiple of LOCAL_WORLD_SIZE"):
        Cluster.detect()


@pytest.mark.parametrize(
    ("gpu", "bf16", "intra"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12, 450e9),
        ("NVIDIA H200", 989e12, 450e9),
        ("NVIDIA A100-SXM4-40GB", 312e12, 300e9),
        ("NVIDIA A100-PCIE-40GB", 312e12, 24e9),
    ],
)
def test_detect_known_gpu(fake_torch, gpu, bf16, intra):
    """A known GPU gets its datasheet peaks and links, and the device's real memory."""
    fake_torch(gpu, total_memory=85_000_000_000, count=4)
    c = Cluster.detect()
    assert (c.world_size, c.device_memory_bytes, c.peak_flops("bfloat16")) == (4, 85e9, bf16)
    assert c.intra_node_bandwidth_bytes_per_s == intra


@pytest.mark.parametrize("gpu", ["NVIDIA GeForce RTX 4090", "NVIDIA H100 PCIe", "NVIDIA H200 NVL"])
def test_detect_unknown_gpu_refuses_to_guess(fake_torch, gpu):
    """An unknown GPU is a ConfigError pointing at writing a YAML, never a silent guess."""
    fake_torch(gpu)
    with pytest.raises(ConfigError, match="write a cluster YAML"):
        Cluster.detect()
