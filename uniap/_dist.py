"""Process plumbing shared by the public entry points, the CLI, tests and benchmarks: a free
rendezvous port, the device of this rank, and the three ways a process joins the default
process group (from torchrun's environment, as one of several processes started by hand on
this machine, or as a world of one).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["default_device", "free_port", "init_from_env", "init_local_worker"]

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_device() -> torch.device:
    """``cuda:{LOCAL_RANK}`` when CUDA is really available, else ``cpu`` (hide the GPUs with
    ``CUDA_VISIBLE_DEVICES=""`` to run on CPU with gloo on a GPU machine)."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"LOCAL_RANK {local_rank} has no GPU: this node has {count} visible GPU(s); launch "
                f"at most {count} processes per node, or set CUDA_VISIBLE_DEVICES='' to use the CPU"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_local_worker(
    rank: int, world_size: int, port: int, *, backend: str = "gloo", timeout_s: float = 300.0
) -> None:
    """Join a process group as one of ``world_size`` processes started by hand on this machine
    (multiprocessing spawn in tests and benchmarks): set the environment torchrun would set,
    one intra-op thread per process (the ranks share the cores), and initialise the group."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )


def init_from_env(timeout_s: float) -> None:
    """Initialise the default process group from torchrun's environment (NCCL on
    :func:`default_device` when CUDA is available, else gloo); a plain ``python script.py``
    becomes a world of one. Does nothing when the group exists."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:  # plain `python script.py`: a world of one
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
    # torch 2.13's elastic agent shares its TCP store with the workers; after a restart the
    # workers then read the previous attempt's gloo addresses and fail to connect
    # (pytorch/pytorch#135712). A store of their own per attempt avoids that.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    logger.info(
        "initialised %s process group: rank %d of %d",
        backend,
        dist.get_rank(),
        dist.get_world_size(),
    )


def together(fn: Callable[[], Any], what: str, error: type[Exception]) -> Any:
    """Run ``fn`` on every rank; if any rank fails (``error`` itself, or an I/O, value or
    runtime error, named with the rank and ``what``), every rank raises ``error`` with the
    first failing rank's message. Collective over the world."""
    status = None
    out = None
    try:
        out = fn()
    except error as e:
        status = str(e)
    except (OSError, ValueError, RuntimeError) as e:
        status = f"rank {dist.get_rank()}: {what}: {type(e).__name__}: {e}"
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, status)
    errors = [s for s in everyone if s]
    if errors:
        raise error(errors[0])
    return out
