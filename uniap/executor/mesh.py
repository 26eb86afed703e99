"""Rank arithmetic and the process groups a plan needs.

The layout (the cost model assumes exactly this; keep them in step):

* ``pp`` stages of ``g = world / pp`` consecutive ranks: stage ``i`` holds ranks
  ``[i * g, (i + 1) * g)``. A rank's *local* index is ``rank - i * g``.
* A layer with strategy ``(dp, tp)`` runs on a ``(dp, tp)`` mesh over its stage's ranks with
  ``tp`` innermost: the TP group is ``tp`` consecutive ranks, the DP group is the ``dp`` ranks
  with the same ``local % tp`` (stride ``tp``). The rank's data-parallel index is
  ``local // tp``.
* Pipeline *lanes*: the rank at local index ``l`` of stage ``i`` talks point-to-point only to
  the rank at local index ``l`` of stage ``i + 1``; lane ``l`` is ``{l + i * g : i < pp}``.
* Activation resharding between layouts ``(dp_a, tp_a)`` and ``(dp_b, tp_b)`` of one stage
  (see :mod:`uniap.executor.reshard`) gathers or slices the batch over a *gather group*
  ``(tp_small, tp_big)``: inside each block of ``tp_big`` consecutive local ranks, the
  ``k = tp_big / tp_small`` ranks with the same ``local % tp_small`` (stride ``tp_small``).

Every process group is created on every rank in the same deterministic order (DeviceMesh and
``new_group`` creation is collective over the world), and cached per world group so that
applying many plans in one process group (tests, re-planning) does not leak groups.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from uniap._dist import default_device
from uniap.contract import Plan, Strategy

__all__ = [
    "GatherStep",
    "ProcessGroups",
    "RankLayout",
    "SliceStep",
    "default_device",
    "reshard_steps",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankLayout:
    """Pure rank arithmetic of a world split into ``pp_degree`` equal stages."""

    world_size: int
    """Number of ranks."""
    pp_degree: int
    """Number of pipeline stages."""

    def __post_init__(self) -> None:
        if self.pp_degree < 1 or self.world_size % self.pp_degree:
            divisors = [d for d in range(1, self.world_size + 1) if self.world_size % d == 0]
            raise ValueError(
                f"pipeline degree ({self.pp_degree}) must divide the number of devices "
                f"({self.world_size}); try pp in {divisors}"
            )

    @property
    def stage_size(self) -> int:
        """Ranks per stage (``g``)."""
        return self.world_size // self.pp_degree

    def stage_of(self, rank: int) -> int:
        """Stage index of ``rank``."""
        return rank // self.stage_size

    def stage_start(self, stage: int) -> int:
        """First global rank of ``stage``."""
        return stage * self.stage_size

    def local(self, rank: int) -> int:
        """Index of ``rank`` inside its stage."""
        return rank % self.stage_size

    def stage_ranks(self, stage: int) -> tuple[int, ...]:
        """Global ranks of ``stage``."""
        s = self.stage_start(stage)
        return tuple(range(s, s + self.stage_size))

    def _check_shape(self, dp: int, tp: int) -> None:
        if dp * tp != self.stage_size:
            raise ValueError(f"dp ({dp}) x tp ({tp}) must equal the stage size ({self.stage_size})")

    def dp_index(self, rank: int, tp: int) -> int:
        """Which of the ``dp`` batch shards ``rank`` holds under a layer with TP degree ``tp``."""
        return self.local(rank) // tp

    def tp_group(self, rank: int, dp: int, tp: int) -> tuple[int, ...]:
        """The TP group of ``rank``: ``tp`` consecutive ranks."""
        self._check_shape(dp, tp)
        first = rank - self.local(rank) % tp
        return tuple(range(first, first + tp))

    def dp_group(self, rank: int, dp: int, tp: int) -> tuple[int, ...]:
        """The DP group of ``rank``: the stage's ranks with the same ``local % tp``."""
        self._check_shape(dp, tp)
        start = self.stage_start(self.stage_of(rank))
        pos = self.local(rank) % tp
        return tuple(start + pos + j * tp for j in range(dp))

    def lane(self, rank: int) -> tuple[int, ...]:
        """The pipeline lane of ``rank``: the rank at the same local index in every stage."""
        pos = self.local(rank)
        return tuple(pos + i * self.stage_size for i in range(self.pp_degree))

    def gather_groups(self, tp_small: int, tp_big: int) -> list[tuple[int, ...]]:
        """Every gather group ``(tp_small, tp_big)`` of the world, in a fixed order."""
        g = self.stage_size
        if tp_big % tp_small or g % tp_big:
            raise ValueError(
                f"gather group needs tp_small ({tp_small}) | tp_big ({tp_big}) | g ({g})"
            )
        k = tp_big // tp_small
        groups = []
        for stage in range(self.pp_degree):
            start = self.stage_start(stage)
            for block in range(g // tp_big):
                for r in range(tp_small):
                    base = start + block * tp_big + r
                    groups.append(tuple(base + m * tp_small for m in range(k)))
        return groups

    def gather_group(self, rank: int, tp_small: int, tp_big: int) -> tuple[int, ...]:
        """The gather group ``(tp_small, tp_big)`` that holds ``rank``."""
        (group,) = [grp for grp in self.gather_groups(tp_small, tp_big) if rank in grp]
        return group

    def gather_index(self, rank: int, tp_small: int, tp_big: int) -> int:
        """Position of ``rank`` in its gather group (= which piece of the batch it owns)."""
        return (self.local(rank) % tp_big) // tp_small


@dataclass(frozen=True)
class GatherStep:
    """All-gather dim 0 over the gather group ``(tp_small, tp_big)``: ``dp`` shrinks by ``k``."""

    tp_small: int
    tp_big: int


@dataclass(frozen=True)
class SliceStep:
    """Keep piece ``gather_index`` of dim 0 over the gather group ``(tp_small, tp_big)``."""

    tp_small: int
    tp_big: int


def reshard_steps(
    stage_size: int, src: tuple[int, int], dst: tuple[int, int]
) -> list[GatherStep | SliceStep]:
    """How to move an activation from layout ``src = (dp, tp)`` to ``dst = (dp, tp)``.

    Equal dp: nothing. ``dp_dst | dp_src``: one all-gather. ``dp_src | dp_dst``: one slice.
    Otherwise (e.g. dp 2 -> 3 on 6 ranks) gather down to ``gcd(dp_src, dp_dst)`` then slice.
    """
    (dp_a, tp_a), (dp_b, tp_b) = src, dst
    assert dp_a * tp_a == stage_size and dp_b * tp_b == stage_size, (src, dst, stage_size)
    if dp_a == dp_b:
        return []
    if dp_a % dp_b == 0:
        return [GatherStep(tp_a, tp_b)]
    if dp_b % dp_a == 0:
        return [SliceStep(tp_b, tp_a)]
    tp_mid = stage_size // math.gcd(dp_a, dp_b)
    return [GatherStep(tp_a, tp_mid), SliceStep(tp_b, tp_mid)]


# Groups survive as long as the world group does; key every cache entry by the world group.
_MESH_CACHE: dict[tuple, DeviceMesh] = {}
_GROUP_CACHE: dict[tuple, dist.ProcessGroup] = {}


class ProcessGroups:
    """The device meshes and process groups one plan needs, seen from this rank.

    Created collectively: every rank builds, in the same sorted order, a ``(pp, dp, tp)``
    mesh for each distinct layer shape of the plan, the lane mesh ``(pp, g)`` and the gather
    groups of every reshard the plan contains.
    """

    def __init__(self, plan: Plan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.rank = dist.get_rank()
        self.layout = RankLayout(plan.world_size, plan.pp_degree)
        self.stage_index = self.layout.stage_of(self.rank)
        world = dist.group.WORLD
        pp, g = plan.pp_degree, self.layout.stage_size
        self._meshes: dict[tuple[int, int], DeviceMesh] = {}
        for dp, tp in sorted({(ls.dp, ls.tp) for ls in plan.layer_strategies}):
            key = (world, device.type, pp, dp, tp)
            if key not in _MESH_CACHE:
                _MESH_CACHE[key] = init_device_mesh(
                    device.type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp")
                )
            self._meshes[(dp, tp)] = _MESH_CACHE[key]
        self._hsdp: dict[tuple[int, int], DeviceMesh] = {}
        for dp, sh in sorted(
            {(ls.dp, ls.strategy.shard_degree) for ls in plan.layer_strategies if ls.kind == "HSDP"}
        ):
            key = (world, device.type, pp, dp, "hsdp", sh)
            if key not in _MESH_CACHE:  # tp == 1: replicas of `sh` consecutive ranks
                _MESH_CACHE[key] = init_device_mesh(
                    device.type,
                    (pp, dp // sh, sh),
                    mesh_dim_names=("pp", "dp_replicate", "dp_shard"),
                )
            self._hsdp[(dp, sh)] = _MESH_CACHE[key]
        self.lane_group: dist.ProcessGroup | None = None
        if pp > 1:
            key = (world, device.type, pp, "lane")
            if key not in _MESH_CACHE:
                _MESH_CACHE[key] = init_device_mesh(
                    device.type, (pp, g), mesh_dim_names=("pp", "lane")
                )
            self.lane_group = _MESH_CACHE[key].get_group("pp")
        self._gather: dict[tuple[int, int], dist.ProcessGroup] = {}
        for tp_small, tp_big in sorted(_gather_pairs(plan)):
            key = (world, device.type, pp, tp_small, tp_big)
            if key not in _GROUP_CACHE:
                groups = self.layout.gather_groups(tp_small, tp_big)
                _GROUP_CACHE[key], _ = dist.new_subgroups_by_enumeration(groups)
            self._gather[(tp_small, tp_big)] = _GROUP_CACHE[key]
        # the model's own forward at pp = 1 reshards the batch of every layer whose layout
        # differs from the first's; their argument check is host data, exchanged over a gloo
        # group so that it never waits on the device (:class:`~uniap.executor.model_forward.
        # LayoutAdapter`)
        self.host_group: dist.ProcessGroup | None = None
        first = plan.stages[0].layers[0]
        if pp == 1 and any(ls.dp != first.dp for ls in plan.layer_strategies):
            backend = str(dist.get_backend())
            if "gloo" in backend or backend == "fake":  # host tensors go through it already
                self.host_group = world
            else:
                key = (world, "host")
                if key not in _GROUP_CACHE:
                    _GROUP_CACHE[key] = dist.new_group(backend="gloo")
                self.host_group = _GROUP_CACHE[key]
        logger.debug(
            "rank %d: meshes %s, gather groups %s",
            self.rank,
            sorted(self._meshes),
            sorted(self._gather),
        )

    def layer_mesh(self, dp: int, tp: int) -> DeviceMesh:
        """This rank's stage ``(dp, tp)`` mesh (dims ``dp``, ``tp``)."""
        return self._meshes[(dp, tp)]["dp", "tp"]

    def dp_mesh(self, strategy: Strategy) -> DeviceMesh:
        """The mesh a layer with ``strategy`` is data-parallel over: the ``dp`` dim of its
        layer mesh, or for HSDP the 2-D ``(dp_replicate, dp_shard)`` mesh (shard groups of
        ``shard_degree`` consecutive ranks, replicas at that stride)."""
        if strategy.kind == "HSDP":
            return self._hsdp[(strategy.dp, strategy.shard_degree)]["dp_replicate", "dp_shard"]
        return self.layer_mesh(strategy.dp, strategy.tp)["dp"]

    def gather_group(self, tp_small: int, tp_big: int) -> dist.ProcessGroup:
        """This rank's gather group ``(tp_small, tp_big)``."""
        return self._gather[(tp_small, tp_big)]


def _layout_edges(plan: Plan) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Every (src, dst) layout pair the executor reshards between, in chain order."""
    edges = []
    prev = None
    for st in plan.stages:
        for ls in st.layers:
            cur = (ls.dp, ls.tp)
            if prev is not None and prev != cur:
                edges.append((prev, cur))
            prev = cur
    return edges


def _gather_pairs(plan: Plan) -> set[tuple[int, int]]:
    """The gather groups every reshard of the plan (and the gather-to-replicated of
    ``forward``) needs."""
    g = plan.world_size // plan.pp_degree
    pairs = set()
    for src, dst in _layout_edges(plan):
        for step in reshard_steps(g, src, dst):
            pairs.add((step.tp_small, step.tp_big))
    last = plan.stages[-1].layers[-1]
    for step in reshard_steps(g, (last.dp, last.tp), (1, g)):  # forward(): gather the output
        pairs.add((step.tp_small, step.tp_big))
    if plan.pp_degree == 1:
        # the model's own forward: base layout (the first layer's) <-> every layer, and
        # base -> (1, g)
        first = plan.stages[0].layers[0]
        base = (first.dp, first.tp)
        edges = [(base, (1, g)), ((last.dp, last.tp), (1, g))]
        for ls in plan.layer_strategies:
            edges += [(base, (ls.dp, ls.tp)), ((ls.dp, ls.tp), base)]
        for src, dst in edges:
            for step in reshard_steps(g, src, dst):
                pairs.add((step.tp_small, step.tp_big))
    return pairs
