"""Planner edge cases (no process group): tiny models, more devices than layers, prime device
counts, batches that no data-parallel degree divides, models that fit nowhere, plans for
another world; and determinism: the same inputs give a byte-identical plan file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from uniap import plan as make_plan
from uniap.cluster import Cluster, load_cluster
from uniap.contract import Plan
from uniap.errors import InfeasibleError, PlanMismatchError
from uniap.models import build_model, example_batch, loss_fn_for

PLAN_KW = {"time_limit_s": 20.0}


class Chain(nn.Module):
    """``n`` linear layers in a chain (the smallest plannable model)."""

    def __init__(self, n: int, dim: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n))

    def uniap_layer_fqns(self) -> list[str]:
        return [f"layers.{i}" for i in range(len(self.layers))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _cluster(devices: int, memory: str = "4 GiB") -> Cluster:
    return Cluster.from_dict(
        {
            "name": f"cpu-{devices}",
            "num_nodes": 1,
            "devices_per_node": devices,
            "device": {"memory": memory, "peak_flops": {"float32": "50 GFLOP/s"}, "type": "cpu"},
            "intra_node": {"bandwidth": "2 GB/s", "latency": "50 us"},
            "backend": "gloo",
        }
    )


def _check(plan: Plan, *, world: int, batch: int, layers: int) -> None:
    """Whatever the planner returns is a complete, valid plan for this world and batch."""
    plan.validate()
    assert plan.world_size == world and plan.global_batch_size == batch
    assert plan.num_layers == layers == len(plan.layer_strategies)
    assert sorted(r for st in plan.stages for r in st.ranks) == list(range(world))
    assert plan.pp_degree <= layers


def test_one_layer_model_on_4_devices_is_planned() -> None:
    """A single-layer model on 4 devices: one stage holding all 4 ranks."""
    plan = make_plan(Chain(1), _cluster(4), global_batch_size=8,
                     example_inputs=torch.randn(2, 16), **PLAN_KW)  # fmt: skip
    _check(plan, world=4, batch=8, layers=1)
    assert plan.pp_degree == 1


def test_more_devices_than_layers() -> None:
    """2 layers on 8 devices: at most 2 stages; every device is used."""
    plan = make_plan(Chain(2), _cluster(8), global_batch_size=16,
                     example_inputs=torch.randn(2, 16), **PLAN_KW)  # fmt: skip
    _check(plan, world=8, batch=16, layers=2)
    assert plan.pp_degree in (1, 2)


@pytest.mark.parametrize("devices", [3, 7])
def test_prime_device_count(devices: int) -> None:
    """A prime number of devices: pp is 1 or the device count; the plan is valid."""
    plan = make_plan("gpt-tiny", _cluster(devices), global_batch_size=devices * 2, **PLAN_KW)
    _check(plan, world=devices, batch=devices * 2, layers=7)
    assert plan.pp_degree in (1, devices)


def test_global_batch_1_uses_no_data_parallelism() -> None:
    """Global batch 1 on 2 devices: every layer has dp=1 (pipeline or TP instead)."""
    plan = make_plan("gpt-tiny", "cpu-2", global_batch_size=1, **PLAN_KW)
    _check(plan, world=2, batch=1, layers=7)
    assert plan.num_microbatches == 1
    assert {ls.dp for ls in plan.layer_strategies} == {1}


def test_batch_divisible_by_no_dp_degree() -> None:
    """Global batch 3 on 4 devices (no dp in {2, 4} divides it): a plan with dp=1 layers."""
    plan = make_plan("gpt-tiny", "cpu-4", global_batch_size=3, **PLAN_KW)
    _check(plan, world=4, batch=3, layers=7)
    assert {ls.dp for ls in plan.layer_strategies} == {1}


def test_model_that_fits_nowhere_names_minimum_memory() -> None:
    """gpt-tiny on 2 devices of 1 MiB: InfeasibleError naming the memory per device needed;
    with that much memory (over the usable fraction) a plan exists."""
    with pytest.raises(InfeasibleError) as err:
        make_plan("gpt-tiny", _cluster(2, "1 MiB"), global_batch_size=8, **PLAN_KW)
    msg = str(err.value)
    assert "no plan fits in device memory: the leanest plan needs" in msg
    assert "per device" in msg and "use more devices" in msg
    need = err.value.min_memory_bytes
    assert need is not None and need > 2**20 * 0.9
    plan = make_plan("gpt-tiny", _cluster(2, f"{int(need / 0.9) + 4096} B"), global_batch_size=8,
                     **PLAN_KW)  # fmt: skip
    _check(plan, world=2, batch=8, layers=7)


def test_memory_smaller_than_one_layer() -> None:
    """1 KiB per device (less than any single layer's weights): InfeasibleError with the
    minimum, which exceeds the largest layer's parameter bytes split over the devices."""
    with pytest.raises(InfeasibleError, match="the leanest plan needs") as err:
        make_plan("gpt-tiny", _cluster(4, "1 KiB"), global_batch_size=8, **PLAN_KW)
    embed_bytes = 256 * 64 * 4  # the vocabulary embedding alone
    assert err.value.min_memory_bytes > embed_bytes / 4


def _plan_for(world: int) -> Plan:
    return make_plan("gpt-tiny", f"cpu-{world}", global_batch_size=8, **PLAN_KW)


def test_plan_for_other_world_refused_by_check_compatible() -> None:
    """A 4-device plan checked against a world of 2 names both sizes and the fix."""
    with pytest.raises(PlanMismatchError) as err:
        _plan_for(4).check_compatible(world_size=2)
    msg = str(err.value)
    assert "world size: the plan is for 4 devices, 2 were launched" in msg
    assert "re-plan" in msg


def test_plan_for_other_world_refused_by_parallelize_before_any_collective(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """parallelize() in a launched world of 3 refuses a 4-device plan without rendezvous."""
    from uniap.api import parallelize

    assert not dist.is_initialized()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # any rendezvous attempt would fail loudly
    with pytest.raises(PlanMismatchError, match="the plan is for 4 devices, 3 were launched"):
        parallelize(
            build_model("gpt-tiny", device="cpu"),
            plan=_plan_for(4),
            loss_fn=loss_fn_for("gpt-tiny"),
            global_batch_size=8,
            example_inputs=example_batch("gpt-tiny", 8)[0],
        )
    assert not dist.is_initialized()


def test_cluster_of_prime_size_from_preset_edit() -> None:
    """A preset edited to 5 devices plans; the stages' ranks are consecutive."""
    cluster = load_cluster("cpu-4").replace(devices_per_node=5, name="cpu-5")
    plan = make_plan("bert-tiny", cluster, global_batch_size=10, **PLAN_KW)
    _check(plan, world=5, batch=10, layers=plan.num_layers)
    for st in plan.stages:
        assert list(st.ranks) == list(range(st.ranks[0], st.ranks[0] + len(st.ranks)))


# ------------------------------------------------------------------------ determinism
_PLAN_SNIPPET = (
    "import sys; from uniap import plan; "
    "sys.stdout.write(plan('gpt-tiny', 'cpu-4', global_batch_size=16, time_limit_s=20.0)"
    ".to_yaml())"
)


def test_same_inputs_same_plan_bytes_twice_in_one_process() -> None:
    """Planning the same inputs twice gives byte-identical plan files."""
    a = make_plan("gpt-tiny", "cpu-4", global_batch_size=16, **PLAN_KW).to_yaml()
    b = make_plan("gpt-tiny", "cpu-4", global_batch_size=16, **PLAN_KW).to_yaml()
    assert a == b
    assert "wall_s" not in a  # wall-clock timings are not in the file by default


def test_same_inputs_same_plan_bytes_across_processes() -> None:
    """Two fresh interpreters (different hash seeds) write the same plan file as this one."""
    here = make_plan("gpt-tiny", "cpu-4", global_batch_size=16, **PLAN_KW).to_yaml()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PLAN_SNIPPET],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONWARNINGS": "ignore"},
        )
        for seed in ("1", "2")
    ]
    outs = []
    for proc in procs:  # both run at once; each bounded
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        outs.append(out)
    assert outs[0] == outs[1] == here
