"""The exceptions uniap raises on purpose.

Bad user input (a cluster file, a plan that does not fit the model, an option out of range)
is a `UniapError`, a `ValueError`, whose message names the offending value and the fix.
A well-formed problem with no answer (no plan fits in device memory) is an
`InfeasibleError`, a `RuntimeError`, that says what to relax.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "InfeasibleError",
    "PlanMismatchError",
    "UniapError",
]


class UniapError(ValueError):
    """Base class for every bad-user-input error uniap raises; the message says how to fix it."""


class ConfigError(UniapError):
    """A configuration file or field is missing, malformed or out of range (cluster, profile)."""


class PlanMismatchError(UniapError):
    """A plan does not match the model or cluster it is applied to (layers, world size)."""


class CheckpointError(UniapError):
    """A checkpoint directory is missing, incomplete, corrupt or does not fit the model; the
    message says which file (and tensor) and what to do."""


class InfeasibleError(RuntimeError):
    """No plan fits the constraints; the message names what to relax.

    `min_memory_bytes` is the smallest per-device memory with which some plan would fit,
    when the planner knows it, else None. `candidates` lists every (pipeline degree,
    micro-batch count, schedule) the planner tried, each with its status and the reason it
    gave no plan (rows as in `Plan.solver["candidates"]`).
    """

    def __init__(
        self,
        message: str,
        *,
        min_memory_bytes: float | None = None,
        candidates: list[dict] | None = None,
    ) -> None:
        super().__init__(message)
        self.min_memory_bytes = min_memory_bytes
        self.candidates = list(candidates or [])
