"""The loss on vocabulary-sharded logits: ``loss_parallel()`` around the step, and the check
that the loss really is one ``loss_parallel`` computes without gathering the logits.

A head at ``tp > 1`` (:mod:`.tensor_parallel`) returns its logits as a DTensor sharded on the
vocabulary, ``V / tp`` columns per rank. The loss (the user's ``loss_fn``, or the model's own,
e.g. a Hugging Face model given ``labels``) runs on them unchanged under
``torch.distributed.tensor.parallel.loss_parallel()``, forward and backward: cross-entropy's
``log_softmax`` all-reduces the row max and the sum of exponentials and ``nll_loss`` the target
logit over the TP group (three fp32 values per token, what the cost model charges); the
backward is local. The full logits are never gathered.

Any other op on the logits that needs the whole vocabulary (``softmax``, ``gather``,
``topk``, ``full_tensor()``...) would make DTensor gather them silently: the plan would hold
and move ``tp`` times what the cost model charged. So the first loss is checked before its
backward (no gradient exists yet): every autograd node between the loss and the logits must
be cross-entropy (``nll_loss``, ``log_softmax``) or a view, slice, cast, copy, sign, scaling
or sum;
anything else raises :class:`~uniap.errors.UniapError` naming the ops and the fix (use
cross-entropy, or plan the head at tp = 1), as does a ``loss_fn`` that DTensor cannot run on
sharded logits (e.g. mixing them with a plain tensor in ``gather``). The check is made once;
the loss returned is the plain (replicated) scalar. With pipeline stages only the last one
runs the loss, inside the schedule, while the others wait on it: there a refusal is kept, the
schedule finishes on a zero loss, and after the step every rank gets the last stage's verdict
(one gather, after the first step only) and raises the same error
(:meth:`uniap.executor.parallel_model.ParallelModel.train_step`); no rank is left waiting
for the process group's timeout.

The model's own forward (pp = 1, not a chain) returns its output in the first layer's batch
layout (:mod:`.model_forward`), where the loss runs. Sharded logits reach it by a gather of
the batch over ranks holding the same vocabulary shard, never by a slice: the ranks a slice
would split the batch over are the head's TP ranks, which hold different vocabulary shards.
:func:`check_head_layout` refuses such a plan before training.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from uniap.contract import LayerStrategy, Plan
from uniap.errors import PlanMismatchError, UniapError
from uniap.graph import Layer

__all__ = ["VocabParallelLoss", "check_head_layout", "vocab_heads"]

logger = logging.getLogger(__name__)

_ALLOWED_NODES = frozenset(
    {
        "NllLossBackward0",
        "NllLoss2DBackward0",
        "LogSoftmaxBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "SliceBackward0",
        "SelectBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
        "ExpandBackward0",
        "CloneBackward0",
        "ToCopyBackward0",
        "MulBackward0",
        "DivBackward0",
        "AddBackward0",
        "SubBackward0",
        "RsubBackward1",
        "NegBackward0",
        "SumBackward0",
        "SumBackward1",
        "MeanBackward0",
        "MeanBackward1",
    }
)


class VocabParallelLoss:
    """The loss of a stage whose head (``head``: its vocabulary-parallel ``nn.Linear``, at
    layer ``fqn``) is at ``tp > 1``: :meth:`context` wraps the step, :meth:`finish` checks the
    first loss and returns each loss as a plain tensor."""

    def __init__(self, head: nn.Module, fqn: str, tp: int) -> None:
        self.fqn, self.tp = fqn, tp
        self.checked = False
        self._logits_node: Any = None
        self._hook = head.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        self._logits_node = getattr(output, "grad_fn", None)

    def context(self) -> contextlib.AbstractContextManager:
        """``loss_parallel()``: the loss's forward and backward both run inside it."""
        return loss_parallel()

    def finish(self, loss: torch.Tensor) -> torch.Tensor:
        """Check the first loss (see the module docstring); the loss as a plain tensor."""
        if not self.checked:
            self._check(loss)
        if isinstance(loss, DTensor):  # replicated over the TP group: no communication
            loss = loss.full_tensor()
        return loss

    def refusal(self, what: str) -> UniapError:
        """The error for a loss that does ``what`` to the sharded logits."""
        return UniapError(
            f"the loss {what} the logits of {self.fqn!r}, which the plan keeps sharded on the "
            f"vocabulary (tp={self.tp}): the loss runs under loss_parallel(), which computes "
            "cross-entropy (F.cross_entropy, nn.CrossEntropyLoss, log_softmax + nll_loss) "
            "reached through views, slices, casts and scalings of the logits; other ops may "
            "gather the whole logits (softmax, gather, topk do), which the plan does not "
            f"charge. Use such a loss, or plan {self.fqn!r} at tp=1 (plan with "
            "vocab_parallel=False, or uniap plan --no-vocab-parallel)"
        )

    def _check(self, loss: torch.Tensor) -> None:
        bad = _ops_on_logits(loss.grad_fn, self._logits_node)
        if bad:
            raise self.refusal(f"applies {', '.join(bad)} to")
        self.checked = True
        self._hook.remove()
        self._logits_node = None
        logger.info("loss on %s's vocabulary-sharded logits: loss_parallel, checked", self.fqn)


def _ops_on_logits(root: Any, target: Any) -> list[str]:
    """Names of the autograd nodes on a path from ``root`` to ``target`` (excluded) that are
    not in the allowed set, sorted; empty when ``target`` is not reached."""
    if root is None or target is None:
        return []
    reaches: dict[Any, bool] = {target: True}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in reaches and not expanded:
            continue
        children = [n for n, _ in node.next_functions if n is not None]
        if expanded:
            reaches[node] = any(reaches.get(n, False) for n in children)
            continue
        reaches.setdefault(node, False)
        stack.append((node, True))
        stack += [(n, False) for n in children if n not in reaches]
    return sorted(
        {
            type(n).__name__
            for n, hit in reaches.items()
            if hit and n is not target and type(n).__name__ not in _ALLOWED_NODES
        }
    )


def vocab_heads(plan: Plan, layers: dict[str, Layer]) -> list[LayerStrategy]:
    """The plan's layers that keep a head's logits sharded on the vocabulary (tp > 1)."""
    out = []
    for ls in plan.layer_strategies:
        layer = layers.get(ls.fqn)
        vocab = layer.tp_vocab if layer is not None else None
        if ls.tp > 1 and vocab is not None and vocab.kind == "head":
            out.append(ls)
    return out


def check_head_layout(plan: Plan, layers: dict[str, Layer], base: tuple[int, int]) -> None:
    """Refuse a plan whose vocabulary-parallel head (tp > 1) runs the model's own forward with
    a data-parallel degree that the first layer's (``base``, where the loss runs) does not
    divide (see the module docstring), naming the fix."""
    for ls in vocab_heads(plan, layers):
        if ls.dp % base[0]:
            raise PlanMismatchError(
                f"layer {ls.fqn!r} keeps its logits sharded on the vocabulary over tp={ls.tp} "
                f"ranks at dp={ls.dp}, but the model's own forward computes the loss in the "
                f"first layer's layout (dp={base[0]}, tp={base[1]}): splitting the logits' batch "
                f"over ranks holding different vocabulary shards is not possible; give "
                f"{ls.fqn!r} a dp that {base[0]} divides, or tp=1"
            )
