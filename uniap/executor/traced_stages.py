"""Splitting any model's own forward into pipeline stages (``pp > 1``), by tracing it.

A model that is not a declared chain is split with ``torch.distributed.pipelining``'s tracer
front end: :func:`torch.distributed.pipelining.pipeline` exports the model's forward
(``torch.export``) on one micro-batch of this rank's shape, with a split point in front of the
first layer of every stage after the first. Each stage is a ``GraphModule`` whose submodules
keep the model's FQNs, so TP-free strategies (recompute, DDP, FSDP) are applied to its layers
by FQN exactly as at ``pp == 1``. Everything the forward does between the layers (scaled
embeddings, masks, rotary tables, position ids, skip connections, the model's own loss) is
in the stage graphs, so the function trained is the model's.

**Values between stages.** The traced root graph says, for each stage, which values it reads:
root inputs (the model's arguments) or outputs of earlier stages. :class:`Routing` turns that
into what each stage sends to the next: every value produced so far (or a root input) that a
later stage or the final output still needs, in a fixed order, as a tuple of tensors (a value
a stage does not use itself is passed through). Stage 0 receives the root inputs the graph
uses, by name; the last stage returns the model's flat outputs, rebuilt into the model's
output structure (``ModelOutput``, dict, tuple) for the loss with the output's pytree spec.

**Tied and free parameters.** The tracer gives every stage that uses a parameter its own
copy. Parameters shared by several layers (tied input/output embeddings) and parameters
outside every layer are *free*: replicated on the stages that hold a copy, left out of the
layers' DDP/FSDP wrapping, and their gradients summed over every rank holding a copy (the
stage's data-parallel ranks and the same lane's ranks on the other stages holding it, the
Megatron way) once per iteration, so all copies receive the same gradient and stay
bit-identical under any optimizer.

**Limits.** The traced stages run at ``tp == 1`` (the exported graphs have head counts and
shapes baked in); the planner offers tensor parallelism at ``pp > 1`` only to declared chains.
Shapes are static: a stage runs micro-batches of the traced shape. A model that
``torch.export`` cannot trace is refused before training, naming the failure.
"""

from __future__ import annotations

import copy
import inspect
import logging
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.utils import _pytree as pytree

from uniap._torch_utils import call_args, map_tensors
from uniap.errors import PlanMismatchError
from uniap.executor.model_forward import free_parameters
from uniap.tracing import training_call

__all__ = [
    "Routing",
    "TracedSplit",
    "RoutedForward",
    "TracedStage",
    "build_traced_stage",
    "trace_split",
    "trace_inputs",
]

logger = logging.getLogger(__name__)

Key = tuple[str, int | None]
"""A value of the root graph: ``(root input name, None)`` or ``(stage submodule, index)``
(index None for a stage with a single, non-tuple output)."""


@dataclass(frozen=True)
class Routing:
    """What every stage reads, computes and sends (see the module docstring)."""

    root_inputs: tuple[str, ...]
    """Names of the model arguments read by some stage, in the order stage 0 receives them."""
    stage_args: tuple[tuple[Any, ...], ...]
    """Per stage, its graph's arguments: a :data:`Key` or a constant (``("const", value)``)."""
    stage_arity: tuple[int | None, ...]
    """Per stage, the number of outputs of its graph (None: one non-tuple output)."""
    live: tuple[tuple[Key, ...], ...]
    """Per stage but the last, the values it sends to the next stage."""
    outputs: tuple[Key, ...]
    """The model's flat outputs (last stage)."""

    @staticmethod
    def from_graph(graph: fx.Graph, num_stages: int) -> Routing:
        """Read the routing from the traced root graph (placeholders, ``submod_pp_k`` calls,
        ``getitem`` on them, one output)."""
        names = [f"submod_pp_{k}" for k in range(num_stages)]

        def key(node: Any) -> Any:
            if not isinstance(node, fx.Node):
                return ("const", node)
            if node.op == "placeholder":
                return (str(node.target), None)
            if node.op == "call_function" and node.target is operator.getitem:
                src, index = node.args
                return (str(src.target), int(index))
            if node.op == "call_module":
                return (str(node.target), None)
            raise PlanMismatchError(f"unexpected value {node.format_node()} between stages")

        found: dict[int, tuple[Any, ...]] = {}  # the root graph may call stages in any order
        arity: list[int | None] = [None] * num_stages
        outputs: tuple[Key, ...] = ()
        for node in graph.nodes:
            if node.op == "call_module":
                if node.kwargs:
                    raise PlanMismatchError(f"stage {node.target} takes keyword arguments")
                found[names.index(str(node.target))] = tuple(key(a) for a in node.args)
            elif node.op == "call_function" and node.target is operator.getitem:
                k = names.index(str(node.args[0].target))
                arity[k] = max(arity[k] or 0, int(node.args[1]) + 1)
            elif node.op == "output":
                flat, _ = pytree.tree_flatten(node.args[0])
                outputs = tuple(key(n) for n in flat)
        if sorted(found) != list(range(num_stages)):
            raise PlanMismatchError(f"traced {len(found)} stages, expected {num_stages}")
        stage_args = [found[k] for k in range(num_stages)]
        produced = {n: k for k, n in enumerate(names)}
        for k, args in enumerate(stage_args):
            later = [a for a in args if a[0] in produced and produced[a[0]] >= k]
            if later:
                raise PlanMismatchError(
                    f"the traced stage {k} reads a value of stage {produced[later[0][0]]}: the "
                    "forward does not run its pieces in stage order"
                )

        def stage_of(k: Key) -> int:  # -1: a root input
            return produced.get(k[0], -1) if k[0] != "const" else -2

        root = []
        for args in stage_args:
            for a in args:
                if stage_of(a) == -1 and a[0] not in root:
                    root.append(a[0])
        for o in outputs:
            if stage_of(o) == -1 and o[0] not in root:
                root.append(o[0])
        live: list[tuple[Key, ...]] = []
        for k in range(num_stages - 1):
            needed: list[Key] = []
            later = [a for args in stage_args[k + 1 :] for a in args] + list(outputs)
            for a in later:
                if stage_of(a) in (-2,) or stage_of(a) > k or a in needed:
                    continue
                needed.append(a)
            live.append(tuple(needed))
        return Routing(tuple(root), tuple(stage_args), tuple(arity), tuple(live), outputs)


class RoutedForward:
    """The forward of one traced stage as ``PipelineStage`` runs it: takes the values the
    previous stage sent (stage 0: the root inputs, :attr:`Routing.root_inputs`), runs the
    stage graph (``forward``: the stage ``GraphModule``'s own) and returns the values the next
    stage needs (the last stage: the model's flat outputs). Installed as the stage module's
    ``forward`` attribute, inside the DDP / FSDP wrapping of the module."""

    def __init__(self, forward: Any, routing: Routing, stage_index: int) -> None:
        self._forward = forward
        self._routing = routing
        self._k = stage_index
        n = len(routing.stage_args)
        self._inputs: tuple[Key, ...] = (
            tuple((name, None) for name in routing.root_inputs)
            if stage_index == 0
            else routing.live[stage_index - 1]
        )
        self._sends = routing.live[stage_index] if stage_index < n - 1 else routing.outputs
        self._name = f"submod_pp_{stage_index}"

    def __call__(self, *values: Any) -> Any:
        env: dict[Any, Any] = dict(zip(self._inputs, values))
        args = [a[1] if a[0] == "const" else env[a] for a in self._routing.stage_args[self._k]]
        out = self._forward(*args)
        arity = self._routing.stage_arity[self._k]
        if arity is None:
            env[(self._name, None)] = out
        else:
            for i in range(arity):
                env[(self._name, i)] = out[i]
        sent = []
        for k in self._sends:
            v = env[k] if k[0] != "const" else k[1]
            if k in self._inputs and isinstance(v, torch.Tensor) and v.requires_grad:
                v = v.view_as(v)  # passed through: a new autograd node, so its grad flows back
            sent.append(v)
        return tuple(sent)


@dataclass
class TracedSplit:
    """The model split into its traced stages."""

    stages: list[nn.Module]
    """Every stage's ``GraphModule`` (parameters are copies, at the model's FQNs)."""
    routing: Routing
    out_spec: pytree.TreeSpec | None
    """Pytree spec of the model's output, to rebuild it from the flat outputs (None when the
    flat outputs are the output)."""
    arg_names: tuple[str, ...]
    """The model forward's parameter names, to bind a call's arguments by name."""

    def root_values(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        """The root inputs stage 0 receives for a call ``model(*args, **kwargs)``."""
        bound = bind_arguments(self.arg_names, args, kwargs)
        missing = [n for n in self.routing.root_inputs if n not in bound]
        if missing:
            raise PlanMismatchError(
                f"the traced model reads argument(s) {missing} that this batch does not pass; "
                "pass the same arguments as the example inputs it was traced with"
            )
        return tuple(bound[n] for n in self.routing.root_inputs)

    def output(self, flat: Sequence[Any]) -> Any:
        """The model's output from the last stage's flat outputs (a lone tensor: torch's
        stage unwraps a one-element tuple)."""
        if isinstance(flat, torch.Tensor):
            flat = (flat,)
        if self.out_spec is None:
            return tuple(flat)
        return pytree.tree_unflatten(list(flat), self.out_spec)


def bind_arguments(
    arg_names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """``{parameter name: value}`` of a call (positional arguments by position)."""
    if len(args) > len(arg_names):
        raise PlanMismatchError(
            f"{len(args)} positional inputs, but the forward names only {len(arg_names)}"
        )
    bound = dict(zip(arg_names, args))
    bound.update(kwargs)
    return bound


def _forward_arg_names(model: nn.Module) -> tuple[str, ...]:
    sig = inspect.signature(model.forward)
    return tuple(
        name
        for name, p in sig.parameters.items()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    )


def trace_inputs(args: Sequence[Any], kwargs: Mapping[str, Any], batch: int, rows: int) -> Any:
    """Example ``(args, kwargs)`` of ``rows`` samples from a batch of ``batch`` samples: rows
    of every batch-first tensor repeated cyclically, every tensor a fresh copy (the tracer
    would otherwise merge two arguments that are the same tensor)."""
    index = torch.arange(rows) % batch

    def take(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.shape[0] == batch:
            return t.index_select(0, index.to(t.device))
        return t.clone()

    return map_tensors(take, tuple(args)), map_tensors(take, dict(kwargs))


def _first_failure(error: BaseException) -> str:
    msgs = []
    e: BaseException | None = error
    while e is not None and len(msgs) < 3:
        text = str(e).strip().splitlines()
        msgs.append(f"{type(e).__name__}: {text[0] if text else ''}"[:300])
        e = e.__cause__ or e.__context__
    return msgs[-1] if msgs else type(error).__name__


def trace_split(
    model: nn.Module,
    split_fqns: Sequence[str],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> TracedSplit:
    """Trace ``model`` on the example call ``model(*args, **kwargs)`` (one micro-batch of the
    shape the stages will run) and split it in front of each of ``split_fqns`` (the first
    layer of every stage after the first). The model is not modified. Refuses, naming the
    failure and the fixes, a model ``torch.export`` cannot trace or whose split points are
    not reached in order."""
    from torch.distributed.pipelining import SplitPoint, pipeline

    num_stages = len(split_fqns) + 1
    work = copy.deepcopy(model)  # the tracer annotates the split points on the modules
    was_training = work.training
    fixes = (
        "plan with pp=1 (any model runs there), or declare the model a chain "
        "(nn.Sequential or uniap_layer_fqns()) if feeding each layer's output to the next is "
        "its forward"
    )
    try:
        pipe = pipeline(
            work,
            mb_args=tuple(args),
            mb_kwargs=dict(kwargs),
            split_spec={fqn: SplitPoint.BEGINNING for fqn in split_fqns},
        )
    except Exception as e:  # noqa: BLE001 - any tracer failure is reported the same way
        raise PlanMismatchError(
            f"{type(model).__name__} cannot be split into {num_stages} pipeline stages: "
            f"torch.export could not trace its forward ({_first_failure(e)}); {fixes}"
        ) from e
    if pipe.num_stages != num_stages:
        raise PlanMismatchError(
            f"{type(model).__name__}: the split points in front of {list(split_fqns)} gave "
            f"{pipe.num_stages} stages instead of {num_stages} (a layer runs out of order or "
            f"more than once); {fixes}"
        )
    routing = Routing.from_graph(pipe.split_gm.graph, num_stages)
    stages = [pipe.get_stage_module(k) for k in range(num_stages)]
    for s in stages:
        s.train(was_training)
    out_spec = _output_spec(model, args, kwargs, len(routing.outputs))
    return TracedSplit(stages, routing, out_spec, _forward_arg_names(model))


def _output_spec(
    model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any], num_outputs: int
) -> pytree.TreeSpec | None:
    """The pytree spec of the model's output, from a forward on fake tensors (no compute)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            conv = mode.from_tensor
            f_args = pytree.tree_map_only(torch.Tensor, conv, tuple(args))
            f_kwargs = pytree.tree_map_only(torch.Tensor, conv, dict(kwargs))
            with torch.no_grad():
                out = model(*f_args, **f_kwargs)
    except Exception as e:  # noqa: BLE001 - fall back to the flat outputs
        logger.info("output structure not recovered (%s); the last stage returns a tuple", e)
        return None
    leaves, spec = pytree.tree_flatten(out)
    if len(leaves) != num_outputs:
        logger.info(
            "output structure has %d leaves, the traced graph %d outputs; returning a tuple",
            len(leaves),
            num_outputs,
        )
        return None
    return spec


def _runs_in(module: nn.Module, fqn: str) -> bool:
    """Whether the traced stage ``module`` calls the layer ``fqn`` (a called module is traced
    into a graph; a plain container may only hold a parameter copy, e.g. a tied weight)."""
    try:
        sub = module.get_submodule(fqn)
    except AttributeError:
        return False
    return isinstance(getattr(sub, "graph", None), fx.Graph)


def retarget_device(module: nn.Module, device: torch.device) -> None:
    """Point every device constant of the traced graphs (factory ops, ``.to``, metadata
    asserts; positional or keyword) at ``device``: the trace ran on the model's device (CPU or
    meta)."""

    def swap(value: Any) -> Any:
        if isinstance(value, torch.device) and value != device:
            return device
        return value

    for m in module.modules():
        graph = getattr(m, "graph", None)
        if not isinstance(graph, fx.Graph):
            continue
        changed = False
        for node in graph.nodes:
            args = fx.node.map_aggregate(node.args, swap)
            kwargs = fx.node.map_aggregate(node.kwargs, swap)
            dev = kwargs.get("device")
            if isinstance(dev, str) and torch.device(dev) != device:
                kwargs = {**kwargs, "device": device}
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                changed = True
        if changed and isinstance(m, fx.GraphModule):
            m.recompile()


_GROUPS: dict[tuple[Any, tuple[int, ...]], Any] = {}
"""Process groups of the free-parameter units, by (world, ranks): created once per world."""


@dataclass
class TracedStage:
    """This rank's traced stage, ready for the plan's strategies."""

    module: nn.Module
    """The stage ``GraphModule`` (parameters at the model's FQNs)."""
    split: TracedSplit
    free_names: tuple[str, ...]
    """Names (every alias) of the stage's free parameters."""
    unit_names: list[list[str]]
    """Per free-parameter unit, one name of each of its copies on this stage (parameters are
    looked up by name: a meta start replaces the parameter objects)."""
    unit_groups: list[Any]
    """Per unit, the process group of every rank holding a copy."""
    spans: list[bool]
    """Per unit: whether its copies live on several stages."""
    counted_here: list[bool]
    """Per unit: whether this stage's first copy is the one the gradient norm counts (the
    first stage holding the unit)."""
    rows: int
    """Local micro-batch size the stage was traced with."""

    def units(self) -> list[tuple[list[nn.Parameter], Any]]:
        """The free-parameter units of :attr:`module` now, for
        :class:`~uniap.executor.model_forward.FreeParamSync`."""
        return [
            ([self.module.get_parameter(n) for n in names], group)
            for names, group in zip(self.unit_names, self.unit_groups)
        ]

    def not_counted(self) -> set[int]:
        """``id`` of the copies left out of the gradient norm: every copy but one per unit in
        the whole model."""
        out: set[int] = set()
        for (copies, _), counted in zip(self.units(), self.counted_here):
            out |= {id(p) for i, p in enumerate(copies) if i > 0 or not counted}
        return out

    aliases: list[list[str]]
    """The names of each tensor the model holds under several (tied weights), so a full
    state dict has every key the model's has."""
    layer_paths: dict[str, str | None]
    """Each of the stage's layers -> the path of its module in :attr:`module`: its FQN, or
    another name of the same module that the forward calls it by (T5's ``shared`` embedding
    runs as ``encoder.embed_tokens``); None when the stage holds no module for it (its
    parameters, if any, are then free copies)."""


def build_traced_stage(
    model: nn.Module,
    plan: Any,
    stage_index: int,
    example_inputs: Any,
    groups: Any,
    device: torch.device,
) -> TracedStage:
    """Trace ``model`` split at ``plan``'s stage boundaries and keep stage ``stage_index``
    (see the module docstring). Collective: creates the free-parameter groups."""
    bad = [ls.fqn for ls in plan.layer_strategies if ls.tp > 1]
    if bad:
        raise PlanMismatchError(
            f"{type(model).__name__} is split into pipeline stages by tracing its forward, "
            f"which runs layers at tp=1 only, but layer(s) {bad[:3]} have tp>1; re-plan "
            "(the planner does not offer tp>1 at pp>1 for such a model), or declare the model "
            "a chain (nn.Sequential or uniap_layer_fqns())"
        )
    if example_inputs is None:
        raise PlanMismatchError(
            f"{type(model).__name__} at pp={plan.pp_degree} is split by tracing its forward on "
            "an example micro-batch: pass example_inputs= (a batch as the forward takes it) to "
            "parallelize"
        )
    args, kwargs = call_args(example_inputs)
    sizes: list[int] = []
    map_tensors(lambda t: sizes.append(t.shape[0]) if t.dim() else None, (args, kwargs))
    if not sizes:
        raise PlanMismatchError("example_inputs has no tensor with a batch dimension")
    first = plan.stages[stage_index].layers[0]
    rows = plan.global_batch_size // plan.num_microbatches // first.dp
    trace_device = next(
        (t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu")
    )
    t_args, t_kwargs = trace_inputs(args, kwargs, sizes[0], rows)
    t_kwargs = training_call(model, t_args, t_kwargs)
    t_args, t_kwargs = map_tensors(lambda t: t.to(trace_device), (t_args, t_kwargs))
    split_fqns = [s.layers[0].fqn for s in plan.stages[1:]]
    split = trace_split(model, split_fqns, t_args, t_kwargs)
    logger.info(
        "traced %s into %d stages (root inputs %s; %s values into each stage)",
        type(model).__name__,
        len(split.stages),
        list(split.routing.root_inputs),
        [len(v) for v in split.routing.live],
    )

    # free parameters: tied or outside every layer (template), or outside the stage's layers
    all_fqns = [ls.fqn for ls in plan.layer_strategies]
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    known |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    for k, module in enumerate(split.stages):
        for name, _ in (
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        ):
            if name not in known:  # e.g. "blocks.0@1.weight": a module called again
                again = name.split("@")[0]
                raise PlanMismatchError(
                    f"{type(model).__name__}: the traced stage {k} holds {name}, which is no "
                    f"parameter or buffer of the model ({again} is called more than once, its "
                    "calls on different stages); plan with pp=1, or declare the model a chain "
                    "(nn.Sequential or uniap_layer_fqns())"
                )
    planned = {ls.fqn: k for k, st in enumerate(plan.stages) for ls in st.layers}
    for k, module in enumerate(split.stages):
        for fqn, j in planned.items():
            if j != k and _runs_in(module, fqn):
                raise PlanMismatchError(
                    f"{type(model).__name__}: layer {fqn} runs in the part of the forward traced "
                    f"as stage {k}, but the plan places it on stage {j} (the layers do not run "
                    "one after the other in chain order); plan with pp=1, or declare the model "
                    "a chain (nn.Sequential or uniap_layer_fqns())"
                )
    template: dict[str, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        template[name] = id(p)
    free_ids = {template[n] for n in free_parameters(model, all_fqns)}
    stage_fqns = [[ls.fqn for ls in s.layers] for s in plan.stages]

    def owner(k: int, name: str) -> str | None:
        return next((f for f in stage_fqns[k] if name == f or name.startswith(f + ".")), None)

    for k, module in enumerate(split.stages):  # used outside its stage's layers: free too
        for name, _ in module.named_parameters(remove_duplicate=False):
            if name in template and owner(k, name) is None:
                free_ids.add(template[name])
    holders: dict[int, list[int]] = {}  # template param -> stages holding a free copy
    per_stage: list[dict[int, list[tuple[str, nn.Parameter]]]] = []
    for k, module in enumerate(split.stages):
        found: dict[int, list[tuple[str, nn.Parameter]]] = {}
        seen: set[int] = set()
        for name, p in module.named_parameters(remove_duplicate=False):
            tid = template.get(name)
            if tid is None or tid not in free_ids:
                continue
            if id(p) in seen:
                found[tid].append((name, p))
                continue
            seen.add(id(p))
            found.setdefault(tid, []).append((name, p))
        per_stage.append(found)
        for tid in found:
            holders.setdefault(tid, []).append(k)
    layout = groups.layout
    group_of: dict[tuple[int, ...], Any] = {}
    for stages in sorted({tuple(v) for v in holders.values()}):
        ranks = tuple(r for s in stages for r in layout.stage_ranks(s))
        key = (dist.group.WORLD, ranks)
        if key not in _GROUPS:
            _GROUPS[key] = dist.new_group(list(ranks)) if len(ranks) > 1 else None
        group_of[stages] = _GROUPS[key]
    mine = per_stage[stage_index]
    unit_names, unit_groups, spans, counted, free_names = [], [], [], [], []
    for tid in sorted(mine, key=lambda t: (tuple(holders[t]), min(n for n, _ in mine[t]))):
        named = mine[tid]
        unit_names.append(list({id(p): n for n, p in reversed(named)}.values())[::-1])
        unit_groups.append(group_of[tuple(holders[tid])])
        spans.append(len(holders[tid]) > 1)
        counted.append(holders[tid][0] == stage_index)
        free_names += [n for n, _ in named]
    module = split.stages[stage_index]
    split.stages = []  # drop the other stages' copies
    if trace_device != device and trace_device.type != "meta":
        module.to(device)
    retarget_device(module, device)
    aliases: dict[int, list[str]] = {}
    for name, sub in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(sub), []).append(name)
    layer_paths: dict[str, str | None] = {}
    for fqn in stage_fqns[stage_index]:
        names = aliases.get(id(model.get_submodule(fqn)), [fqn])
        layer_paths[fqn] = next(
            (n for n in sorted(names, key=lambda n: n != fqn) if _runs_in(module, n)), None
        )
    tensor_names: dict[int, list[str]] = {}
    for name, t in (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ):
        tensor_names.setdefault(id(t), []).append(name)
    tied = [names for names in tensor_names.values() if len(names) > 1]
    return TracedStage(
        module,
        split,
        tuple(free_names),
        unit_names,
        unit_groups,
        spans,
        counted,
        rows,
        tied,
        layer_paths,
    )
