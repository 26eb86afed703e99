"""Executor logic without a real process group: rank/group arithmetic, reshard plans simulated
sample by sample, global-batch slicing, and large meshes built with the fake process group."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from uniap.executor.mesh import GatherStep, RankLayout, SliceStep, reshard_steps
from uniap.executor.reshard import slice_global_batch


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


LAYOUTS = [(w, pp) for w in (1, 2, 4, 6, 8, 12, 16) for pp in _divisors(w)]


@pytest.mark.parametrize(("world", "pp"), LAYOUTS)
def test_groups_partition_each_stage(world: int, pp: int) -> None:
    """TP groups are consecutive, DP groups strided by tp, lanes hit one rank per stage."""
    lay = RankLayout(world, pp)
    g = lay.stage_size
    for tp in _divisors(g):
        dp = g // tp
        for rank in range(world):
            tpg, dpg = lay.tp_group(rank, dp, tp), lay.dp_group(rank, dp, tp)
            assert rank in tpg and rank in dpg and len(tpg) == tp and len(dpg) == dp
            assert list(tpg) == list(range(tpg[0], tpg[0] + tp))
            assert all(b - a == tp for a, b in zip(dpg, dpg[1:]))
            assert {lay.stage_of(r) for r in tpg + dpg} == {lay.stage_of(rank)}
            assert lay.dp_index(rank, tp) == dpg.index(rank)
            lane = lay.lane(rank)
            assert [lay.stage_of(r) for r in lane] == list(range(pp))
            assert {lay.local(r) for r in lane} == {lay.local(rank)}


@pytest.mark.parametrize(("world", "pp"), [(8, 1), (8, 2), (12, 1), (16, 2)])
def test_gather_groups_partition_the_world(world: int, pp: int) -> None:
    """Every gather group family covers each rank exactly once; gather_index is the position."""
    lay = RankLayout(world, pp)
    g = lay.stage_size
    for tp_small, tp_big in itertools.combinations(_divisors(g), 2):
        if tp_big % tp_small:
            continue
        groups = lay.gather_groups(tp_small, tp_big)
        flat = sorted(r for grp in groups for r in grp)
        assert flat == list(range(world))
        for grp in groups:
            assert len(grp) == tp_big // tp_small
            for pos, r in enumerate(grp):
                assert lay.gather_index(r, tp_small, tp_big) == pos


def test_reshard_steps_kinds() -> None:
    """Equal dp: nothing; dp down: one gather; dp up: one slice; coprime: gather then slice."""
    assert reshard_steps(4, (2, 2), (2, 2)) == []
    assert reshard_steps(4, (4, 1), (2, 2)) == [GatherStep(1, 2)]
    assert reshard_steps(4, (1, 4), (4, 1)) == [SliceStep(1, 4)]
    assert reshard_steps(6, (2, 3), (3, 2)) == [GatherStep(3, 6), SliceStep(2, 6)]


def _held(lay: RankLayout, rank: int, layout: tuple[int, int], b: int) -> list[int]:
    """Sample indices of the micro-batch that ``rank`` holds under ``layout``."""
    dp, tp = layout
    s = b // dp
    j = lay.dp_index(rank, tp)
    return list(range(j * s, (j + 1) * s))


@pytest.mark.parametrize("g", [2, 4, 6, 8, 12])
def test_reshard_steps_move_every_rank_to_its_target_shard(g: int) -> None:
    """Simulated sample by sample on one stage: applying the steps' gathers (in group order)
    and slices turns every rank's source shard into exactly its target shard."""
    lay = RankLayout(g, 1)
    b = g * 2
    shapes = [(g // tp, tp) for tp in _divisors(g)]
    for src, dst in itertools.product(shapes, shapes):
        data = {r: _held(lay, r, src, b) for r in range(g)}
        for step in reshard_steps(g, src, dst):
            k = step.tp_big // step.tp_small
            new = {}
            for r in range(g):
                grp = lay.gather_group(r, step.tp_small, step.tp_big)
                idx = lay.gather_index(r, step.tp_small, step.tp_big)
                if isinstance(step, GatherStep):
                    new[r] = [x for member in grp for x in data[member]]
                else:
                    n = len(data[r]) // k
                    new[r] = data[r][idx * n : (idx + 1) * n]
            data = new
        for r in range(g):
            assert data[r] == _held(lay, r, dst, b), (src, dst, r)


def test_slice_global_batch_reassembles() -> None:
    """The dp shards of each micro-batch, in order, are the global batch."""
    x = torch.arange(24).reshape(12, 2)
    c, dp = 3, 2
    parts = [slice_global_batch(x, num_microbatches=c, dp=dp, dp_index=j) for j in range(dp)]
    mbs = [torch.cat([p.tensor_split(c)[m] for p in parts]) for m in range(c)]
    assert torch.equal(torch.cat(mbs), x)
    with pytest.raises(ValueError, match="does not split into 3 micro-batches x 4"):
        slice_global_batch(x[:10], num_microbatches=3, dp=4, dp_index=0)


def test_pipeline_degree_must_divide_world() -> None:
    """A pp that does not divide the world is refused with the valid choices."""
    with pytest.raises(ValueError, match=r"try pp in \[1, 2, 3, 6\]"):
        RankLayout(6, 4)


# ------------------------------------------------------------------ fake process group
@pytest.fixture
def fake_world(request: pytest.FixtureRequest) -> int:
    """A fake process group (no communication) of ``(world, rank)``."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world, rank = request.param
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    yield rank
    dist.destroy_process_group()


@pytest.mark.parametrize("fake_world", [(16, 5), (16, 12)], indirect=True)
def test_large_mesh_groups_match_rank_arithmetic(fake_world: int) -> None:
    """On 16 fake ranks, pp=2: the meshes and groups built are the ones RankLayout predicts."""
    from toy import make_plan, toy_fqns

    from uniap.executor import ProcessGroups

    rank = fake_world
    plan = make_plan(
        toy_fqns(),
        16,
        [[(8, 1, "FSDP"), (4, 2, "FSDP")], [(2, 4, "DDP"), (8, 1, "DDP")]],
        global_batch_size=32,
        num_microbatches=2,
    )
    groups = ProcessGroups(plan, torch.device("cpu"))
    lay = RankLayout(16, 2)
    assert groups.stage_index == lay.stage_of(rank)
    for dp, tp in [(8, 1), (4, 2), (2, 4)]:
        mesh = groups.layer_mesh(dp, tp)
        assert tuple(mesh["tp"].mesh.tolist()) == lay.tp_group(rank, dp, tp)
        assert tuple(mesh["dp"].mesh.tolist()) == lay.dp_group(rank, dp, tp)
    assert tuple(dist.get_process_group_ranks(groups.lane_group)) == lay.lane(rank)
    for tp_small, tp_big in [(1, 2), (2, 4), (1, 4)]:
        got = tuple(dist.get_process_group_ranks(groups.gather_group(tp_small, tp_big)))
        assert got == lay.gather_group(rank, tp_small, tp_big)


@pytest.mark.parametrize("fake_world", [(16, 5)], indirect=True)
def test_large_world_apply_plan_shards_as_planned(fake_world: int) -> None:
    """apply_plan on fake rank 5 of 16: stage 0's layers only, FSDP x TP placements on the
    right meshes, original FQNs."""
    from toy import build_toy, make_plan, toy_fqns, toy_layers, toy_loss

    from uniap.executor import apply_plan

    plan = make_plan(
        toy_fqns(),
        16,
        [[(8, 1, "FSDP"), (4, 2, "FSDP")], [(2, 4, "DDP"), (8, 1, "FSDP")]],
        global_batch_size=32,
        num_microbatches=2,
    )
    pm = apply_plan(
        build_toy(), plan, loss_fn=toy_loss, layers=toy_layers(), device=torch.device("cpu")
    )
    params = dict(pm.named_parameters())
    assert {k.split(".")[0] for k in params} == {"embed", "blocks"}
    assert all(not k.startswith("blocks.1") for k in params)
    emb = params["embed.tok.weight"]
    assert (
        emb.device_mesh.mesh.tolist() == list(range(8)) and str(emb.placements) == "(Shard(dim=0),)"
    )
    o = params["blocks.0.o.weight"]
    assert o.device_mesh.mesh.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert o.placements[1].dim == 1  # TP row-wise: input features
    assert params["blocks.0.norm1.weight"].device_mesh.mesh.tolist() == [1, 3, 5, 7]
    assert pm.is_first_stage and not pm.is_last_stage


def test_step_memory_counts_saved_activations_exactly_and_recompute_keeps_the_input() -> None:
    """Linear(8,16)-ReLU-Linear(16,4) on 5 samples saves x (160 B) and the ReLU output (320 B);
    checkpointed, only x; AdamW state appears after the first optimizer step."""
    from torch import nn

    from uniap.executor.activation_checkpoint import apply_ac
    from uniap.executor.memory import StepMemory

    x = torch.randn(5, 8)
    for recompute, expect in ((False, 480), (True, 160)):
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        model = nn.Sequential(apply_ac(mlp) if recompute else mlp)
        meter = StepMemory(model, torch.device("cpu"))
        opt = torch.optim.AdamW(model.parameters())
        param_bytes = sum(p.numel() * 4 for p in model.parameters())
        for step in range(2):
            with meter:
                model(x).sum().backward()
            opt.step()
            assert meter.breakdown["activations_peak_bytes"] == expect
            assert (
                meter.breakdown["parameters_bytes"]
                == meter.breakdown["gradients_bytes"]
                == param_bytes
            )
            state = meter.breakdown["optimizer_state_bytes"]
            assert state == (0 if step == 0 else 2 * param_bytes + 4 * 4)  # + 4 step counters
            assert meter.peak_memory_bytes == sum(meter.breakdown.values())


@pytest.mark.parametrize("fake_world", [(4, 1)], indirect=True)
def test_layout_adapter_checks_its_inputs_on_the_host(
    fake_world: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At pp = 1 a layer in another layout than the first gets its batch resharded, after an
    all-gather of a signature of its arguments. Under NCCL that exchange goes over one gloo
    group made for it (a host tensor: no wait on the device's queued work); a plan in one
    layout makes none."""
    from toy import make_plan, toy_fqns

    from uniap.executor import ProcessGroups, mesh
    from uniap.executor.model_forward import BatchContext, LayoutAdapter

    made: list[str] = []
    host = object()

    def new_group(*args, backend=None, **kwargs):
        made.append(backend)
        return host

    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(dist, "new_group", new_group)
    monkeypatch.setattr(mesh, "_GROUP_CACHE", {})
    fqns = toy_fqns()
    one = make_plan(fqns, 4, [[(4, 1, "DDP")]], global_batch_size=8, num_microbatches=1)
    assert ProcessGroups(one, torch.device("cpu")).host_group is None
    mixed = [(4, 1, "DDP")] + [(2, 2, "FSDP")] * (len(fqns) - 1)
    plan = make_plan(fqns, 4, [mixed], global_batch_size=8, num_microbatches=1)
    groups = ProcessGroups(plan, torch.device("cpu"))
    assert groups.host_group is host and made == ["gloo"]
    assert ProcessGroups(plan, torch.device("cpu")).host_group is host and made == ["gloo"]

    seen = []

    def all_gather(out, tensor, group=None, **kwargs):
        seen.append((tensor.device.type, group))
        for o in out:
            o.copy_(tensor)

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    context = BatchContext()
    context.microbatch_size = 8
    adapter = LayoutAdapter(lambda x: x, groups, (4, 1), (2, 2), context)
    adapter._check_same_structure(((torch.zeros(2, 3),), {}), 2)
    assert seen == [("cpu", host)]
