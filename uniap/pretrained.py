"""``uniap.checkpoint.load_pretrained``: pretrained weights straight into the shards of a
:class:`~uniap.executor.ParallelModel`.

    pm = uniap.parallelize(model, cluster, ...)        # model may be on the meta device
    uniap.checkpoint.load_pretrained(pm, "llama-dir")  # what save_pretrained wrote

Two formats, told apart by the files in the directory:

- a Hugging Face directory as ``save_pretrained`` writes it: ``model.safetensors``, or shards
  listed by ``model.safetensors.index.json``. Each rank opens the files (memory-mapped) and
  reads, tensor by tensor, only what it holds: the block of a DTensor shard given by its
  placements (``get_slice``), the whole tensor for a plain (classic DDP or free) parameter.
  No communication, and no rank ever holds more than one full tensor (a shard of a strided
  layout, FSDP over TP, is sliced out of the full tensor of that one parameter);
- a ``torch.distributed.checkpoint`` directory (``.metadata``): a :func:`uniap.checkpoint.save`
  checkpoint (its ``model`` entries) or a plain ``dcp.save(model_state_dict)``; DCP reads each
  rank's shards.

The model's names are its FQNs (``pm.named_parameters()``, the original model's). Tied
parameters (``lm_head.weight`` is ``model.embed_tokens.weight``) are loaded from whichever
of their names the checkpoint has (``save_pretrained`` stores one). Persistent buffers are
loaded when stored and kept otherwise. Everything is checked on every rank before a single
tensor is written: a parameter the checkpoint lacks, or a shape that differs, raises one
:class:`~uniap.checkpoint.CheckpointError` on every rank naming the tensor, the file and the
fix, and leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from uniap._dist import together
from uniap.errors import CheckpointError

__all__ = ["LoadedWeights", "load_pretrained"]

logger = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DCP_METADATA = ".metadata"
UNIAP_META = "uniap_meta.json"  # uniap.checkpoint.META: a checkpoint uniap.checkpoint.save wrote


@dataclasses.dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_pretrained` loaded on this rank."""

    path: Path
    """The checkpoint directory."""
    format: str
    """``"safetensors"`` (a Hugging Face directory) or ``"dcp"``."""
    loaded: tuple[str, ...]
    """FQNs of the parameters and buffers this rank loaded (sorted)."""
    tied: dict[str, str]
    """Tied names that were filled through the name the checkpoint stores (name -> stored)."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str  # the name in the checkpoint
    file: str  # where it lives (for messages and reading)
    shape: tuple[int, ...]


def load_pretrained(pm: Any, directory: str | os.PathLike[str]) -> LoadedWeights:
    """Load pretrained weights into ``pm``'s shards (in place): a Hugging Face directory as
    ``save_pretrained`` writes it (``model.safetensors`` or its sharded index; each rank reads
    only its slices) or a ``torch.distributed.checkpoint`` directory (e.g. one
    :func:`uniap.checkpoint.save` wrote). Collective: every rank calls it. Names and shapes
    are checked first: a missing parameter or a wrong shape raises :class:`CheckpointError` on
    every rank, naming the tensor, the file and the fix, and nothing is modified."""
    path = Path(directory)
    fmt = together(lambda: _detect(path), f"reading {path}", CheckpointError)
    targets = _targets(pm.module)
    if fmt == "safetensors":
        entries = together(
            lambda: _safetensors_entries(path), f"reading the headers in {path}", CheckpointError
        )
    else:
        entries = together(
            lambda: _dcp_entries(path), f"reading {path / DCP_METADATA}", CheckpointError
        )
    plan = together(
        lambda: _match(path, fmt, targets, entries), f"checking {path}", CheckpointError
    )
    loaded, tied = plan
    if fmt == "safetensors":
        _load_safetensors(path, targets, loaded)
    else:
        _load_dcp(pm, path, loaded)
    _report_unused(path, entries, loaded, tied)
    logger.info(
        "loaded %d tensor(s) of this rank from %s (%s)%s",
        len(loaded),
        path,
        fmt,
        f"; tied: {', '.join(f'{a} = {b}' for a, b in sorted(tied.items()))}" if tied else "",
    )
    return LoadedWeights(path=path, format=fmt, loaded=tuple(sorted(loaded)), tied=tied)


# ------------------------------------------------------------------------------ discovery
def _detect(path: Path) -> str:
    if not path.is_dir():
        raise CheckpointError(f"pretrained checkpoint {path} not found (no such directory)")
    if (path / SAFETENSORS_INDEX).is_file() or (path / SAFETENSORS).is_file():
        return "safetensors"
    if (path / DCP_METADATA).is_file():
        return "dcp"
    present = sorted(p.name for p in path.iterdir())[:8]
    hint = (
        "; it has a PyTorch pickle (pytorch_model.bin): re-save it with "
        "save_pretrained(..., safe_serialization=True)"
        if any(n.startswith("pytorch_model") for n in present)
        else ""
    )
    raise CheckpointError(
        f"{path} holds no loadable weights: expected {SAFETENSORS} or {SAFETENSORS_INDEX} "
        f"(Hugging Face save_pretrained) or {DCP_METADATA} (torch.distributed.checkpoint), "
        f"found {present}{hint}"
    )


def _targets(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters (every name of a tied one) and persistent buffers, by FQN."""
    out: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    persistent = set(module.state_dict().keys())
    for name, b in module.named_buffers(remove_duplicate=False):
        if name in persistent:
            out[name] = b
    return out


def _safetensors_entries(path: Path) -> dict[str, _Entry]:
    from safetensors import safe_open

    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"unreadable {index} ({type(e).__name__}: {e})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = [SAFETENSORS]
    out: dict[str, _Entry] = {}
    for file in files:
        if not (path / file).is_file():
            raise CheckpointError(
                f"{path}: shard {file} listed in {SAFETENSORS_INDEX} is missing; copy the "
                "whole checkpoint directory"
            )
        try:
            with safe_open(str(path / file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    out[name] = _Entry(name, file, tuple(f.get_slice(name).get_shape()))
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path / file}: unreadable safetensors file ({e})") from None
    return out


def _dcp_entries(path: Path) -> dict[str, _Entry]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        meta = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means a bad file
        raise CheckpointError(
            f"{path}: unreadable DCP metadata {DCP_METADATA} ({type(e).__name__}: {e})"
        ) from None
    tensors = {
        k: tuple(v.size)
        for k, v in meta.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    # a uniap checkpoint nests the model under "model" (next to "optim"): DCP keys "model.<fqn>"
    nested = (path / UNIAP_META).is_file() or any(
        k.startswith("optim.") for k in meta.state_dict_metadata
    )
    out = {}
    for key, shape in tensors.items():
        if nested:
            if not key.startswith("model."):
                continue
            name = key[len("model.") :]
        else:
            name = key
        out[name] = _Entry(key, DCP_METADATA, shape)
    return out


def _match(
    path: Path, fmt: str, targets: dict[str, torch.Tensor], entries: dict[str, _Entry]
) -> tuple[dict[str, _Entry], dict[str, str]]:
    """The entry each target is loaded from, checked; raises before anything is written."""
    aliases: dict[int, list[str]] = {}
    for name, t in targets.items():
        aliases.setdefault(id(t), []).append(name)
    loaded: dict[str, _Entry] = {}
    tied: dict[str, str] = {}
    params = {n for n, _ in _named_params(targets)}
    for name in sorted(targets):
        t = targets[name]
        stored = [a for a in sorted(aliases[id(t)]) if a in entries]
        if name not in entries:
            if stored:  # a tied name: filled through the one stored
                tied[name] = stored[0]
                continue
            if name not in params:
                continue  # a buffer the checkpoint does not store: kept
            near = difflib.get_close_matches(name, list(entries), n=3)
            where = DCP_METADATA
            if fmt == "safetensors":
                index = (path / SAFETENSORS_INDEX).is_file()
                where = SAFETENSORS_INDEX if index else SAFETENSORS
            raise CheckpointError(
                f"{path}: the model's parameter {name!r} is not in the checkpoint ({where}, "
                f"{len(entries)} tensors{'; nearest names: ' + ', '.join(near) if near else ''}); "
                "load a checkpoint of this model (same architecture and names, e.g. written by "
                "its save_pretrained), or rename the checkpoint's tensors to the model's names"
            )
        entry = entries[name]
        shape = tuple(t.shape)
        if entry.shape != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} in {entry.file} has shape {list(entry.shape)}, the "
                f"model's has {list(shape)}; the checkpoint is of another configuration: build "
                "the model from the checkpoint's config (e.g. AutoConfig.from_pretrained(path))"
            )
        loaded[name] = entry
    return loaded, tied


def _named_params(targets: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in targets.items() if isinstance(t, torch.nn.Parameter)]


# ------------------------------------------------------------------------------ loading
@torch.no_grad()
def _load_safetensors(
    path: Path,
    targets: dict[str, torch.Tensor],
    loaded: dict[str, _Entry],
) -> None:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, entry in loaded.items():
        by_file.setdefault(entry.file, []).append(name)
    for file in sorted(by_file):
        with safe_open(str(path / file), framework="pt", device="cpu") as f:
            for name in sorted(by_file[file]):
                _copy_into(targets[name], f, loaded[name].name)


def _copy_into(target: torch.Tensor, file: Any, name: str) -> None:
    """Fill ``target`` (a DTensor shard or a plain tensor) from tensor ``name`` of the open
    safetensors ``file``, reading only the shard's block where the layout allows."""
    if not isinstance(target, DTensor):
        target.copy_(file.get_tensor(name))
        return
    local = target.to_local()
    if target.dim() and all(type(p) in (Shard, Replicate) for p in target.placements):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements
        )
        if local.numel():
            index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
            local.copy_(file.get_slice(name)[index])
        return
    # a strided layout (FSDP over TP on one dim): slice this rank's part out of the full tensor
    full = file.get_tensor(name)
    part = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    local.copy_(part.to_local())


def _load_dcp(pm: Any, path: Path, loaded: dict[str, _Entry]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    mine = {k: v for k, v in pm.state_dict().items() if k in loaded}
    if any(loaded[k].name != k for k in mine):  # a uniap checkpoint: under "model"
        request: dict[str, Any] = {"model": mine}
        dcp.load(request, checkpoint_id=str(path))
        mine = request["model"]
    else:
        dcp.load(mine, checkpoint_id=str(path))
    # not strict: tied names come through the stored one, unstored buffers are kept
    set_model_state_dict(pm.module, mine, options=StateDictOptions(strict=False))


def _report_unused(
    path: Path, entries: dict[str, _Entry], loaded: dict[str, _Entry], tied: dict[str, str]
) -> None:
    """Warn (rank 0) about checkpoint tensors no rank loaded: a sign of a name mismatch."""
    used = set(loaded) | set(tied.values())
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(used))
    if dist.get_rank() != 0:
        return
    for names in everyone:
        used.update(names)
    unused = sorted(set(entries) - used)
    if unused:
        logger.warning(
            "%d tensor(s) in %s match no parameter or buffer of the model and were not loaded: %s",
            len(unused),
            path,
            ", ".join(unused[:5]),
        )
