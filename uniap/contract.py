"""The Plan: the only contract between the planner and the executor.

A plan says, for a model and a world of devices: how many pipeline stages, which consecutive
layers and which consecutive device ranks each stage gets, and every layer's intra-layer
:class:`Strategy` ``(dp, tp, kind, recompute, sp)``; plus the micro-batch count, the schedule,
what the cost model predicts and how the solver got there. It round-trips through YAML and
JSON with a schema version, and refuses to be applied to another model or world size.

The executor's only inputs are a Plan and the model: every rule the planner and the executor
must agree on is a property of a value defined here (:attr:`Strategy.uses_classic_ddp`,
:attr:`Strategy.dtensor_params`, :data:`DDP_BUCKET_BYTES`), so that the cost model charges
what the executor runs. The rank layout a plan implies (stages of consecutive ranks, TP
innermost) is spelled out in :mod:`uniap.executor.mesh`.

Every value here is frozen: a changed plan is a new plan (``dataclasses.replace``). The values,
their validation, the file format and the plan's display are one concept (what a plan is), so
they stay in one module.

Plan file layout (YAML; JSON is the same tree)::

    schema_version: 1
    model: {name: gpt-tiny, signature: 0123abcd..., num_layers: 6}
    world_size: 4
    global_batch_size: 16
    num_microbatches: 4
    schedule: 1F1B                       # a name in uniap.schedules
    stages:
    - ranks: [0, 1]
      layers:
      - {fqn: embed, dp: 2, tp: 1, kind: DDP}
      - {fqn: blocks.0, dp: 1, tp: 2, kind: DDP, recompute: true}   # recompute only when true
      - {fqn: blocks.1, dp: 1, tp: 2, kind: DDP, sp: true}  # sequence parallel: only when true
      - {fqn: blocks.2, dp: 2, tp: 1, kind: ZeRO2}          # kind: DDP, FSDP, ZeRO2, HSDP
                                                            # or FSDP-offload
                                                            # (HSDP: shard_degree: s)
    - ranks: [2, 3]
      layers: [...]
                                         # an interleaved schedule (Interleaved1F1B) lists
                                         # pp * v stages, stage j on the ranks of stage j % pp
    predicted: {time_per_iteration_s: ..., samples_per_s: ..., peak_memory_bytes: [...], ...}
    solver: {status: optimal, gap: 0.0, milps_solved: ..., candidates: [...]}
                                         # wall_s with timings=True
    provenance: {uniap: ..., torch: ..., highspy: ..., cluster: ..., profile: analytic}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uniap.errors import ConfigError, PlanMismatchError
from uniap.precision import Precision
from uniap.schedules import SCHEDULES as _SCHEDULE_SPECS
from uniap.units import count, did_you_mean, fmt_bytes

__all__ = [
    "DDP_BUCKET_BYTES",
    "DEVICE_KINDS",
    "KINDS",
    "OFFLOAD",
    "SCHEDULES",
    "SCHEMA_VERSION",
    "LayerStrategy",
    "Plan",
    "Stage",
    "Strategy",
]

SCHEMA_VERSION = 1
SCHEDULES = tuple(_SCHEDULE_SPECS)
"""Schedule names a plan may name (specs in :mod:`uniap.schedules`)."""
KINDS = ("DDP", "FSDP", "ZeRO2", "HSDP", "FSDP-offload")
"""Data-parallel kinds of a layer (:attr:`Strategy.kind`)."""
DEVICE_KINDS = ("DDP", "FSDP", "ZeRO2", "HSDP")
"""The kinds that keep the training state on the devices (all but ``FSDP-offload``)."""
OFFLOAD = "FSDP-offload"
"""The kind that keeps parameters, gradients and optimizer state on the host (CPU)."""

DDP_BUCKET_BYTES = 25 * 2**20
"""Bucket size of classic DDP's gradient all-reduce (``bucket_cap_mb``, torch's default): the
executor's wrapper uses it, the cost model charges by it."""


@dataclass(frozen=True, order=True)
class Strategy:
    """One layer's intra-layer strategy on a stage of ``dp * tp`` devices: the stage's ranks
    split into ``dp`` data-parallel groups of ``tp`` consecutive tensor-parallel ranks."""

    dp: int
    """Data-parallel degree (the batch is split over ``dp`` groups of the stage's ranks)."""
    tp: int
    """Tensor-parallel degree (consecutive ranks; ``dp * tp`` = stage size)."""
    kind: str = "DDP"
    """``DDP`` (replicated parameters, gradient all-reduce), ``FSDP`` (parameters, gradients
    and optimizer state sharded over dp) or ``ZeRO2`` (gradients and optimizer state sharded
    over dp, gradients reduce-scattered after every micro-batch's backward; the parameters,
    gathered once in the first forward, stay whole until the last backward: FSDP2
    ``fully_shard`` with ``reshard_after_forward=False``) or ``HSDP`` (FSDP inside groups of
    ``shard_degree`` consecutive data-parallel ranks, replicated across the ``dp /
    shard_degree`` groups: FSDP2 ``fully_shard`` on a 2-D ``(replicate, shard)`` mesh) or
    ``FSDP-offload`` (``tp == 1``: FSDP whose sharded parameters, gradients and optimizer
    state live in host memory, the optimizer stepping on the CPU: FSDP2 ``fully_shard`` with
    ``offload_policy=CPUOffloadPolicy()``; parameters gathered and gradients reduced in every
    micro-batch; with ``dp == 1``, on a stage of one device, ``fully_shard`` over that device
    alone: the layer's whole state in host memory, copied in and out in every micro-batch)."""
    recompute: bool = False
    """Activation checkpointing: keep only the layer's input, recompute its forward in backward."""
    shard_degree: int = 0
    """HSDP only: ranks each shard group holds (a divisor of dp strictly between 1 and dp,
    ``tp == 1``); 0 for every other kind."""
    sp: bool = False
    """Sequence parallelism (``tp > 1``, on a layer that supports it): inside the layer the
    residual stream between its TP pairs is sharded along the sequence over the TP group
    (all-gather / reduce-scatter instead of all-reduce); the layer's input and output stay
    replicated (:mod:`uniap.executor.sequence_parallel`)."""

    def __str__(self) -> str:
        kind = f"HSDP{self.shard_degree}" if self.kind == "HSDP" else self.kind
        sp = "-sp" if self.sp else ""
        return f"dp{self.dp}xtp{self.tp}{sp}-{kind}" + ("-ckpt" if self.recompute else "")

    @property
    def key(self) -> tuple[int, int, str, bool, int, bool]:
        """``(dp, tp, kind, recompute, shard_degree, sp)``."""
        return (self.dp, self.tp, self.kind, self.recompute, self.shard_degree, self.sp)

    @property
    def shard_size(self) -> int:
        """Ranks that hold one copy of the layer's sharded state: dp for FSDP and ZeRO2,
        ``shard_degree`` for HSDP, 1 otherwise."""
        if self.kind == "HSDP":
            return self.shard_degree
        return self.dp if self.kind in ("FSDP", "ZeRO2", OFFLOAD) else 1

    @property
    def offloaded(self) -> bool:
        """Whether the layer's sharded state lives in host memory (``FSDP-offload``)."""
        return self.kind == OFFLOAD

    @property
    def uses_classic_ddp(self) -> bool:
        """Whether the executor synchronises the layer with the stage's classic
        ``DistributedDataParallel`` wrapper (bucketed all-reduce of :data:`DDP_BUCKET_BYTES`,
        plain-tensor parameters): DDP over the whole stage (``tp == 1``). DDP with ``tp > 1``
        uses FSDP2's ``replicate`` per layer. One rule for the cost model and the executor."""
        return self.kind == "DDP" and self.dp > 1 and self.tp == 1

    @property
    def reduces_every_microbatch(self) -> bool:
        """Whether the executor reduces the layer's gradients after every micro-batch's
        backward (``ZeRO2``: sharded gradients, no whole gradient between micro-batches;
        ``FSDP-offload``: the gradient shards accumulate in host memory) rather than after the
        last one only. One rule for the cost model and the executor."""
        return (self.kind == "ZeRO2" and self.dp > 1) or self.offloaded

    @property
    def fsdp2_wrapped(self) -> bool:
        """Whether the executor applies FSDP2 (``fully_shard`` or ``replicate``) to the layer:
        at ``dp > 1`` unless classic DDP synchronises it, and FSDP-offload at every ``dp`` (at
        ``dp == 1`` ``fully_shard`` does the host copies). One rule for the cost model and the
        executor."""
        return (self.dp > 1 and not self.uses_classic_ddp) or self.offloaded

    @property
    def dtensor_params(self) -> bool:
        """Whether the executor holds the layer's parameters as DTensors (TP shards, FSDP2
        shards, ``replicate``), so that the optimizer pays DTensor dispatch per tensor."""
        return self.tp > 1 or self.fsdp2_wrapped


@dataclass(frozen=True)
class LayerStrategy:
    """One layer's strategy inside its stage."""

    fqn: str
    """Layer FQN."""
    strategy: Strategy
    """How the layer uses its stage's devices."""

    @property
    def dp(self) -> int:
        """``strategy.dp``."""
        return self.strategy.dp

    @property
    def tp(self) -> int:
        """``strategy.tp``."""
        return self.strategy.tp

    @property
    def kind(self) -> str:
        """``strategy.kind``."""
        return self.strategy.kind

    @property
    def recompute(self) -> bool:
        """``strategy.recompute``."""
        return self.strategy.recompute

    @property
    def sp(self) -> bool:
        """``strategy.sp``."""
        return self.strategy.sp

    @property
    def key(self) -> tuple[int, int, str, bool, int, bool]:
        """``(dp, tp, kind, recompute, shard_degree, sp)``."""
        return self.strategy.key


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: consecutive layers on consecutive ranks."""

    ranks: tuple[int, ...]
    """Global ranks of the stage's devices."""
    layers: tuple[LayerStrategy, ...]
    """The stage's layers in chain order with their strategies."""

    @property
    def num_devices(self) -> int:
        """Devices in the stage."""
        return len(self.ranks)


@dataclass(frozen=True)
class Plan:
    """A complete parallel plan (layout in the module docstring)."""

    model_name: str
    """Name of the model the plan was made for."""
    model_signature: str
    """``ModelGraph.signature`` of that model."""
    num_layers: int
    """Layers in the model's chain."""
    world_size: int
    """Devices the plan uses (all of them)."""
    global_batch_size: int
    """Samples per iteration over all data-parallel replicas."""
    num_microbatches: int
    """Micro-batches per iteration (``c``)."""
    schedule: str
    """A name in :mod:`uniap.schedules`: ``GPipe``, ``1F1B`` or ``Interleaved1F1B``."""
    stages: tuple[Stage, ...]
    """Pipeline stages in chain order; with an interleaved schedule ``pp * v`` of them, stage
    ``j`` on the ranks of stage ``j % pp`` (:attr:`virtual_stages`)."""
    predicted: dict[str, Any] = field(default_factory=dict)
    """``time_per_iteration_s``, ``samples_per_s``, ``peak_memory_bytes`` (per stage), and
    where the time and memory go (``time_breakdown_s``, ``stage_detail``: see
    :mod:`uniap.report`)."""
    solver: dict[str, Any] = field(default_factory=dict)
    """``status``, ``gap``, ``wall_s``, ``milps_solved``, the (pp, c) candidates table and the
    best plan per (pp, schedule) with what binds it (``best_per_pp``: see :mod:`uniap.explain`)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Versions of uniap / torch / highspy, the cluster name, the profile source, the dtype."""
    schema_version: int = SCHEMA_VERSION
    precision: Precision | None = None
    """Compute / gradient-reduction / master dtypes (:class:`uniap.precision.Precision`);
    None in plan files written before it was recorded: the executor then runs the model in
    its own dtype, without mixed precision."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if isinstance(self.precision, str | dict):
            object.__setattr__(self, "precision", Precision.from_dict(self.precision))
        self.validate()

    # ---------------------------------------------------------------- properties
    @property
    def pp_degree(self) -> int:
        """Pipeline degree: the number of rank groups (stages per rank aside)."""
        return len(self.stages) // self.virtual_stages

    @property
    def virtual_stages(self) -> int:
        """Stages per rank ``v`` (interleaved schedules), 1 otherwise: the stages that share
        stage 0's ranks."""
        return sum(1 for st in self.stages if tuple(st.ranks) == tuple(self.stages[0].ranks))

    def stages_of_rank(self, rank: int) -> list[int]:
        """Indices of the stages that ``rank`` holds (one, or ``v`` with an interleaved
        schedule), in chain order."""
        out = [i for i, st in enumerate(self.stages) if rank in st.ranks]
        if not out:
            raise PlanMismatchError(
                f"rank {rank} is in no stage of the plan (world size {self.world_size})"
            )
        return out

    @property
    def microbatch_size(self) -> int:
        """Samples per micro-batch (``B / c``)."""
        return self.global_batch_size // self.num_microbatches

    @property
    def layer_strategies(self) -> tuple[LayerStrategy, ...]:
        """Every layer's strategy in chain order."""
        return tuple(ls for st in self.stages for ls in st.layers)

    def stage_of_rank(self, rank: int) -> int:
        """Index of the (first) stage that holds ``rank``."""
        return self.stages_of_rank(rank)[0]

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check internal consistency; raises ConfigError naming what is wrong."""

        def bad(msg: str) -> ConfigError:
            return ConfigError(f"invalid plan: {msg}")

        if self.schema_version != SCHEMA_VERSION:
            raise bad(
                f"schema_version {self.schema_version} is not supported (this uniap reads "
                f"{SCHEMA_VERSION}); re-create the plan with `uniap plan`"
            )
        if self.schedule not in SCHEDULES:
            raise bad(f"schedule {self.schedule!r} is not one of {list(SCHEDULES)}")
        for name in ("world_size", "global_batch_size", "num_microbatches", "num_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(f"{name} must be a positive integer, got {v!r}")
        if self.global_batch_size % self.num_microbatches:
            raise bad(
                f"num_microbatches ({self.num_microbatches}) must divide global_batch_size "
                f"({self.global_batch_size})"
            )
        if not self.stages:
            raise bad("a plan needs at least one stage")
        v, n_st = self.virtual_stages, len(self.stages)
        spec = _SCHEDULE_SPECS[self.schedule]
        if v > 1 or spec.interleaved:
            pp = n_st // v
            if n_st % v or any(
                tuple(st.ranks) != tuple(self.stages[j % pp].ranks)
                for j, st in enumerate(self.stages)
            ):
                raise bad(
                    f"stage ranks {[list(s.ranks) for s in self.stages]}: with {v} stages per "
                    "rank, stage j must run on the ranks of stage j % pp (the looped placement of "
                    "interleaved schedules)"
                )
            reason = spec.why_not(pp, v, self.num_microbatches) if pp > 1 else None
            if reason or (pp > 1 and v == 1):
                raise bad(
                    (reason or f"{self.schedule} needs more than one stage per rank")
                    + f"; stages per rank: {v}, pipeline degree {pp}"
                )
        all_ranks = [r for st in self.stages[: n_st // v] for r in st.ranks]
        if sorted(all_ranks) != list(range(self.world_size)):
            raise bad(
                f"stage ranks {[list(s.ranks) for s in self.stages]} must cover "
                f"0..{self.world_size - 1} "
                "exactly once"
            )
        g = self.stages[0].num_devices
        b = self.microbatch_size
        n_layers = 0
        for i, st in enumerate(self.stages):
            if st.num_devices != g:
                raise bad(
                    f"stage {i} has {st.num_devices} devices, stage 0 has {g}; stages must be equal"
                )
            if list(st.ranks) != list(range(st.ranks[0], st.ranks[0] + g)):
                raise bad(f"stage {i} ranks {list(st.ranks)} must be consecutive")
            if not st.layers:
                raise bad(f"stage {i} has no layers")
            for ls in st.layers:
                n_layers += 1
                if ls.kind not in KINDS:
                    raise bad(
                        f"layer {ls.fqn!r}: kind {ls.kind!r} is not one of {list(KINDS)}"
                        + did_you_mean(str(ls.kind), KINDS)
                    )
                s = ls.strategy
                if s.kind == "HSDP" and not (
                    s.tp == 1 and 1 < s.shard_degree < s.dp and s.dp % s.shard_degree == 0
                ):
                    raise bad(
                        f"layer {ls.fqn!r}: HSDP needs tp = 1 and a shard_degree dividing dp "
                        f"({ls.dp}) strictly between 1 and dp, got tp = {ls.tp}, shard_degree = "
                        f"{s.shard_degree}"
                    )
                if s.kind == OFFLOAD and s.tp != 1:
                    raise bad(
                        f"layer {ls.fqn!r}: FSDP-offload needs tp = 1, got tp = {ls.tp}; offload "
                        "the layer data parallel only, or keep its TP with another kind"
                    )
                if not isinstance(s.sp, bool):
                    raise bad(f"layer {ls.fqn!r}: sp must be true or false, got {s.sp!r}")
                if s.sp and s.tp == 1:
                    raise bad(
                        f"layer {ls.fqn!r}: sequence parallelism (sp) needs tp > 1, got tp = 1; "
                        "drop sp or give the layer a TP degree"
                    )
                if s.kind != "HSDP" and s.shard_degree:
                    raise bad(f"layer {ls.fqn!r}: shard_degree is for HSDP only, not {s.kind}")
                if ls.dp < 1 or ls.tp < 1 or ls.dp * ls.tp != g:
                    raise bad(
                        f"layer {ls.fqn!r}: dp ({ls.dp}) x tp ({ls.tp}) must equal the stage size "
                        f"({g})"
                    )
                if b % ls.dp:
                    raise bad(
                        f"layer {ls.fqn!r}: micro-batch size {b} does not split over dp={ls.dp}; "
                        "choose a global batch or micro-batch count that makes it whole"
                    )
        if n_layers != self.num_layers:
            raise bad(f"stages hold {n_layers} layers, the model has {self.num_layers}")

    def check_compatible(
        self,
        *,
        model_signature: str | None = None,
        model_name: str | None = None,
        layer_fqns: tuple[str, ...] | None = None,
        world_size: int | None = None,
    ) -> None:
        """Refuse a plan made for another model or world size, saying what differs."""
        diffs = []
        if world_size is not None and world_size != self.world_size:
            diffs.append(
                f"world size: the plan is for {self.world_size} devices, {world_size} were "
                f"launched (launch with --nproc-per-node/--nnodes giving {self.world_size}, or "
                "re-plan)"
            )
        if layer_fqns is not None:
            plan_fqns = tuple(ls.fqn for ls in self.layer_strategies)
            if plan_fqns != tuple(layer_fqns):
                missing = sorted(set(plan_fqns) - set(layer_fqns))[:5]
                extra = sorted(set(layer_fqns) - set(plan_fqns))[:5]
                diffs.append(
                    f"layers: the plan has {len(plan_fqns)} layers, the model {len(layer_fqns)}"
                    f" (only in plan: {missing}, only in model: {extra})"
                )
        if model_signature is not None and model_signature != self.model_signature:
            diffs.append(
                f"model signature: plan {self.model_signature} (model {self.model_name!r}) vs "
                f"{model_signature}"
                + (f" (model {model_name!r})" if model_name else "")
                + "; the model's layers or shapes changed"
            )
        if diffs:
            raise PlanMismatchError(
                "the plan does not match: " + "; ".join(diffs) + "; re-run `uniap plan`"
            )

    # ---------------------------------------------------------------- serialisation
    def to_dict(self, *, timings: bool = False) -> dict[str, Any]:
        """Plain dict in the documented layout (module docstring). Wall-clock fields (``wall_s``)
        are left out unless ``timings``: the same inputs then give byte-identical plan files."""
        return {
            "schema_version": self.schema_version,
            "model": {
                "name": self.model_name,
                "signature": self.model_signature,
                "num_layers": self.num_layers,
            },
            "world_size": self.world_size,
            "global_batch_size": self.global_batch_size,
            "num_microbatches": self.num_microbatches,
            "schedule": self.schedule,
            **({"precision": self.precision.to_dict()} if self.precision is not None else {}),
            "stages": [
                {"ranks": list(st.ranks), "layers": [_layer_dict(ls) for ls in st.layers]}
                for st in self.stages
            ],
            "predicted": _plain(self.predicted),
            "solver": _plain(self.solver if timings else _drop_timings(self.solver)),
            "provenance": _plain(self.provenance),
        }

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "<dict>") -> Plan:
        """Inverse of :meth:`to_dict`; a malformed dict raises ConfigError naming the field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: a plan must be a mapping, got {type(d).__name__}")
        known = {
            "schema_version",
            "model",
            "world_size",
            "global_batch_size",
            "num_microbatches",
            "schedule",
            "precision",
            "stages",
            "predicted",
            "solver",
            "provenance",
        }
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown plan field(s) {unknown}; known fields: {sorted(known)}"
            )
        try:
            model = d["model"]
            stages = []
            for i, st in enumerate(d["stages"]):
                layers = []
                for j, ls in enumerate(st["layers"]):
                    extra = sorted(
                        set(ls) - {"fqn", "dp", "tp", "kind", "recompute", "shard_degree", "sp"}
                    )
                    if extra:
                        raise ConfigError(
                            f"{source}: stages[{i}].layers[{j}]: unknown field(s) {extra}; "
                            "a layer has fqn, dp, tp, kind and optionally recompute, sp (and "
                            "shard_degree for HSDP)"
                        )
                    rc = ls.get("recompute", False)
                    if not isinstance(rc, bool):
                        raise ConfigError(
                            f"{source}: stages[{i}].layers[{j}].recompute must be true or false, "
                            f"got {rc!r}"
                        )
                    sp = ls.get("sp", False)
                    if not isinstance(sp, bool):
                        raise ConfigError(
                            f"{source}: stages[{i}].layers[{j}].sp must be true or false, "
                            f"got {sp!r}"
                        )
                    strategy = Strategy(
                        _int(ls["dp"], f"stages[{i}].layers[{j}].dp", source),
                        _int(ls["tp"], f"stages[{i}].layers[{j}].tp", source),
                        str(ls.get("kind", "DDP")),
                        rc,
                        _int(
                            ls.get("shard_degree", 0),
                            f"stages[{i}].layers[{j}].shard_degree",
                            source,
                        ),
                        sp,
                    )
                    layers.append(LayerStrategy(str(ls["fqn"]), strategy))
                ranks = tuple(_int(r, f"stages[{i}].ranks", source) for r in st["ranks"])
                stages.append(Stage(ranks, tuple(layers)))
            plan = cls(
                model_name=str(model["name"]),
                model_signature=str(model["signature"]),
                num_layers=_int(model["num_layers"], "model.num_layers", source),
                world_size=_int(d["world_size"], "world_size", source),
                global_batch_size=_int(d["global_batch_size"], "global_batch_size", source),
                num_microbatches=_int(d["num_microbatches"], "num_microbatches", source),
                schedule=str(d["schedule"]),
                stages=tuple(stages),
                predicted=dict(d.get("predicted") or {}),
                solver=dict(d.get("solver") or {}),
                provenance=dict(d.get("provenance") or {}),
                schema_version=_int(
                    d.get("schema_version", SCHEMA_VERSION), "schema_version", source
                ),
                precision=Precision.from_dict(d["precision"])
                if d.get("precision") is not None
                else None,
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing plan field {e.args[0]!r}") from None
        except (TypeError, AttributeError) as e:
            raise ConfigError(
                f"{source}: malformed plan ({e}); see uniap.contract for the layout"
            ) from None
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None
        return plan

    def to_yaml(self, path: str | Path | None = None, *, timings: bool = False) -> str:
        """YAML text (and write it to ``path`` if given). Deterministic: same plan, same bytes."""
        text = yaml.safe_dump(
            self.to_dict(timings=timings), sort_keys=False, default_flow_style=None, width=100
        )
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_json(self, path: str | Path | None = None, *, timings: bool = False) -> str:
        """JSON text (and write it to ``path`` if given)."""
        text = json.dumps(self.to_dict(timings=timings), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def load(cls, path_or_text: str | Path) -> Plan:
        """Load a plan from a ``.yaml``/``.json`` file, or from YAML/JSON text."""
        text_given = isinstance(path_or_text, str) and (
            "\n" in path_or_text or path_or_text.lstrip().startswith("{")
        )
        p = None if text_given else Path(path_or_text)
        if p is not None:
            if not p.exists():
                raise ConfigError(f"plan file {str(p)!r} not found")
            try:
                source, text = str(p), p.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{p}: cannot read the plan file: {e}") from None
        else:
            source, text = "<text>", str(path_or_text)
        try:
            d = yaml.safe_load(text)  # JSON is YAML
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(
                f"{source}: not valid YAML/JSON{where}: {getattr(e, 'problem', e)}"
            ) from None
        return cls.from_dict(d, source=source)

    # ---------------------------------------------------------------- display
    def summary(self) -> str:
        """One line: pp, c, schedule and each stage's strategies run-length compressed."""
        parts = []
        for st in self.stages:
            parts.append(", ".join(f"{n}x {_strat(k)}" for k, n in _runs(st.layers)))
        tpi = self.predicted.get("time_per_iteration_s")
        tail = f" | TPI {tpi:.4g} s" if isinstance(tpi, int | float) else ""
        v = f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""
        return (
            f"pp={self.pp_degree}{v} c={self.num_microbatches} {self.schedule}: "
            + " || ".join(parts)
            + tail
        )

    def describe(self) -> str:
        """A readable table: stage, layers, devices, strategies (run-length), memory, time."""
        lines = [
            f"Plan for {self.model_name} ({self.num_layers} layers) on "
            f"{count(self.world_size, 'device')}: pp={self.pp_degree}, "
            f"{count(self.num_microbatches, 'micro-batch', 'micro-batches')} "
            f"of {self.microbatch_size} "
            f"(global batch {self.global_batch_size}), schedule {self.schedule}"
            + (
                f" with {self.virtual_stages} stages per rank (stage j on the ranks of stage "
                f"j % {self.pp_degree})"
                if self.virtual_stages > 1
                else ""
            ),
            "precision: "
            + (
                self.precision.describe()
                if self.precision is not None
                else "not recorded (the model's dtype)"
            ),
        ]
        mem = self.predicted.get("peak_memory_bytes") or []
        st_time = self.predicted.get("stage_time_s") or []
        header = (
            f"{'stage':>5}  {'devices':<12} {'layers':<28} "
            f"{'strategies (layers x strategy)':<34} {'memory':>10} {'time/mb':>10}"
        )
        lines.append(header)
        lines.append("-" * len(header))
        for i, st in enumerate(self.stages):
            fq = st.layers
            span = fq[0].fqn if len(fq) == 1 else f"{fq[0].fqn} .. {fq[-1].fqn}"
            span = f"{span} ({len(fq)})"
            ranks = f"{st.ranks[0]}-{st.ranks[-1]}" if len(st.ranks) > 1 else str(st.ranks[0])
            strat = ", ".join(f"{n}x {_strat(k)}" for k, n in _runs(st.layers))
            r = i % self.pp_degree  # memory is per rank: all of its stages
            m = fmt_bytes(mem[r]) if r < len(mem) else "-"
            t = (
                f"{st_time[i] * 1e3:.4f}".rstrip("0").rstrip(".") + " ms"
                if i < len(st_time)
                else "-"
            )
            lines.append(f"{i:>5}  {ranks:<12} {span:<28} {strat:<34} {m:>10} {t:>10}")
        p = self.predicted
        if "time_per_iteration_s" in p:
            lines.append(
                f"predicted: {p['time_per_iteration_s']:.4g} s/iteration, "
                f"{p.get('samples_per_s', float('nan')):.4g} samples/s"
            )
        if self.solver:
            s = self.solver
            n = s.get("milps_solved", 0)
            wall = f", {s['wall_s']:.3g} s" if "wall_s" in s else ""
            lines.append(
                f"solver: {s.get('status')}, gap {s.get('gap', 0):.3g}{wall}, "
                f"{n} program{'s' if n != 1 else ''} solved"
            )
        return "\n".join(lines)


def _drop_timings(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _drop_timings(v) for k, v in x.items() if k != "wall_s"}
    if isinstance(x, list | tuple):
        return [_drop_timings(v) for v in x]
    return x


def _layer_dict(ls: LayerStrategy) -> dict[str, Any]:
    d: dict[str, Any] = {"fqn": ls.fqn, "dp": ls.dp, "tp": ls.tp, "kind": ls.kind}
    if ls.recompute:  # the common case stays short
        d["recompute"] = True
    if ls.strategy.shard_degree:
        d["shard_degree"] = ls.strategy.shard_degree
    if ls.sp:  # absent means false: plan files without SP are unchanged
        d["sp"] = True
    return d


def _strat(s: Strategy) -> str:
    kind = f"HSDP{s.shard_degree}" if s.kind == "HSDP" else s.kind
    return f"dp{s.dp} tp{s.tp}{' sp' if s.sp else ''} {kind}" + (" +ckpt" if s.recompute else "")


def _runs(layers: tuple[LayerStrategy, ...]) -> list[tuple[Strategy, int]]:
    out: list[tuple[Strategy, int]] = []
    for ls in layers:
        if out and out[-1][0] == ls.strategy:
            out[-1] = (ls.strategy, out[-1][1] + 1)
        else:
            out.append((ls.strategy, 1))
    return out


def _int(v: Any, name: str, source: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{source}: {name} must be an integer, got {v!r}")
    return v


def _plain(x: Any) -> Any:
    """Recursively convert to YAML/JSON-safe builtins (tuples -> lists, numpy -> float)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, bool | int | str) or x is None:
        return x
    if isinstance(x, float):
        return float(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)
