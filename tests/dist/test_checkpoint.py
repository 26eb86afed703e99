"""Checkpoint and resume (``uniap.checkpoint``) on CPU gloo: same-plan resume is exact,
cross-plan and cross-world-size loads reshard, failed saves keep the last good checkpoint,
corrupt checkpoints are refused.

One spawned group of 4 runs every world-4 case, then one of 2 (which loads a checkpoint the
world-4 group wrote); the case functions below run on every rank (``harness.run_cases``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from toy import SEQ, VOCAB, build_toy, make_plan, toy_fqns, toy_loss

from uniap import checkpoint
from uniap.checkpoint import CheckpointError
from uniap.executor import apply_plan, default_device

pytestmark = pytest.mark.dist

D, F, OFF = "DDP", "FSDP", "FSDP-offload"
LR, EPS = 1e-3, 1e-6
B = 8
SAME_RTOL = 1e-6
PARITY_RTOL, PARITY_ATOL = 1e-4, 1e-5

# name -> (world size, per-stage strategies, micro-batches, schedule)
PLANS: dict[str, tuple[int, list, int, str]] = {
    "w4_pp2_fsdp": (4, [[(2, 1, F)], [(2, 1, F)]], 2, "1F1B"),
    "w4_pp1_dp2tp2": (4, [[(4, 1, D), (2, 2, F), (2, 2, D), (4, 1, F)]], 2, "GPipe"),
    "w2_pp1_tp2": (2, [[(2, 1, F), (1, 2, D), (1, 2, F), (2, 1, D)]], 1, "GPipe"),
    "w2_pp2": (2, [[(1, 1, D)], [(1, 1, F)]], 2, "1F1B"),
    # state in host memory: sharded over 4 ranks, and whole on stages of one device (no
    # classic DDP at dp > 2 here: its resume is exact only to the last bits, see README)
    "w4_pp1_offload": (4, [[(4, 1, OFF), (4, 1, F), (4, 1, F), (4, 1, OFF)]], 2, "GPipe"),
    "w2_pp2_offload_dp1": (2, [[(1, 1, OFF)], [(1, 1, OFF)]], 2, "1F1B"),
}


def _plan(name: str) -> Any:
    ws, stages, c, sched = PLANS[name]
    return make_plan(
        toy_fqns(), ws, stages, global_batch_size=B, num_microbatches=c, schedule=sched
    )


def _build(plan_name: str, seed: int = 0) -> tuple[Any, torch.optim.Optimizer]:
    pm = apply_plan(
        build_toy(seed=seed),
        _plan(plan_name),
        loss_fn=toy_loss,
        device=default_device(),
        layers=_toy_layers(),
    )
    return pm, torch.optim.AdamW(pm.param_groups(), lr=LR, eps=EPS, foreach=True)


def _toy_layers() -> Any:
    from toy import toy_layers

    return toy_layers()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch drawn from the global torch RNG: resuming reproduces it only if the checkpoint
    restored the RNG state."""
    seq = torch.randint(VOCAB, (B, SEQ + 1))
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def _train(pm: Any, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for _ in steps:
        x, y = _batch()
        opt.zero_grad()
        losses.append(pm.train_step(x, y))
        opt.step()
    return losses


def _reference(steps: int) -> list[float]:
    """Single-process AdamW with the same seed and the same batches."""
    torch.manual_seed(1234)
    model = build_toy(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, foreach=True)
    torch.manual_seed(1234)
    losses = []
    for _ in range(steps):
        x, y = _batch()
        opt.zero_grad()
        loss = toy_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def _equal(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ (tensors bit-exact, other values ==)."""
    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        if not same:
            bad.append(k)
    return bad


def _close(a: list[float], b: list[float], rtol: float, atol: float = 0.0) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= atol + rtol * abs(y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------ case bodies
def resume_same_plan(case: dict) -> dict | None:
    """Train 5 steps saving after step 2; a fresh model (other init) loads it and trains 3..5."""
    root = Path(case["dir"])
    pm, opt = _build(case["plan"])
    torch.manual_seed(1234)
    losses = _train(pm, opt, range(2))
    checkpoint.save(checkpoint.step_dir(root, 2), pm, opt, step=2, data_position={"batches": 2})
    losses += _train(pm, opt, range(2, 5))
    final = checkpoint.export_full_state_dict(pm)

    pm2, opt2 = _build(case["plan"], seed=1)
    torch.manual_seed(999)  # a different RNG stream: only load() can bring back the right one
    meta = checkpoint.load(checkpoint.latest(root), pm2, opt2)
    resumed = _train(pm2, opt2, range(meta.step, 5))
    final2 = checkpoint.export_full_state_dict(pm2)
    if dist.get_rank() != 0:
        return None
    single = build_toy(seed=7)
    single.load_state_dict(final2)  # strict: the export fits the original model
    return {
        "losses": losses,
        "resumed": resumed,
        "step": meta.step,
        "data_position": meta.data_position,
        "same_losses": _close(resumed, losses[2:], SAME_RTOL),
        "params_differ": _equal(final, final2),
        "reference_close": _close(losses, _reference(5), PARITY_RTOL, PARITY_ATOL),
    }


def save_for_other_plan(case: dict) -> dict | None:
    """Train 2 steps under ``plan``, save, record the full state, train 2 more (the
    uninterrupted losses)."""
    root = Path(case["dir"])
    pm, opt = _build(case["plan"])
    torch.manual_seed(1234)
    _train(pm, opt, range(2))
    checkpoint.save(checkpoint.step_dir(root, 2), pm, opt, step=2, data_position=2)
    params = checkpoint.export_full_state_dict(pm)
    optim = checkpoint.full_optimizer_state_dict(pm, opt)
    after = _train(pm, opt, range(2, 4))
    if dist.get_rank() == 0:
        torch.save({"params": params, "optim": optim, "after": after}, root / "expected.pt")
    return None


def load_other_plan(case: dict) -> dict | None:
    """Load ``case["from"]``'s checkpoint under ``plan``: same full state, same continuation."""
    root = Path(case["from"])
    pm, opt = _build(case["plan"], seed=3)
    torch.manual_seed(5)
    meta = checkpoint.load(checkpoint.latest(root), pm, opt)
    params = checkpoint.export_full_state_dict(pm)
    optim = checkpoint.full_optimizer_state_dict(pm, opt)
    after = _train(pm, opt, range(meta.step, 4))
    if dist.get_rank() != 0:
        return None
    expected = torch.load(root / "expected.pt", weights_only=False)
    return {
        "saved_world": meta.world_size,
        "params_differ": _equal(params, expected["params"]),
        "optim_differ": _equal(optim, expected["optim"]),
        "num_optim_keys": len(optim),
        "after": after,
        "expected_after": expected["after"],
        "continues": _close(after, expected["after"], PARITY_RTOL, PARITY_ATOL),
        "reference_close": _close(after, _reference(4)[2:], PARITY_RTOL, PARITY_ATOL),
    }


def failed_save_keeps_last(case: dict) -> dict | None:
    """A save that fails on rank 1 (replacing the same directory) raises on every rank and
    leaves the previous checkpoint loadable."""
    root = Path(case["dir"])
    pm, opt = _build(case["plan"])
    torch.manual_seed(1234)
    _train(pm, opt, range(1))
    path = checkpoint.step_dir(root, 1)
    checkpoint.save(path, pm, opt, step=1)
    before = checkpoint.export_full_state_dict(pm)
    _train(pm, opt, range(1, 2))
    real = checkpoint._write_rng

    def broken(p: Path) -> None:
        raise OSError(28, "No space left on device")

    if dist.get_rank() == 1:
        checkpoint._write_rng = broken
    try:
        checkpoint.save(path, pm, opt, step=2)
        error = None
    except CheckpointError as e:
        error = str(e)
    finally:
        checkpoint._write_rng = real
    pm2, opt2 = _build(case["plan"], seed=1)
    meta = checkpoint.load(checkpoint.latest(root), pm2, opt2)
    restored = checkpoint.export_full_state_dict(pm2)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, error)
    if dist.get_rank() != 0:
        return None
    return {"errors": everyone, "step": meta.step, "params_differ": _equal(before, restored)}


def load_corrupt(case: dict) -> dict | None:
    """Loading a checkpoint with a truncated shard raises CheckpointError on every rank."""
    src = checkpoint.latest(Path(case["from"]))
    bad = Path(case["dir"]) / "step_00000002"
    if dist.get_rank() == 0:
        shutil.copytree(src, bad)
        shard = next(p for p in sorted(bad.iterdir()) if p.suffix == ".distcp")
        shard.write_bytes(shard.read_bytes()[:-7])
    dist.barrier()
    pm, opt = _build(case["plan"])
    try:
        checkpoint.load(bad, pm, opt)
        error = None
    except CheckpointError as e:
        error = str(e)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, error)
    return {"errors": everyone} if dist.get_rank() == 0 else None


_CASES = {
    f.__name__: f
    for f in (
        resume_same_plan,
        save_for_other_plan,
        load_other_plan,
        failed_save_keeps_last,
        load_corrupt,
    )
}


def run(case: dict) -> dict | None:
    """Harness entry point: dispatch on ``case["fn"]``."""
    import time

    t0 = time.perf_counter()
    out = _CASES[case["fn"]](case)
    if out is not None:
        out["wall_s"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ckpt")
    names = ("w4_same", "w4_cross", "w4_offload", "w2_same", "w2_fail", "w2_corrupt")
    return {n: base / n for n in (*names, "w2_offload")}


@pytest.fixture(scope="module")
def w4(dirs: dict[str, Path]) -> dict[str, Any]:
    from harness import run_cases

    cases = [
        {
            "name": "same",
            "fn": "resume_same_plan",
            "plan": "w4_pp2_fsdp",
            "dir": str(dirs["w4_same"]),
        },
        {
            "name": "save_pp2",
            "fn": "save_for_other_plan",
            "plan": "w4_pp2_fsdp",
            "dir": str(dirs["w4_cross"]),
        },
        {
            "name": "load_dp2tp2",
            "fn": "load_other_plan",
            "plan": "w4_pp1_dp2tp2",
            "from": str(dirs["w4_cross"]),
        },
        {
            "name": "same_offload",
            "fn": "resume_same_plan",
            "plan": "w4_pp1_offload",
            "dir": str(dirs["w4_offload"]),
        },
    ]
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    return run_cases(4, "test_checkpoint:run", cases)


@pytest.fixture(scope="module")
def w2(w4: dict[str, Any], dirs: dict[str, Path]) -> dict[str, Any]:
    from harness import run_cases

    cases = [
        {"name": "same", "fn": "resume_same_plan", "plan": "w2_pp2", "dir": str(dirs["w2_same"])},
        {
            "name": "same_offload",
            "fn": "resume_same_plan",
            "plan": "w2_pp2_offload_dp1",
            "dir": str(dirs["w2_offload"]),
        },
        {
            "name": "load_from_w4",
            "fn": "load_other_plan",
            "plan": "w2_pp1_tp2",
            "from": str(dirs["w4_cross"]),
        },
        {
            "name": "failed_save",
            "fn": "failed_save_keeps_last",
            "plan": "w2_pp1_tp2",
            "dir": str(dirs["w2_fail"]),
        },
        {
            "name": "corrupt",
            "fn": "load_corrupt",
            "plan": "w2_pp2",
            "from": str(dirs["w2_same"]),
            "dir": str(dirs["w2_corrupt"]),
        },
    ]
    return run_cases(2, "test_checkpoint:run", cases)


def _ok(res: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in res, res.get("error")
    return res


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("world", [4, 2])
def test_resume_same_plan_losses_equal_uninterrupted(
    w4: dict[str, Any], w2: dict[str, Any], world: int
) -> None:
    """Stop after step 2, reload into a fresh model: steps 3..5 equal the uninterrupted run."""
    res = _ok((w4 if world == 4 else w2)["same"])
    assert res["step"] == 2 and res["data_position"] == {"batches": 2}
    assert res["same_losses"], f"{res['resumed']} vs {res['losses'][2:]}"
    assert res["params_differ"] == []
    assert res["reference_close"], res["losses"]


@pytest.mark.parametrize("world", [4, 2])
def test_resume_with_state_in_host_memory_equals_uninterrupted(
    w4: dict[str, Any], w2: dict[str, Any], world: int
) -> None:
    """FSDP-offload layers (parameters, gradients and AdamW state in host memory; at world 2
    on stages of one device, dp = 1): the same resume, exact."""
    res = _ok((w4 if world == 4 else w2)["same_offload"])
    assert res["step"] == 2 and res["same_losses"], f"{res['resumed']} vs {res['losses'][2:]}"
    assert res["params_differ"] == []
    assert res["reference_close"], res["losses"]


def test_w4_pp2_fsdp_checkpoint_loads_under_pp1_dp2tp2(w4: dict[str, Any]) -> None:
    """pp=2 FSDP -> pp=1 dp2 x tp2: identical full parameters and optimizer state; training
    continues like the uninterrupted run and the single-process reference."""
    res = _ok(w4["load_dp2tp2"])
    assert res["params_differ"] == [] and res["optim_differ"] == []
    assert res["num_optim_keys"] > 0
    assert res["continues"], f"{res['after']} vs {res['expected_after']}"
    assert res["reference_close"]


def test_w4_checkpoint_loads_at_world_2(w2: dict[str, Any]) -> None:
    """A checkpoint written by 4 ranks (pp=2 FSDP) loads on 2 ranks (pp=1, TP): same state."""
    res = _ok(w2["load_from_w4"])
    assert res["saved_world"] == 4
    assert res["params_differ"] == [] and res["optim_differ"] == []
    assert res["continues"] and res["reference_close"], res


def test_failed_save_raises_everywhere_and_keeps_previous(w2: dict[str, Any]) -> None:
    """A save failing on rank 1 raises CheckpointError on both ranks; the last good one loads."""
    res = _ok(w2["failed_save"])
    assert all(e and "No space left on device" in e and "rank 1" in e for e in res["errors"])
    assert res["step"] == 1 and res["params_differ"] == []


def test_truncated_shard_refused_on_every_rank(w2: dict[str, Any]) -> None:
    """load() of a checkpoint with a truncated shard raises on every rank, naming the file."""
    res = _ok(w2["corrupt"])
    for e in res["errors"]:
        assert e and "is corrupt: file __" in e and "bytes," in e and "were written" in e


# ---------------------------------------------------------- verify / latest (no process group)
def _good(w2: dict[str, Any], dirs: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the world-2 checkpoint root (step 2) to damage."""
    _ok(w2["same"])
    root = tmp_path / "root"
    shutil.copytree(dirs["w2_same"], root)
    return root, root / "step_00000002"


def test_verify_reads_meta_of_good_checkpoint(
    w2: dict[str, Any], dirs: dict[str, Path], tmp_path: Path
) -> None:
    """verify() returns the recorded step, world size and plan; hashes check out."""
    _, good = _good(w2, dirs, tmp_path)
    meta = checkpoint.verify(good, check_hashes=True)
    assert (meta.step, meta.world_size, meta.plan.pp_degree) == (2, 2, 2)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_marker", "is incomplete: no COMPLETE.json marker"),
        ("missing_shard", "is corrupt: file __0_0.distcp is missing"),
        ("truncated_shard", "is corrupt: file __1_0.distcp has"),
        ("garbage_metadata", "is corrupt: file .metadata has"),
        ("bad_marker", "unreadable marker COMPLETE.json"),
        ("missing_rng", "is corrupt: file rng/rank1.pt is missing"),
    ],
)
def test_damaged_checkpoint_refused_and_latest_falls_back(
    w2: dict[str, Any], dirs: dict[str, Path], tmp_path: Path, damage: str, message: str
) -> None:
    """A damaged newest checkpoint is refused with a message; latest() returns the older one."""
    root, good = _good(w2, dirs, tmp_path)
    newer = root / "step_00000004"
    shutil.copytree(good, newer)
    if damage == "no_marker":
        (newer / "COMPLETE.json").unlink()
    elif damage == "missing_shard":
        (newer / "__0_0.distcp").unlink()
    elif damage == "truncated_shard":
        p = newer / "__1_0.distcp"
        p.write_bytes(p.read_bytes()[:10])
    elif damage == "garbage_metadata":
        (newer / ".metadata").write_bytes(b"\x00garbage")
    elif damage == "bad_marker":
        (newer / "COMPLETE.json").write_text("{not json")
    elif damage == "missing_rng":
        (newer / "rng" / "rank1.pt").unlink()
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        checkpoint.verify(newer)
    assert checkpoint.latest(root) == good


def test_altered_bytes_caught_by_hashes(
    w2: dict[str, Any], dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A same-size change to a shard passes the size check but not the SHA-256 check."""
    _, good = _good(w2, dirs, tmp_path)
    p = good / "__0_0.distcp"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    checkpoint.verify(good)
    with pytest.raises(CheckpointError, match="file __0_0.distcp changed since it was written"):
        checkpoint.verify(good, check_hashes=True)


def test_latest_ignores_partial_save_and_empty_root(tmp_path: Path) -> None:
    """A hidden .partial directory (a crashed save) is never returned; no checkpoint -> None."""
    assert checkpoint.latest(tmp_path / "nothing") is None
    (tmp_path / ".step_00000009.partial").mkdir()
    (tmp_path / "step_00000009").mkdir()  # published without a marker: refused
    assert checkpoint.latest(tmp_path) is None
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.verify(tmp_path / "step_00000010")
