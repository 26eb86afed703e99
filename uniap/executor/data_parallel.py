"""Data parallelism of one layer over its DP group: ``DDP`` or ``FSDP`` (FSDP2 building blocks).

Both kinds use torch's FSDP2 machinery, one state per layer, on the layer's own DP mesh (the
``dp`` dim of its stage's ``(dp, tp)`` mesh), so layers of one stage may use different DP
groups:

* ``DDP``: ``replicate`` (torch's FSDP2-based DDP, ``torch.distributed._composable.
  replicate_with_fsdp``). Parameters are replicated over the DP group. Per iteration: **one
  all-reduce of the layer's gradients** over the DP group, during the last micro-batch's
  backward; no parameter communication. (Classic ``DistributedDataParallel`` wraps one root
  module with one group and so cannot express per-layer groups; ``replicate`` can.)
* ``FSDP``: ``fully_shard`` over the DP group (with TP, the ``dp`` dim of the 2-D mesh: the
  TP shards are sharded again on dim 0). Per iteration, when ``c == 1``
  (``reshard_after_forward=True``): all-gather of the parameters in forward, all-gather again
  in backward, one reduce-scatter of the gradients. When ``c > 1``
  (``reshard_after_forward=False``, and no resharding after backward until the last
  micro-batch): **one all-gather** (first forward) **and one reduce-scatter** (last backward)
  per iteration; the unsharded parameters and gradients stay resident meanwhile.

Gradients are **summed** over the DP group (divide factor 1, SUM reductions): every rank
scales its micro-batch loss by ``local_samples / global_batch`` so the sum is the global-batch
mean. Gloo in torch 2.13 supports what FSDP2 needs on CPU (all-gather, reduce-scatter,
all-reduce, checked); with a divide factor of 1 FSDP2 would reduce with ``PREMUL_SUM(1)``, which
gloo refuses ("Cannot use ReduceOp.PREMUL_SUM with Gloo"), so ``force_sum_reduction_for_comms``
makes it issue plain ``SUM`` collectives (on NCCL too: a division by 1 is skipped).

:class:`GradSync` toggles the per-micro-batch flags: gradient reduction and resharding after
backward only on the last micro-batch.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

__all__ = ["GradSync", "apply_dp"]

logger = logging.getLogger(__name__)


def apply_dp(
    module: nn.Module, kind: str, dp_mesh: DeviceMesh, *, num_microbatches: int
) -> nn.Module:
    """Apply ``kind`` (``DDP``/``FSDP``) to ``module`` over the 1-D ``dp_mesh``, in place.

    A layer without parameters, or with ``dp == 1``, is left alone (nothing to synchronise).
    """
    if dp_mesh.size() == 1 or not any(True for _ in module.parameters()):
        return module
    if kind == "FSDP":
        fully_shard(module, mesh=dp_mesh, reshard_after_forward=num_microbatches == 1)
    elif kind == "DDP":
        replicate(module, mesh=dp_mesh)
    else:
        raise ValueError(f"unknown data-parallel kind {kind!r}; use 'DDP' or 'FSDP'")
    assert isinstance(module, FSDPModule)
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)
    return module


class GradSync:
    """Per-micro-batch switches of the stage's DP layers (FSDP2 / replicate states)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules: list[FSDPModule] = [m for m in modules if isinstance(m, FSDPModule)]

    def before_backward(self, *, last: bool) -> None:
        """Reduce gradients (and free unsharded parameters) only in the last backward."""
        for m in self.modules:
            m.set_is_last_backward(last)
            m.set_requires_gradient_sync(last, recurse=False)
            m.set_reshard_after_backward(last, recurse=False)

    def finish(self) -> None:
        """Leave the layers in the plain state (sync on), e.g. for a lone ``forward``."""
        self.before_backward(last=True)

    @torch.no_grad()
    def reshard(self) -> None:
        """Free unsharded FSDP parameters kept after a forward without backward."""
        for m in self.modules:
            m.reshard()
