"""Precision as part of the plan: resolution, defaults, the Plan field, the cost model's
charges and the CLI (no process group)."""

from __future__ import annotations

import dataclasses

import pytest

from uniap import ConfigError, Precision, plan
from uniap.cli import main
from uniap.cluster import load_cluster
from uniap.contract import Plan
from uniap.cost_model import CostModel
from uniap.precision import PRECISIONS, default_precision, resolve_precision


def test_presets_and_custom_precision() -> None:
    """Names resolve to presets; a custom Precision keeps its dtypes and is named custom."""
    assert resolve_precision("bf16-mixed") == Precision("bfloat16", "float32", "float32")
    assert resolve_precision("fp32") == Precision()
    custom = Precision(param_dtype="bfloat16", reduce_dtype="bfloat16", master_dtype="float32")
    assert custom.name == "custom" and custom.mixed
    assert not PRECISIONS["fp32"].mixed


def test_bad_precision_is_one_clear_error() -> None:
    """An unknown name or dtype, or a master copy narrower than compute, is a ConfigError."""
    with pytest.raises(ConfigError, match="unknown precision 'bf16'; use one of"):
        resolve_precision("bf16")
    with pytest.raises(ConfigError, match="param_dtype 'int8' is not supported"):
        Precision(param_dtype="int8")
    with pytest.raises(ConfigError, match="master_dtype bfloat16 is narrower"):
        Precision(param_dtype="float32", master_dtype="bfloat16")


def test_default_precision_by_cluster_device() -> None:
    """bf16-mixed on CUDA clusters, fp32 on CPU ones."""
    assert default_precision(load_cluster("a100-2x8")).name == "bf16-mixed"
    assert default_precision(load_cluster("cpu-4")).name == "fp32"


def test_plan_records_precision_and_old_plans_still_load() -> None:
    """The planner records the precision; it round-trips; describe() prints it; a plan file
    without the field (written before it existed) loads with precision None."""
    p = plan("gpt-tiny", "cpu-4", global_batch_size=8, precision="bf16-mixed")
    assert p.precision == PRECISIONS["bf16-mixed"]
    assert Plan.load(p.to_yaml()).precision == p.precision
    assert "precision: bf16-mixed (compute bfloat16, gradient reduction float32" in p.describe()
    old = p.to_dict()
    del old["precision"]
    assert Plan.from_dict(old).precision is None
    assert "precision: not recorded" in Plan.from_dict(old).describe()
    assert plan("gpt-tiny", "cpu-4", global_batch_size=8).precision.name == "fp32"
    assert plan("gpt-tiny", "a100-1x8", global_batch_size=8).precision.name == "bf16-mixed"


def test_cost_model_charges_fp32_gradient_reduction_and_16_bytes_per_param() -> None:
    """bf16-mixed: the DP gradient all-reduce moves fp32 (twice a bf16 reduction's bytes);
    parameters, gradients and optimizer state are 16 bytes per parameter."""
    import torch

    from uniap import models
    from uniap.graph import build_graph

    m = models.build_model("gpt-tiny", device="meta")
    x = models.example_batch("gpt-tiny", 2, device="meta")[0]
    graph = build_graph(m, x, name="gpt-tiny", dtype=torch.bfloat16)
    cluster = load_cluster("a100-1x8")
    mixed = CostModel(graph, cluster, precision=PRECISIONS["bf16-mixed"])
    pure = CostModel(graph, cluster, precision=Precision("bfloat16", "bfloat16", "bfloat16"))
    assert mixed.reduce_factor == 2.0 and pure.reduce_factor == 1.0
    assert 2 * 2 + mixed.opt_bytes == 16 and 2 * 2 + pure.opt_bytes == 8
    p = plan(graph, cluster, global_batch_size=8, precision="bf16-mixed")
    with pytest.raises(ConfigError, match="the plan is for precision bf16-mixed"):
        pure.evaluate(p)
    with pytest.raises(ConfigError, match="computes in float32 but the model graph is in bfloat16"):
        CostModel(graph, cluster, precision=PRECISIONS["fp32"])


def test_mixed_precision_reduction_costs_more_than_bf16_reduction() -> None:
    """Same plan, bf16-mixed vs pure bf16: only the gradient reduction differs, and it is
    slower in fp32."""
    import torch

    from uniap import models
    from uniap.graph import build_graph

    m = models.build_model("gpt-tiny", device="meta")
    x = models.example_batch("gpt-tiny", 2, device="meta")[0]
    graph = build_graph(m, x, name="gpt-tiny", dtype=torch.bfloat16)
    cluster = load_cluster("a100-1x8")
    p = plan(graph, cluster, global_batch_size=8, precision="bf16-mixed")
    pure_precision = Precision("bfloat16", "bfloat16", "bfloat16")
    mixed = CostModel(graph, cluster, precision=PRECISIONS["bf16-mixed"]).evaluate(p)
    pure = CostModel(graph, cluster, precision=pure_precision).evaluate(
        dataclasses.replace(p, precision=pure_precision)
    )
    assert mixed.time_per_iteration_s > pure.time_per_iteration_s


def test_cli_plan_prints_the_precision(capsys: pytest.CaptureFixture[str]) -> None:
    """`uniap plan --precision bf16-mixed` plans in it and says so; the default is printed too."""
    assert (
        main(
            [
                "plan",
                "--model",
                "gpt-tiny",
                "--cluster",
                "cpu-4",
                "--global-batch-size",
                "8",
                "--precision",
                "bf16-mixed",
                "-q",
            ]
        )
        == 0
    )
    assert "precision: bf16-mixed" in capsys.readouterr().out
    assert (
        main(
            ["plan", "--model", "gpt-tiny", "--cluster", "cpu-4", "--global-batch-size", "8", "-q"]
        )
        == 0
    )
    assert "precision: fp32" in capsys.readouterr().out


def test_autocast_weight_copies_are_measured_and_charged_per_microbatch_in_flight() -> None:
    """bf16-mixed runs classic-DDP and dp == 1 layers on fp32 master weights under the
    executor's autocast: autograd saves a bf16 copy of the weights for backward (measured here:
    exactly the weight's bf16 bytes beyond what the same layer saves in bf16), and the cost model
    charges that copy once per micro-batch in flight. FSDP layers (FSDP2 casts them) and
    recomputed layers (the copy is made again in backward) get none."""
    import torch
    from torch import nn

    from uniap import models
    from uniap.contract import Strategy
    from uniap.graph import build_graph
    from uniap.precision import install_autocast
    from uniap.profiler.memory import saved_activation_bytes

    master = nn.Linear(256, 256, bias=False)
    low = nn.Linear(256, 256, bias=False).to(torch.bfloat16)
    install_autocast(master, PRECISIONS["bf16-mixed"], "cpu")
    x = torch.randn(4, 256)
    copy_bytes = saved_activation_bytes(master, (x,)) - saved_activation_bytes(
        low, (x.to(torch.bfloat16),)
    )
    assert copy_bytes == 256 * 256 * 2

    m = models.build_model("gpt-tiny", device="meta")
    ex = models.example_batch("gpt-tiny", 2, device="meta")[0]
    graph = build_graph(m, ex, name="gpt-tiny", dtype=torch.bfloat16)
    cluster = load_cluster("a100-1x8")
    mixed = CostModel(graph, cluster, precision=PRECISIONS["bf16-mixed"])
    pure = CostModel(graph, cluster, precision=Precision("bfloat16", "bfloat16", "bfloat16"))
    u = graph.fqns.index("blocks.0")
    p_bytes = graph.layers[u].param_bytes

    def per_inflight(cm: CostModel, s: Strategy) -> float:
        m1, m3 = cm.layer_cost(
            u, s, pp=2, num_microbatches=4, microbatch_size=4, inflight=[1, 3]
        ).memory_bytes
        return (m3 - m1) / 2

    for s, charged in [
        (Strategy(2, 1, "DDP"), True),
        (Strategy(1, 1, "DDP"), True),
        (Strategy(1, 2, "DDP"), True),
        (Strategy(2, 1, "FSDP"), False),
        (Strategy(2, 1, "DDP", recompute=True), False),
    ]:
        extra = per_inflight(mixed, s) - per_inflight(pure, s)
        assert extra == (p_bytes / s.tp if charged else 0.0), s
