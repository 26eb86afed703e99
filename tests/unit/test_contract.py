"""The Plan contract: the Strategy value and its rules, frozen plans, the plan file (round
trip, determinism, layout), and plans refused for another model or world."""

from __future__ import annotations

import dataclasses

import pytest

from uniap.contract import LayerStrategy, Plan, Stage, Strategy
from uniap.errors import ConfigError, PlanMismatchError
from uniap.planner import plan


def _two_stage_plan() -> Plan:
    layers0 = (
        LayerStrategy("a", Strategy(2, 1, "DDP")),
        LayerStrategy("b", Strategy(1, 2, "FSDP", True)),
    )
    layers1 = (LayerStrategy("c", Strategy(2, 1, "FSDP")),)
    return Plan("m", "0" * 16, 3, 4, 8, 2, "1F1B", (Stage((0, 1), layers0), Stage((2, 3), layers1)))


def test_classic_ddp_is_ddp_over_the_whole_stage() -> None:
    """Classic DDP exactly for DDP with dp > 1 and tp == 1; DTensor parameters otherwise when
    sharded or replicated."""
    assert Strategy(2, 1, "DDP").uses_classic_ddp
    assert not Strategy(1, 1, "DDP").uses_classic_ddp
    assert not Strategy(2, 2, "DDP").uses_classic_ddp
    assert not Strategy(2, 1, "FSDP").uses_classic_ddp
    assert [
        Strategy(*k).dtensor_params
        for k in [(1, 1, "DDP"), (2, 1, "DDP"), (2, 1, "FSDP"), (1, 2, "DDP")]
    ] == [
        False,
        False,
        True,
        True,
    ]


def test_layer_strategy_reads_through_to_its_strategy() -> None:
    """LayerStrategy(fqn, strategy) keeps .dp/.tp/.kind/.recompute/.key for callers."""
    ls = LayerStrategy("blocks.0", Strategy(2, 4, "FSDP", True))
    assert (ls.dp, ls.tp, ls.kind, ls.recompute) == (2, 4, "FSDP", True)
    assert ls.key == (2, 4, "FSDP", True, 0, False) == ls.strategy.key


def test_plan_is_frozen_and_replace_validates() -> None:
    """A plan cannot be changed in place; dataclasses.replace makes a new, validated plan."""
    p = _two_stage_plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.schedule = "GPipe"  # type: ignore[misc]
    q = dataclasses.replace(p, schedule="GPipe", solver={"status": "optimal"})
    assert (q.schedule, q.solver, p.schedule, p.solver) == (
        "GPipe",
        {"status": "optimal"},
        "1F1B",
        {},
    )
    with pytest.raises(
        ConfigError, match=r"num_microbatches \(3\) must divide global_batch_size \(8\)"
    ):
        dataclasses.replace(p, num_microbatches=3)


def test_plan_file_layout_writes_recompute_only_when_true() -> None:
    """Each layer is {fqn, dp, tp, kind} and recompute only when true, in that order."""
    text = _two_stage_plan().to_yaml()
    assert "  - {fqn: a, dp: 2, tp: 1, kind: DDP}\n" in text
    assert "  - {fqn: b, dp: 1, tp: 2, kind: FSDP, recompute: true}\n" in text
    assert Plan.load(text).to_yaml() == text


def test_plan_yaml_and_json_round_trip(tmp_path) -> None:
    """to_yaml/to_json -> load gives the same plan; validation accepts it."""
    p = plan("gpt-tiny", "cpu-4", global_batch_size=16, pp_degrees=[2])
    for name in ("p.yaml", "p.json"):
        path = tmp_path / name
        (p.to_yaml if name.endswith("yaml") else p.to_json)(path)
        q = Plan.load(path)
        assert q.to_dict() == p.to_dict()
    assert "stage" in p.describe() and "devices" in p.describe()


def test_same_inputs_same_plan_file() -> None:
    """Deterministic: the same inputs give a byte-identical plan file; timings only on request."""
    a = plan("llama-tiny", "cpu-4", global_batch_size=8)
    b = plan("llama-tiny", "cpu-4", global_batch_size=8)
    assert a.to_yaml() == b.to_yaml()
    assert "wall_s" not in a.to_yaml() and "wall_s" in a.to_yaml(timings=True)


def test_plan_for_other_model_or_world_is_refused() -> None:
    """check_compatible names what differs."""
    p = plan("gpt-tiny", "cpu-4", global_batch_size=16)
    with pytest.raises(
        PlanMismatchError, match=r"world size: the plan is for 4 devices, 2 were launched"
    ):
        p.check_compatible(world_size=2)
    with pytest.raises(PlanMismatchError, match=r"model signature"):
        p.check_compatible(model_signature="0" * 16)
    with pytest.raises(PlanMismatchError, match=r"only in plan"):
        p.check_compatible(layer_fqns=("a", "b"))


def test_bad_plan_files_give_config_errors(tmp_path) -> None:
    """A malformed plan names the file and the field."""
    p = plan("gpt-tiny", "cpu-4", global_batch_size=16)
    d = p.to_dict()
    d["stages"][0]["layers"][0]["dp"] = 3
    with pytest.raises(ConfigError, match=r"dp \(3\) x tp \(1\) must equal the stage size \(4\)"):
        Plan.from_dict(d, source="x.yaml")
    d = p.to_dict()
    d["bogus"] = 1
    with pytest.raises(ConfigError, match=r"x.yaml: unknown plan field\(s\) \['bogus'\]"):
        Plan.from_dict(d, source="x.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML/JSON at line"):
        Plan.load(bad)
    with pytest.raises(ConfigError, match=r"not found"):
        Plan.load(tmp_path / "missing.yaml")


def test_zero2_layers_round_trip_and_unknown_kinds_are_refused() -> None:
    """A ZeRO2 layer is written as kind: ZeRO2 and read back; a kind not in KINDS names them."""
    layers = (
        LayerStrategy("a", Strategy(2, 1, "ZeRO2")),
        LayerStrategy("b", Strategy(2, 1, "FSDP")),
    )
    p = Plan("m", "0" * 16, 2, 2, 4, 2, "1F1B", (Stage((0, 1), layers),))
    text = p.to_yaml()
    assert "  - {fqn: a, dp: 2, tp: 1, kind: ZeRO2}\n" in text
    assert Plan.load(text) == p and Plan.load(p.to_json()) == p
    assert "dp2 tp1 ZeRO2" in p.describe() and "dp2xtp1-ZeRO2" == str(layers[0].strategy)
    assert Strategy(2, 1, "ZeRO2").reduces_every_microbatch
    assert Strategy(2, 1, "ZeRO2").dtensor_params
    assert not Strategy(2, 1, "FSDP").reduces_every_microbatch
    with pytest.raises(
        ConfigError,
        match=r"kind 'ZeRO3' is not one of \['DDP', 'FSDP', 'ZeRO2', 'HSDP', 'FSDP-offload'\] "
        r"\(did you mean 'ZeRO2'\?\)",
    ):
        Plan.load(text.replace("ZeRO2", "ZeRO3"))
    with pytest.raises(
        ConfigError, match=r"kind 'FSPD' is not one of .* \(did you mean 'FSDP'\?\)"
    ):
        Plan.load(text.replace("FSDP", "FSPD"))


def test_hsdp_layers_round_trip_with_their_shard_degree() -> None:
    """An HSDP layer is written with its shard_degree and read back; a shard degree that does
    not divide dp strictly between 1 and dp, or on another kind, is refused naming the rule."""
    layers = (
        LayerStrategy("a", Strategy(4, 1, "HSDP", False, 2)),
        LayerStrategy("b", Strategy(4, 1, "DDP")),
    )
    p = Plan("m", "0" * 16, 2, 4, 8, 2, "1F1B", (Stage((0, 1, 2, 3), layers),))
    text = p.to_yaml()
    assert "  - {fqn: a, dp: 4, tp: 1, kind: HSDP, shard_degree: 2}\n" in text
    assert "  - {fqn: b, dp: 4, tp: 1, kind: DDP}\n" in text
    assert Plan.load(text) == p and Plan.load(p.to_json()) == p
    assert "dp4 tp1 HSDP2" in p.describe() and str(layers[0].strategy) == "dp4xtp1-HSDP2"
    assert layers[0].key == (4, 1, "HSDP", False, 2, False)
    assert Strategy(4, 1, "HSDP", False, 2).shard_size == 2 == Strategy(2, 1, "FSDP").shard_size
    with pytest.raises(ConfigError, match=r"HSDP needs tp = 1 and a shard_degree dividing dp"):
        Plan.load(text.replace("shard_degree: 2", "shard_degree: 4"))
    with pytest.raises(ConfigError, match=r"shard_degree is for HSDP only, not DDP"):
        Plan.load(text.replace("kind: DDP}", "kind: DDP, shard_degree: 2}"))
