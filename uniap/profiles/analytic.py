"""The profile interface and the analytic profile (from FLOPs and datasheet constants).

Formulas (``S`` = bytes of the full tensor, ``n`` = group size, ``alpha``/``bw`` = latency and
per-device bandwidth of the link the group really uses: intra-node if all its ranks share a
node, else inter-node):

- compute of a layer at local batch ``b`` and TP degree ``tp``:
  ``fwd_s = overhead_s + fwd_flops_per_sample * b / tp / (peak_flops * efficiency)``, same for
  backward with the backward FLOPs.
- ring all-reduce: ``2 (n - 1) alpha + 2 (n - 1) / n * S / bw``
- ring all-gather / reduce-scatter (``S`` = gathered size): ``(n - 1) alpha + (n - 1) / n * S / bw``
- point-to-point: ``alpha + S / bw``
- optimizer step (AdamW, memory bound): ``params * optimizer_bytes_touched_per_param / memory_bw``
- weight-gradient part of the backward (the W of zero-bubble schedules, the rest is the input
  gradient B): ``wgrad_flops_per_sample * b / tp / (peak_flops * efficiency)``, the per-pass
  overhead in B (:func:`weight_grad_fraction` for profiles without a measured split)
- activations kept for backward at local batch ``b``, TP degree ``tp`` (``f`` = the layer's
  TP-sharded fraction of its saved bytes, 0 at ``tp = 1``):
  ``saved_bytes_per_sample * b * (f / tp + 1 - f)``; with sequence parallelism (``sp``), ``f +
  f_sp`` in place of ``f``, ``f_sp`` the fraction saved outside the TP pairs (norm inputs, the
  residual stream's ops), which SP computes on ``1 / tp`` of the sequence
  (:attr:`uniap.graph.Layer.sp_saved_fraction`, Korthikanti et al. 2022, section 4.2.2)
- the loss's working memory at the last layer: its output and the output's gradient,
  ``2 * output_bytes_per_sample * b``, ``/ tp`` for a vocabulary-parallel head at ``tp > 1``
  (each rank holds ``V / tp`` of the logits, :mod:`uniap.executor.vocab_loss`)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from uniap.cluster import Cluster
from uniap.graph import Layer, ModelGraph

__all__ = ["Profile", "AnalyticProfile", "COLLECTIVES", "loss_tp_share", "weight_grad_fraction"]

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "p2p")

# AdamW reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq:
# 7 fp32 accesses per parameter.
_ADAMW_BYTES_PER_PARAM = 7 * 4


def loss_tp_share(layer: Layer, tp: int) -> int:
    """How many ranks share the loss of the last layer ``layer`` at TP degree ``tp``: ``tp``
    for a vocabulary-parallel head (loss parallel on ``V / tp`` of the logits each), else 1."""
    vocab = layer.tp_vocab
    return tp if tp > 1 and vocab is not None and vocab.kind == "head" else 1


def loss_parallel_bytes(layer: Layer, batch: float, tp: int, whole_bytes: float) -> float:
    """The loss's working memory at TP degree ``tp`` from ``whole_bytes``, its value at tp = 1
    (local ``batch`` samples): for a vocabulary-parallel head at ``tp > 1`` loss parallel
    holds one more logits-shaped temporary than the tp = 1 loss (its shifted logits), each
    ``V / tp`` wide: ``(whole + out_bytes * batch) / tp``. Measured on CPU (GPT, vocabulary
    1024, tp = 2, ``tests/dist/test_vocab_parallel.py``): tp = 1 held 3.03 logits, tp = 2 held
    2.01, this rule's 2.02 (``/ tp`` alone gave 1.52); a standalone cross-entropy held 4
    logits at tp = 1 and 5 shards at tp = 2 and 4."""
    share = loss_tp_share(layer, tp)
    if share == 1:
        return whole_bytes
    return (whole_bytes + layer.output_bytes_per_sample * batch) / share


def weight_grad_fraction(layer: Layer) -> float:
    """Fraction of ``layer``'s backward FLOPs that compute parameter gradients: for a Linear
    the input gradient and the weight gradient are one matrix product each, attention's
    backward is all input gradient (:attr:`uniap.graph.Layer.wgrad_flops_per_sample`). A
    layer without that count (built elsewhere) gets ``fwd_flops / bwd_flops``: every forward
    FLOP in a product with a parameter."""
    if layer.bwd_flops_per_sample <= 0:
        return 0.0
    w = layer.wgrad_flops_per_sample
    if w is None:
        w = layer.fwd_flops_per_sample
    return min(1.0, w / layer.bwd_flops_per_sample)


class Profile:
    """What the cost model asks of a profile. Subclasses: analytic or measured."""

    source: str = "abstract"
    overlap_coefficient: float = 0.0
    """Fraction of once-per-iteration gradient synchronisation hidden behind backward."""
    pipeline_overhead_s: float = 0.0
    """Seconds a pipeline stage spends per micro-batch on the schedule itself (its bookkeeping
    and point-to-point waits), whatever its layers; 0 unless measured."""
    tp_comm_in_compute: bool = False
    """Whether ``layer_compute_s`` at ``tp > 1`` already includes the layer's TP collectives
    (measured on a real TP group); else the cost model adds them from ``collective_s``."""

    def layer_compute_s(self, layer: Layer, batch: float, tp: int) -> tuple[float, float]:
        """(forward_s, backward_s) of ``layer`` at local batch ``batch`` and TP degree ``tp``."""
        raise NotImplementedError

    def weight_grad_s(self, layer: Layer, batch: float, tp: int) -> float:
        """Seconds of ``layer``'s backward (:meth:`layer_compute_s`) that compute parameter
        gradients: the W of a zero-bubble schedule, the rest is the input gradient B. Default:
        the backward's FLOP share (:func:`weight_grad_fraction`)."""
        return self.layer_compute_s(layer, batch, tp)[1] * weight_grad_fraction(layer)

    def collective_s(self, op: str, nbytes: float, ranks: Sequence[int]) -> float:
        """Seconds for collective ``op`` over ``ranks`` moving a tensor of ``nbytes``."""
        raise NotImplementedError

    def optimizer_step_s(
        self, num_params: float, layer: Layer | None = None, *, dtensor: bool = False
    ) -> float:
        """Seconds of one optimizer step over ``num_params`` local parameters (of ``layer``,
        held as DTensors when ``dtensor``)."""
        raise NotImplementedError

    def dp_residual_s(self, layer: Layer, kind: str, phase: str) -> float:
        """Seconds the executor's data-parallel wrapping of ``layer`` (``kind`` DDP / FSDP)
        costs in ``phase`` (``microbatch``, ``sync``, ``single``) beyond the collective terms
        of the cost model (default 0: the analytic profile has nothing else to say)."""
        return 0.0

    def loss_s(self, layer: Layer, batch: float, tp: int = 1) -> float:
        """Seconds of the loss's forward + backward on the last layer's output at local
        ``batch`` and the last layer's TP degree ``tp`` (default 0: counted in the last
        layer's FLOPs)."""
        return 0.0

    def loss_working_bytes(self, layer: Layer, batch: float, tp: int = 1) -> float:
        """Bytes the loss and its backward need at the last layer ``layer`` at local
        ``batch`` and TP degree ``tp`` beyond its saved activations (default: the output and
        its gradient; for a vocabulary-parallel head at ``tp > 1`` also loss parallel's
        shifted logits, each ``V / tp`` wide: :func:`loss_parallel_bytes`)."""
        whole = 2 * layer.output_bytes_per_sample * batch
        return loss_parallel_bytes(layer, batch, tp, whole)

    def activation_bytes(self, layer: Layer, batch: float, tp: int, *, sp: bool = False) -> float:
        """Bytes ``layer`` keeps for backward at local batch ``batch`` and TP degree ``tp``,
        sequence parallel when ``sp`` (default: the graph's traced bytes, the TP-sharded
        fraction, and with ``sp`` the SP-sharded one, divided by ``tp``)."""
        f = layer.tp_saved_fraction if tp > 1 else 0.0
        if sp and tp > 1:
            f += layer.sp_saved_fraction
        return layer.saved_bytes_per_sample * batch * (f / tp + 1 - f)

    def check_compatible(self, graph: ModelGraph, cluster: Cluster) -> None:
        """Raise ``ConfigError`` naming what differs when the profile was made for another
        model or machine (a stale profile); profiles derived from the inputs always match."""


@dataclass
class AnalyticProfile(Profile):
    """Profile computed from FLOPs and the cluster's constants."""

    cluster: Cluster
    """Where the numbers come from."""
    dtype: str = "float32"
    """Compute dtype (selects the peak FLOP/s)."""
    layer_overhead_s: float | None = None
    """Fixed time per layer per pass (kernel launches, Python); default: 30 us on GPU, 100 us on
    CPU."""
    overlap_coefficient: float = 0.5
    """Fraction of gradient synchronisation hidden behind backward."""
    memory_bandwidth_bytes_per_s: float | None = None
    """Device memory bandwidth for the optimizer step; default: 2 TB/s GPU, 10 GB/s CPU."""
    source: str = "analytic"

    def __post_init__(self) -> None:
        gpu = self.cluster.device_type != "cpu"
        if self.layer_overhead_s is None:
            self.layer_overhead_s = 30e-6 if gpu else 100e-6
        if self.memory_bandwidth_bytes_per_s is None:
            self.memory_bandwidth_bytes_per_s = 2.0e12 if gpu else 10e9
        self._flops_per_s = self.cluster.peak_flops(self.dtype) * self.cluster.compute_efficiency

    def layer_compute_s(self, layer: Layer, batch: float, tp: int) -> tuple[float, float]:
        fwd = self.layer_overhead_s + layer.fwd_flops_per_sample * batch / tp / self._flops_per_s
        bwd = self.layer_overhead_s + layer.bwd_flops_per_sample * batch / tp / self._flops_per_s
        return fwd, bwd

    def weight_grad_s(self, layer: Layer, batch: float, tp: int) -> float:
        flops = layer.bwd_flops_per_sample * weight_grad_fraction(layer)
        return flops * batch / tp / self._flops_per_s

    def collective_s(self, op: str, nbytes: float, ranks: Sequence[int]) -> float:
        n = len(ranks)
        if op == "p2p":
            alpha, bw = self.cluster.link(ranks)
            return alpha + nbytes / bw
        if n <= 1 or nbytes <= 0:
            return 0.0
        alpha, bw = self.cluster.link(ranks)
        if op == "all_reduce":
            return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / bw
        if op in ("all_gather", "reduce_scatter"):
            return (n - 1) * alpha + (n - 1) / n * nbytes / bw
        raise ValueError(f"unknown collective {op!r}; one of {COLLECTIVES}")

    def optimizer_step_s(
        self, num_params: float, layer: Layer | None = None, *, dtensor: bool = False
    ) -> float:
        return num_params * _ADAMW_BYTES_PER_PARAM / self.memory_bandwidth_bytes_per_s
