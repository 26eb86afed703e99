"""Checkpoint and resume a :class:`~uniap.executor.ParallelModel` and its optimizer.

    from uniap import checkpoint
    checkpoint.load_pretrained(pm, "llama-7b")            # optional: start from pretrained weights
    ckpt = checkpoint.latest("ckpt")                      # newest *complete* checkpoint or None
    start = checkpoint.load(ckpt, pm, opt).step if ckpt else 0
    for step in range(start, steps):
        ...train...
        if (step + 1) % 100 == 0:
            checkpoint.save(checkpoint.step_dir("ckpt", step + 1), pm, opt, step=step + 1)

Format: a directory written with ``torch.distributed.checkpoint`` (DCP). Every rank writes its
own shards of the model (``pm.state_dict()``, original FQNs) and of the optimizer (flattened,
FQN-keyed: ``state.<fqn>.exp_avg``), so a checkpoint written under one plan loads under any
other plan of the same model, at any world size: DCP reshards. Next to the shards:

- ``uniap_meta.json``: the plan, the step, the data position, ``extra``, the world size;
- ``rng/rank<r>.pt``: each rank's torch / numpy / python (and CUDA) RNG states;
- ``COMPLETE.json``: the marker, written last, with every file's size and SHA-256.

Atomic: everything is written to a hidden ``.<name>.partial`` directory next to ``path``;
after all ranks finished (a barrier), rank 0 writes the marker and publishes the directory
with one ``rename``. A crash at any moment leaves either the old checkpoint or the new one,
never a half-written one under the final name. :func:`verify` refuses a directory without the
marker, with a missing, truncated or altered file, or with unreadable metadata, saying what is
wrong; :func:`latest` skips such directories and returns the newest good one.

The directory must be on a file system every rank sees (one node, or a shared mount).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from uniap._dist import together
from uniap.contract import Plan
from uniap.errors import CheckpointError, PlanMismatchError
from uniap.pretrained import LoadedWeights, load_pretrained

__all__ = [
    "CheckpointError",
    "CheckpointMeta",
    "LoadedWeights",
    "export_full_state_dict",
    "full_optimizer_state_dict",
    "latest",
    "load",
    "load_pretrained",
    "save",
    "step_dir",
    "verify",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "COMPLETE.json"
META = "uniap_meta.json"
RNG_DIR = "rng"
_STEP_DIR = re.compile(r"step_(\d+)")
_HASH_CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint records besides the tensors."""

    path: Path
    """The checkpoint directory."""
    step: int
    """Training steps completed when it was saved (resume at this step index)."""
    data_position: Any
    """Where the data stream stood (JSON value given to :func:`save`), e.g. samples consumed."""
    extra: dict[str, Any]
    """The user's JSON dict given to :func:`save`."""
    plan: Plan
    """The plan the checkpoint was written under."""
    world_size: int
    """World size it was written at (one RNG file per rank)."""


def step_dir(root: str | os.PathLike[str], step: int) -> Path:
    """The conventional directory of the checkpoint of ``step`` under ``root``:
    ``step_00000042``."""
    return Path(root) / f"step_{step:08d}"


# ------------------------------------------------------------------------------------- save
def save(
    path: str | os.PathLike[str],
    pm: Any,
    optimizer: torch.optim.Optimizer | None,
    *,
    step: int,
    data_position: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of ``pm`` (a ParallelModel) and ``optimizer`` to ``path``. Collective:
    every rank calls it with the same arguments. Returns ``path`` once it is published.

    ``step``: steps completed. ``data_position`` and ``extra``: JSON values handed back by
    :func:`load`. An existing checkpoint at ``path`` is replaced atomically."""
    import torch.distributed.checkpoint as dcp

    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"step must be a non-negative integer, got {step!r}")
    try:
        json.dumps({"data_position": data_position, "extra": extra})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"data_position and extra must be JSON values: {e}") from None
    path = Path(path)
    tmp = path.parent / f".{path.name}.partial"
    rank, world = dist.get_rank(), dist.get_world_size()

    def prepare() -> None:
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a save that crashed
                shutil.rmtree(tmp)
            (tmp / RNG_DIR).mkdir(parents=True)

    together(prepare, f"preparing {tmp}", CheckpointError)
    dcp.save(_state(pm, optimizer), checkpoint_id=str(tmp))
    together(
        lambda: _write_rng(tmp / RNG_DIR / f"rank{rank}.pt"), "writing RNG state", CheckpointError
    )

    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    mine: dict[str, list[Any]] = {}
    status = None
    try:  # hash a share of the files on every rank
        for f in files[rank::world]:
            mine[f] = [(tmp / f).stat().st_size, _sha256(tmp / f)]
    except OSError as e:
        status = f"rank {rank}: {e}"
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (status, mine))
    errors = [s for s, _ in everyone if s]
    if errors:
        raise CheckpointError(f"saving {path} failed: {errors[0]}")
    manifest: dict[str, Any] = {}
    for _, part in everyone:
        manifest.update(part)

    def publish() -> None:
        if rank != 0:
            return
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "data_position": data_position,
            "extra": extra or {},
            "world_size": world,
            "plan": pm.plan.to_dict(),
            "torch": torch.__version__,
        }
        _write_durable(tmp / META, json.dumps(meta, indent=1, sort_keys=True))
        manifest[META] = [(tmp / META).stat().st_size, _sha256(tmp / META)]
        marker = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "files": dict(sorted(manifest.items())),
        }
        _write_durable(tmp / MARKER, json.dumps(marker, indent=1))
        old = path.parent / f".{path.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            path.rename(old)
        tmp.rename(path)  # the publication: atomic on one file system
        _fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)

    together(publish, f"publishing {path}", CheckpointError)
    logger.info("checkpoint of step %d saved to %s (%d files)", step, path, len(manifest) + 1)
    return path


# ------------------------------------------------------------------------------------- load
def load(
    path: str | os.PathLike[str],
    pm: Any,
    optimizer: torch.optim.Optimizer | None,
    *,
    restore_rng: bool = True,
    check_hashes: bool = True,
) -> CheckpointMeta:
    """Load the checkpoint at ``path`` into ``pm`` and ``optimizer`` (in place), whatever plan or
    world size it was written under. Collective. Returns its :class:`CheckpointMeta`.

    ``restore_rng``: restore each rank's RNG states (rank ``r`` gets rank ``r``'s when the world
    size is unchanged, else rank ``r % saved_world``'s). ``check_hashes``: verify every file's
    SHA-256 first (the files are split over the ranks). A missing, partial or corrupt
    checkpoint raises :class:`CheckpointError` on every rank, naming the file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = Path(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = together(lambda: verify(path, check_hashes=False), f"checking {path}", CheckpointError)
    if check_hashes:
        marker = json.loads((path / MARKER).read_text())
        names = sorted(marker["files"])
        together(
            lambda: _check_hashes(path, {f: marker["files"][f] for f in names[rank::world]}),
            f"checking the file hashes of {path}",
            CheckpointError,
        )
    if meta.plan.model_signature != pm.plan.model_signature:
        raise PlanMismatchError(
            f"checkpoint {path} is of model {meta.plan.model_name!r} (signature "
            f"{meta.plan.model_signature}), this model has signature {pm.plan.model_signature}; "
            "load it into the model it was saved from"
        )
    state = _state(pm, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    pm.load_state_dict(state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(pm.module, optimizer, state["optim"], options=_options())
    if restore_rng:
        source = rank if meta.world_size == world else rank % meta.world_size
        _restore_rng(path / RNG_DIR / f"rank{source}.pt")
    same = meta.plan.to_dict()["stages"] == pm.plan.to_dict()["stages"]
    logger.info(
        "checkpoint of step %d loaded from %s (%s)",
        meta.step,
        path,
        "same plan" if same else f"resharded from {meta.plan.summary()} at world {meta.world_size}",
    )
    return meta


def verify(path: str | os.PathLike[str], *, check_hashes: bool = False) -> CheckpointMeta:
    """Check a checkpoint directory without loading it (no process group needed): the marker,
    every file's presence and size (and SHA-256 with ``check_hashes``), the metadata. Returns
    its :class:`CheckpointMeta`; raises :class:`CheckpointError` saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} not found (no such directory)")
    marker_file = path / MARKER
    if not marker_file.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: no {MARKER} marker (its save was interrupted); "
            "use an earlier one, e.g. uniap.checkpoint.latest(root)"
        )
    try:
        marker = json.loads(marker_file.read_text())
        files = marker["files"]
        sizes = {str(f): int(v[0]) for f, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable marker {MARKER} ({e})") from None
    for f, size in sorted(sizes.items()):
        p = path / f
        if not p.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: file {f} is missing")
        got = p.stat().st_size
        if got != size:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: file {f} has {got} bytes, {size} were written"
            )
    if check_hashes:
        _check_hashes(path, files)
    for needed in (META, ".metadata"):
        if needed not in sizes:
            raise CheckpointError(f"checkpoint {path} is corrupt: {MARKER} does not list {needed}")
    try:
        meta = json.loads((path / META).read_text())
        plan = Plan.from_dict(meta["plan"], source=f"{path / META}: plan")
        out = CheckpointMeta(
            path=path,
            step=int(meta["step"]),
            data_position=meta.get("data_position"),
            extra=dict(meta.get("extra") or {}),
            plan=plan,
            world_size=int(meta["world_size"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {META} ({e})") from None
    missing = [r for r in range(out.world_size) if f"{RNG_DIR}/rank{r}.pt" not in sizes]
    if missing:
        raise CheckpointError(f"checkpoint {path} is corrupt: no RNG state for ranks {missing}")
    try:
        from torch.distributed.checkpoint import FileSystemReader

        FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means a bad file
        raise CheckpointError(
            f"checkpoint {path}: unreadable DCP metadata .metadata ({type(e).__name__}: {e})"
        ) from None
    return out


def latest(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete, intact checkpoint directly under ``root`` (by recorded step), or
    None. Directories that fail :func:`verify` (sizes only) are skipped with a warning. No
    process group needed; every rank gets the same answer from the same file system."""
    root = Path(root)
    if not root.is_dir():
        return None
    found: list[tuple[int, str, Path]] = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        try:
            meta = verify(d)
        except CheckpointError as e:
            logger.warning("skipping %s", e)
            continue
        found.append((meta.step, d.name, d))
    return max(found)[2] if found else None


# ---------------------------------------------------------------------------- full export
def export_full_state_dict(pm: Any) -> dict[str, torch.Tensor]:
    """The full, unsharded model state dict on rank 0 (CPU tensors, original FQNs), loadable
    with ``model.load_state_dict`` into the original single-device model; ``{}`` on other
    ranks. Collective; streamed tensor by tensor to rank 0, never through ``gather_object``
    (:mod:`uniap.executor.full_state`)."""
    return pm.full_state_dict()


def full_optimizer_state_dict(pm: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full, unsharded optimizer state on rank 0 in the flattened FQN layout
    (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``); ``{}`` on other ranks. Collective;
    streamed tensor by tensor like :func:`export_full_state_dict`.

    It loads into a single-device model's optimizer with ``set_optimizer_state_dict(model, opt,
    osd, options=StateDictOptions(flatten_optimizer_state_dict=True))``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from uniap.executor.full_state import stream_full_state

    return stream_full_state(
        pm.groups,
        lambda: get_optimizer_state_dict(pm.module, optimizer, options=_options()),
        pm.device,
    )


# ----------------------------------------------------------------------------- helpers
def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # flattened: FQN-keyed entries, so stages with different parameters reshard cleanly
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _state(pm: Any, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state: dict[str, Any] = {"model": pm.state_dict()}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(pm.module, optimizer, options=_options())
    return state


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _check_hashes(path: Path, files: dict[str, Any]) -> None:
    for f, (_, digest) in sorted(files.items()):
        p = path / f
        if not p.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: file {f} is missing")
        if _sha256(p) != digest:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: file {f} changed since it was written (SHA-256)"
            )


def _write_durable(p: Path, text: str) -> None:
    with p.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_rng(p: Path) -> None:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    with p.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _restore_rng(p: Path) -> None:
    try:
        # numpy's state holds a numpy array and python's a tuple: not weights_only material
        state = torch.load(p, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"unreadable RNG state {p} ({type(e).__name__}: {e})") from None
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
