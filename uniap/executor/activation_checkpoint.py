"""Activation checkpointing of one layer (the plan's ``recompute``).

A layer with ``recompute`` keeps only its input for backward: its forward runs without saving
activations, and backward re-runs it to rebuild them (the cost model charges one more forward
and ``input_bytes`` per micro-batch instead of the layer's saved activations).

Applied with torch's composable ``checkpoint`` (non-reentrant ``torch.utils.checkpoint``
driven by forward hooks), which neither wraps the module nor renames anything: parameter FQNs
and ``state_dict`` keys stay the model's own, unlike ``checkpoint_wrapper`` and its
``_checkpoint_wrapped_module`` prefix. Order (torchtitan's): TP, then AC, then DDP/FSDP. FSDP2
and ``replicate`` register their forward pre-hook with ``prepend=True`` and their post-hook
last, so their all-gather and resharding run *outside* the checkpointed region, exactly as
with a wrapper: the recomputation in backward finds the parameters already unsharded by the
pre-backward hook. TP's collectives inside the layer are re-run by the recomputation (as in
Megatron's full recomputation).

The random-number state is restored for the recomputation (``preserve_rng_state``), so dropout
masks agree between the forward and its replay.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed._composable import checkpoint

__all__ = ["apply_ac", "is_checkpointed"]

logger = logging.getLogger(__name__)


def apply_ac(module: nn.Module) -> nn.Module:
    """Checkpoint ``module``'s activations (recompute its forward in backward), in place.

    Must come after TP and before DDP/FSDP of the same module; returns ``module``.
    """
    if is_checkpointed(module):
        return module
    checkpoint(module, use_reentrant=False, preserve_rng_state=True)
    return module


def is_checkpointed(module: nn.Module) -> bool:
    """True when :func:`apply_ac` was applied to ``module``."""
    try:
        return checkpoint.state(module) is not None
    except (AttributeError, KeyError):
        return False
