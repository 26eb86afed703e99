"""The training log: what each step measured next to what the plan predicted.

:class:`ParallelModel` keeps a :class:`TrainingLog` (``pm.training_log``) and hands it every
``train_step``. Every ``every`` steps rank 0 logs one line on the ``uniap.training`` logger at
INFO::

    step 20 | loss 4.1234 | 52.1 ms/iteration (predicted 45.9 ms, +13%) | 307 samples/s,
    39,300 tokens/s | MFU 12.3% of 4 x 50.0 GFLOP/s | peak memory 5.91 MiB (predicted 6.20 MiB)

- the iteration time is measured from one ``train_step``'s end to the next (so it includes the
  optimizer step and the data loading between them, as the predicted time per iteration
  includes the optimizer step); the first step, with nothing before it, reports ``train_step``
  alone;
- samples/s over the global batch; tokens/s when the inputs are token ids (an integer tensor:
  tokens per sample = its elements per sample);
- MFU: model FLOPs (forward + backward of every layer, from the graph, without recompute) per
  second over the world's peak FLOP/s at the training dtype (both stored in the plan by the
  planner: ``predicted.model_flops_per_sample``, ``predicted.peak_flops_per_s``);
- peak memory of this rank's step (``pm.peak_memory_bytes``, when ``pm.measure_memory``) next
  to the cost model's prediction for its stage.

Turn it on with ``logging.getLogger("uniap.training").setLevel(logging.INFO)`` (and a
handler, e.g. ``logging.basicConfig()``), change the period with ``pm.training_log.every = N``,
or set ``pm.training_log = None`` to drop it. ``records`` keeps every logged line's numbers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from uniap.report import fmt_bytes, fmt_seconds

__all__ = ["TrainingLog", "LOGGER_NAME"]

LOGGER_NAME = "uniap.training"
log = logging.getLogger(LOGGER_NAME)


class TrainingLog:
    """Per-step measurements of a :class:`~uniap.executor.ParallelModel`, logged on rank 0."""

    def __init__(self, plan: Any, *, every: int = 10, rank: int | None = None) -> None:
        self.plan = plan
        self.every = every
        """Log every this many steps (the first step is always logged)."""
        self.rank = rank
        """This process's rank (default: ``torch.distributed``'s, else 0)."""
        self.step = 0
        """Steps seen."""
        self.records: list[dict[str, float | None]] = []
        """The numbers of every line logged."""
        self._last_end: float | None = None
        self._tokens_per_sample: float | None = None

    def record(self, pm: Any, inputs: Any, loss: float) -> dict[str, float | None] | None:
        """Called when a ``train_step`` ends; returns the numbers when this step is logged."""
        now = time.perf_counter()
        last, self._last_end = self._last_end, now
        self.step += 1
        if self.step != 1 and self.step % max(self.every, 1):
            return None
        if self._rank() != 0 or not log.isEnabledFor(logging.INFO):
            return None
        p = self.plan
        pred = p.predicted
        # one train_step end to the next: the whole iteration (optimizer step and data included)
        iteration = now - last if last is not None else pm.last_step_time_s
        samples = p.global_batch_size / iteration if iteration > 0 else None
        tokens = self._tokens(inputs)
        flops = pred.get("model_flops_per_sample")
        peak = pred.get("peak_flops_per_s")
        mfu = flops * samples / (peak * p.world_size) if flops and peak and samples else None
        mem_pred = pred.get("peak_memory_bytes") or []
        rec = {
            "step": float(self.step),
            "loss": float(loss),
            "iteration_s": iteration,
            "train_step_s": pm.last_step_time_s,
            "samples_per_s": samples,
            "tokens_per_s": tokens * samples if tokens and samples else None,
            "mfu": mfu,
            "predicted_iteration_s": pred.get("time_per_iteration_s"),
            "peak_memory_bytes": float(pm.peak_memory_bytes) if pm.peak_memory_bytes else None,
            "predicted_peak_memory_bytes": mem_pred[pm.stage_index]
            if pm.stage_index < len(mem_pred)
            else None,
        }
        self.records.append(rec)
        log.info("%s", self.format(rec))
        return rec

    def format(self, rec: dict[str, float | None]) -> str:
        """One log line from a record."""
        parts = [f"step {int(rec['step'])}", f"loss {rec['loss']:.4f}"]
        it, pit = rec["iteration_s"], rec["predicted_iteration_s"]
        what = "iteration" if self.step > 1 else "train_step"
        text = f"{fmt_seconds(it)}/{what}"
        if pit:
            text += f" (predicted {fmt_seconds(pit)}/iteration, {100 * (it / pit - 1):+.0f}%)"
        parts.append(text)
        if rec["samples_per_s"]:
            text = f"{rec['samples_per_s']:.1f} samples/s"
            if rec["tokens_per_s"]:
                text += f", {rec['tokens_per_s']:,.0f} tokens/s"
            parts.append(text)
        if rec["mfu"] is not None:
            peak = self.plan.predicted["peak_flops_per_s"]
            parts.append(
                f"MFU {100 * rec['mfu']:.1f}% of {self.plan.world_size} x {_si(peak, 'FLOP/s')}"
            )
        if rec["peak_memory_bytes"]:
            text = f"peak memory {fmt_bytes(rec['peak_memory_bytes'])}"
            if rec["predicted_peak_memory_bytes"]:
                text += f" (predicted {fmt_bytes(rec['predicted_peak_memory_bytes'])})"
            parts.append(text)
        return " | ".join(parts)

    def _tokens(self, inputs: Any) -> float | None:
        """Tokens per sample: the size of the inputs' first tensor, if it is one of integer
        token ids (a tensor, the first positional input, ``input_ids`` of a keyword batch)."""
        if self._tokens_per_sample is None:
            from uniap._torch_utils import tensors_in

            x = next(iter(tensors_in(inputs)), None)
            if x is not None and not x.is_floating_point() and x.dim() >= 2 and x.shape[0]:
                self._tokens_per_sample = x.numel() / x.shape[0]
            else:
                self._tokens_per_sample = 0.0
        return self._tokens_per_sample or None

    def _rank(self) -> int:
        if self.rank is not None:
            return self.rank
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _si(x: float, unit: str) -> str:
    """``5e10, "FLOP/s"`` -> ``50 GFLOP/s``."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"
