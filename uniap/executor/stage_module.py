"""Splitting a declared chain into this rank's pipeline stage, by layer FQN.

Used for models whose forward is, by declaration, their layers run in order
(``nn.Sequential``, ``uniap_layer_fqns()``): at ``pp > 1``, and at ``pp == 1`` when their
layers change layout (one reshard per change). Every other model runs its own forward
(:mod:`uniap.executor.model_forward`).

A :class:`StageModule` holds deep copies of the stage's layers at their original FQNs (plain
container modules stand in for the rest of the model's tree), so ``state_dict()`` keys are the
model's own keys and a full state dict loads into the original model. Its forward is the
chain: the output of layer ``u`` (a tensor, or a tuple unpacked into positional arguments) is
the input of layer ``u + 1``, with a :class:`~uniap.executor.reshard.BatchReshard` between
layers whose batch layouts differ, and one in front of the first layer for stages after the
first (the activation arrives in the previous stage's last layout).

Parameters and buffers that belong to no layer (unused by a chain-executable model's forward)
are kept on stage 0, replicated and untouched, so the full state dict stays complete.
Parameters shared by two layers (weight tying) are refused: the executor would have to keep
copies on different stages and groups in sync.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from uniap._torch_utils import attach_module, parent_of
from uniap.contract import Plan
from uniap.errors import PlanMismatchError
from uniap.executor.mesh import ProcessGroups
from uniap.executor.reshard import BatchReshard

__all__ = ["StageModule", "build_stage_module", "chain_fqns", "leftover_state"]

logger = logging.getLogger(__name__)


def chain_fqns(model: nn.Module) -> tuple[str, ...]:
    """The model's layer chain (``uniap.graph.layer_chain``): ``model.uniap_layer_fqns()``,
    the children of an ``nn.Sequential``, or discovered."""
    from uniap.graph import layer_chain

    return tuple(fqn for fqn, _ in layer_chain(model))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def check_no_shared_params(model: nn.Module, fqns: Sequence[str]) -> None:
    """Refuse parameters owned by two layers (tied weights), naming them."""
    owner: dict[int, str] = {}
    for fqn in fqns:
        for name, p in model.get_submodule(fqn).named_parameters(remove_duplicate=False):
            if id(p) in owner and owner[id(p)] != fqn:
                raise PlanMismatchError(
                    f"parameter {fqn}.{name} is shared with layer {owner[id(p)]!r} (tied weights); "
                    "the executor needs every parameter in exactly one layer: untie them"
                )
            owner[id(p)] = fqn


def leftover_state(model: nn.Module, fqns: Sequence[str]) -> list[tuple[str, torch.Tensor, bool]]:
    """Parameters and persistent buffers of ``model`` outside every layer:
    ``(fqn, tensor, is_parameter)``."""
    out: list[tuple[str, torch.Tensor, bool]] = []
    for name, p in model.named_parameters():
        if not any(_under(name, f) for f in fqns):
            out.append((name, p, True))
    for name, b in model.named_buffers():
        if not any(_under(name, f) for f in fqns):
            out.append((name, b, False))
    return out


def _attach_tensor(root: nn.Module, fqn: str, tensor: torch.Tensor, is_param: bool) -> None:
    parent, leaf = parent_of(root, fqn)
    t = tensor.detach().clone()
    if is_param:
        parent.register_parameter(leaf, nn.Parameter(t, requires_grad=tensor.requires_grad))
    else:
        parent.register_buffer(leaf, t)


class StageModule(nn.Module):
    """One pipeline stage's layers at their model FQNs, run as a chain with reshards."""

    def __init__(self, layer_fqns: Sequence[str]) -> None:
        super().__init__()
        # Kept outside the module tree: no state, and no FQN that could clash with the model's.
        object.__setattr__(self, "_layer_fqns", tuple(layer_fqns))
        object.__setattr__(self, "_reshards", [None] * len(layer_fqns))
        object.__setattr__(self, "_in_reshard", None)

    @property
    def layer_fqns(self) -> tuple[str, ...]:
        """The stage's layers in chain order."""
        return self._layer_fqns

    def layers(self) -> list[nn.Module]:
        """The stage's layer modules in chain order."""
        return [self.get_submodule(f) for f in self._layer_fqns]

    def set_reshards(
        self, in_reshard: BatchReshard | None, after: list[BatchReshard | None]
    ) -> None:
        """Install the reshard in front of the first layer and after each layer."""
        assert len(after) == len(self._layer_fqns)
        object.__setattr__(self, "_in_reshard", in_reshard)
        object.__setattr__(self, "_reshards", list(after))

    def forward(self, *args: Any) -> Any:
        x: Any = args
        if self._in_reshard is not None:
            x = self._in_reshard(x)
        for fqn, reshard in zip(self._layer_fqns, self._reshards):
            layer = self.get_submodule(fqn)
            x = layer(*x) if isinstance(x, tuple) else layer(x)
            if reshard is not None:
                x = reshard(x)
        return x


def build_stage_module(
    model: nn.Module, plan: Plan, stage_index: int, groups: ProcessGroups, device: torch.device
) -> StageModule:
    """Deep-copy the layers of ``stage_index`` out of ``model`` into a :class:`StageModule` on
    ``device``, with the reshards the plan's layouts need (no TP/DP applied yet)."""
    all_fqns = tuple(ls.fqn for ls in plan.layer_strategies)
    check_no_shared_params(model, all_fqns)
    stage = plan.stages[stage_index]
    sm = StageModule([ls.fqn for ls in stage.layers])
    for ls in stage.layers:
        attach_module(sm, ls.fqn, copy.deepcopy(model.get_submodule(ls.fqn)))
    if stage_index == 0:
        extra = leftover_state(model, all_fqns)
        if extra:
            logger.warning(
                "%d parameter/buffer(s) belong to no layer (%s...); kept replicated on stage 0, "
                "not trained",
                len(extra),
                extra[0][0],
            )
        for name, t, is_param in extra:
            _attach_tensor(sm, name, t, is_param)
    if not any(t.is_meta for t in (*sm.parameters(), *sm.buffers())):
        sm.to(device)  # a meta model is materialised after sharding (executor.materialize)

    layouts = [(ls.dp, ls.tp) for ls in stage.layers]
    in_reshard = None
    if stage_index > 0:
        prev = plan.stages[stage_index - 1].layers[-1]
        r = BatchReshard(groups, (prev.dp, prev.tp), layouts[0])
        in_reshard = None if r.is_identity else r
    after: list[BatchReshard | None] = []
    for u in range(len(layouts)):
        if u + 1 < len(layouts) and layouts[u][0] != layouts[u + 1][0]:
            after.append(BatchReshard(groups, layouts[u], layouts[u + 1]))
        else:
            after.append(None)
    sm.set_reshards(in_reshard, after)
    return sm
