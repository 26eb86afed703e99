"""Cost model: profile + cluster + strategies -> the coefficients of UniAP's program.

For one pipeline degree ``pp`` (stage size ``g = N / pp``), micro-batch count ``c`` (micro-batch
``b = B / c``) and schedule, :meth:`CostModel.tables` returns a :class:`CostTables`. With
``k = (dp, tp, kind, recompute, sp)`` the strategy of layer ``u``, ``bl = b / dp`` its local batch,
``rho`` the overlap coefficient, ``P = param_bytes / tp`` and
``O = num_params / tp * optimizer_bytes`` (a vocabulary-parallel layer shards only its
vocabulary table, the share ``f = tp_param_fraction`` of its parameters:
``P = param_bytes * (f / tp + 1 - f)``, ``O`` likewise; see "Vocabulary parallelism" below):

- ``A[u,k]`` one micro-batch through the layer:
  ``fwd_s(bl, tp) + bwd_s(bl, tp)`` (the last layer: ``+ loss_s(bl, tp)``, the loss's own
  forward and backward)
  ``+ sum_pairs [all_reduce(out_bytes * bl) + sum_inputs all_reduce(in_bytes * bl)]`` on the TP
  group (Megatron: the row-wise output forward; the gradient of each distinct column-wise
  input backward: one for self-attention and MLP, two for cross-attention); not added when
  the profile's TP layer times already include them (``profile.tp_comm_in_compute``: a
  measured profile times TP layers on a real TP group)
  ``+ (1 - rho) * 2 * all_gather(P, dp_group)`` for FSDP when ``c == 1`` (forward and backward
  gather; with ``c > 1`` the executor keeps parameters unsharded across micro-batches)
  ``+ (1 - rho) * reduce_scatter(P, dp_group) + max(0, H - B)`` for ZeRO2 (a reduce-scatter
  in every micro-batch's backward; ``H``, ``B`` below) ``+ (1 - rho) * all_gather(P,
  dp_group)`` when ``c == 1`` (the one gather, prefetched in the forward; with ``c > 1`` it is
  in ``G``, whole)
  ``+ dp_residual(kind, microbatch)`` (``single`` for FSDP with ``c == 1``; none measured for
  ZeRO2) when ``dp > 1``:
  what the profile measured the executor's DP wrapping to cost beyond these terms (0 for the
  analytic profile).
- ``G[u,k]`` once per iteration: the exposed part of the gradient synchronisation ``S`` (below,
  "Exposed gradient synchronisation") plus the optimizer step. ``S``: DDP with ``tp > 1``
  (FSDP2 ``replicate``, one all-reduce per layer) ``all_reduce(P, dp_group)``; DDP with
  ``tp == 1`` (classic DDP over the stage, gradients all-reduced in buckets of ``Bk = 25
  MiB``) ``P / Bk * all_reduce(Bk, dp_group)``, the layer's share of full buckets; FSDP
  ``reduce_scatter(P, dp_group)``, and with ``c > 1`` ``+ all_gather(P, dp_group)`` charged
  whole; ZeRO2 with ``c > 1`` ``all_gather(P, dp_group)`` whole (its reduce-scatters are in
  ``A``); ``+ dp_residual(kind, sync)`` (not for FSDP with ``c == 1``: its residual is in
  ``A``); ``+ optimizer_step(local params, DTensor or not)``.
- HSDP with shard degree ``s`` (``tp == 1``; shard groups of ``s`` consecutive ranks, ``dp / s``
  replicas at stride ``s``): as FSDP with the all-gather and reduce-scatter on the shard group
  and ``S = reduce_scatter(P, shard group) + all_reduce(P / s, replica group)``; memory as
  FSDP's with ``s`` in place of ``dp``.
- FSDP-offload (``tp == 1``; FSDP2 ``CPUOffloadPolicy``): the layer's sharded parameters,
  gradients and optimizer state live in host memory and the optimizer steps on the CPU (also
  at ``dp == 1``, a stage of one device: the collectives over one rank cost nothing, the
  copies move the whole layer).
  Per micro-batch (parameters gathered, gradients reduced in every one; nothing stays on the
  device between micro-batches): ``+ (1 - rho) * (2 gather + red) + max(0, rho red - bwd)``
  with ``gather = h2d + all_gather(P, dp_group)`` (forward and backward: FSDP2 copies the
  host shard to the device, then all-gathers it), ``red = reduce_scatter(P * reduce_factor,
  dp_group) + d2h`` (the reduced shard copied back to the host) and ``h2d = d2h = Ps /
  host_link_bandwidth``, ``Ps = num_params / dp * master_bytes`` the host shard; with
  ``c > 1`` the copy-out is charged whole, ``(1 - rho) red + max(0, rho red - bwd)`` with
  ``red = reduce_scatter(...)`` only, ``+ d2h``: a gradient shard that accumulates into the
  host gradient of an earlier micro-batch is copied synchronously (torch 2.13's
  ``foreach_reduce``), exact for all micro-batches but the first (the CPU add that follows it
  is not charged). ``G``: the
  CPU optimizer step ``num_params / dp * devices_per_node * optimizer_time_per_param`` (the
  node's ranks step at once on its shared CPUs; nothing of the step is on the device).
  Device memory ``M``: activations only (the gathered parameters and gradients are
  transient, as FSDP's with ``c == 1``). Host memory ``Mh[u,k] = (2 P + O) / dp`` per rank
  (master parameters, gradients, AdamW moments); per node, the host bytes of all its ranks,
  ``sum_i n[node, i] * sum_{u on i} Mh[u, k_u]`` with ``n[node, i]`` the ranks of stage ``i``
  on that node (:attr:`CostTables.host_ranks`), within ``host_memory * memory_fraction``
  (:attr:`CostTables.host_limit_bytes`). Offered only on a cluster that declares host
  memory.
- ``F[u,k] = min(H[u,k], B[u,k])`` once per stage (its largest), see below.
- Precision (``Precision(param_dtype, reduce_dtype, master_dtype)``, see
  :mod:`uniap.precision`): compute at ``param_dtype``'s peak, activations, TP all-reduces,
  pipeline sends and FSDP all-gathers (``P``) at ``param_dtype``; gradient reductions
  (FSDP reduce-scatter, DDP / ``replicate`` all-reduce) at ``reduce_dtype``: ``P *
  reduce_bytes / param_bytes``; per parameter ``2 P + O = 4 * master_bytes`` (master copy,
  its gradient, two AdamW moments; bf16-mixed: 2 * 2 + 12 = 16 bytes). The weights of
  classic-DDP and ``dp == 1`` layers stay plain master tensors, cast by autocast in each
  forward; autograd saves that ``param_dtype`` copy for backward, so such a layer (without
  recompute) holds ``P`` more per micro-batch in flight, next to its activations.
- ``M[u,k,i]`` bytes per device on stage ``i``: DDP ``2 P + O``; FSDP ``(2 P + O) / dp`` when
  ``c == 1``, ``2 P + (2 P + O) / dp`` when ``c > 1`` (unsharded parameters and gradients live
  across micro-batches, next to the shards); ZeRO2 ``P + (2 P + O) / dp`` for every ``c`` and
  schedule (the whole parameters, gathered in the first forward, stay until the last
  backward; the gradients are reduce-scattered after each micro-batch's backward into the
  sharded ones, the layer's whole gradient living only between its backward and that
  reduce-scatter, transient as FSDP's gathers); plus activations
  ``profile.activation_bytes(layer, bl, tp) * inflight(i)`` (analytic:
  ``saved_bytes * bl * (f / tp + 1 - f)``; with recompute: ``input_bytes * bl * inflight(i)``, and
  backward pays one more forward) with ``f`` the layer's TP-sharded fraction and ``inflight`` = 1
  for ``pp = 1``, ``c`` for GPipe, ``min(c, pp - i)`` for 1F1B, for interleaved 1F1B the most
  micro-batches virtual stage ``i`` holds in torch's order (:mod:`uniap.schedules`). The last
  layer also holds the loss's copy of its output for the other in-flight micro-batches and the
  loss's working memory for the one in backward:
  ``out_bytes * bl * (inflight(i) - 1) + loss_working_bytes(bl, tp)`` (analytic:
  ``2 out_bytes bl``, the output and its gradient), the copy ``/ tp`` for a
  vocabulary-parallel head at ``tp > 1`` and the working memory ``(2 + 1) out_bytes bl / tp``
  (loss parallel's shifted logits too, :func:`uniap.profiles.analytic.loss_parallel_bytes`).
- Free parameters (``Layer.free_params``: outside every layer, charged on the first; tied to a
  later layer, charged on their first owner; with ``pp > 1`` also ``Layer.tied_copy_params``,
  the copy a later layer's stage holds, charged on every later holder: holders that share a
  stage are charged a copy each where the executor keeps one, an over-count only for weights
  shared by layers that can sit on one stage, never for a tied embedding and LM head, the
  chain's first and last layers, which ``pp > 1`` always separates): the executor keeps them
  out of every data-parallel wrapper (:class:`uniap.executor.model_forward.FreeParamSync`), so
  whatever the layer's kind they take ``2 P + O`` whole on each rank (and, under mixed
  precision without recompute, the ``P`` autocast copy per micro-batch in flight), an
  all-reduce of their gradient over the layer's dp group after the last backward (in ``G``,
  not hidden) and an optimizer step on the device; the kind's formulas above apply to the
  rest of the layer's parameters.
- Vocabulary parallelism (``Layer.tp_vocab``, embedding and head layers at ``tp > 1``; the
  executor's :mod:`uniap.executor.tensor_parallel` and :mod:`uniap.executor.vocab_loss`, as
  torchtitan's ``RowwiseParallel`` embedding and ``ColwiseParallel`` output with loss
  parallel). Per micro-batch on the TP group, ``a = allreduce_bytes_per_sample * bl``:
  embedding ``all_reduce(a)`` forward (the partial lookups of its ``V / tp`` rows, ``a`` = its
  output ``[bl, s, h]``), nothing backward (token ids have no gradient); head nothing
  forward (the logits stay sharded, ``Shard(-1)``) and ``all_reduce(a)`` backward (the
  gradient of its input ``[bl, s, h]``, replicated, summed over the vocabulary shards);
  both not added when ``profile.tp_comm_in_compute`` (the layer was timed at that tp). Loss
  parallel (torch's ``loss_parallel()``: ``log_softmax`` all-reduces the max and the sum of
  exponentials of each row, ``nll_loss`` the target logit; its backward is local):
  ``+ 3 * all_reduce(4 * rows_per_sample * bl)`` on the head (``rows_per_sample``: logit rows,
  tokens, per sample, fp32), not added when ``profile.tp_comm_in_compute`` (a measured
  profile times the loss at that tp under ``loss_parallel()``). The loss's compute
  ``loss_s(bl, tp)`` and working memory ``loss_working_bytes(bl, tp)`` are the profile's at
  that tp (analytic: the logits and their gradient, and loss parallel's shifted logits, each
  ``V / tp`` wide; measured: at that tp, else the tp = 1 numbers ``/ tp``, the working
  memory with one more logits-shaped temporary: ``(w1 + out_bytes bl) / tp``), the loss's
  copy of the output ``/ tp``: each rank holds ``V / tp`` of the logits, their log-softmax and
  gradient. The head's own saved activations (its replicated input) do not shrink. Measured
  on CPU (GPT, vocabulary 1024, tp = 2, ``tests/dist/test_vocab_parallel.py``): tp = 1's loss
  held 3.03 logits, tp = 2's 2.01, what that rule gives (2.02; ``/ tp`` alone gave 1.52).
- ``R[u,a,b]`` resharding the output of ``u`` from layout ``a`` (its dp) to layout ``b`` on the
  same stage: 0 if equal dp, else ``all_gather(out_bytes * b / min(dp), group of max/min)``
  (a chain, as the executor runs a declared one). A model that runs its own forward (not a
  declared chain, ``pp = 1``) keeps every value between its layers in the first layer's
  layout, the *base* (``base_tp``), and reshards around each layer in another layout
  (:class:`uniap.executor.model_forward.LayoutAdapter`): ``R[u,a,b]`` is then 0 when ``b`` is
  the base, else two such all-gathers (layer ``u + 1``'s inputs in, its outputs back) plus
  the world all-gather of an 8-byte signature the adapter makes on every call. The base is
  one layer's choice that prices every other's, so the planner solves one case per base
  TP degree (:func:`uniap.planner.layout_cases`).
- ``Rp[u,a,b]`` the edge leaving a stage after ``u``: ``2 * p2p(out_bytes * b / dp_a)``
  (activation forward, its gradient backward) ``+ R[u,a,b]``.

Sequence parallelism (``k`` with ``sp``, ``tp > 1``; Megatron-SP, Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", section 4.2.2; as run by
:mod:`uniap.executor.sequence_parallel`, whose layer boundary stays replicated):

- TP communication in ``A``, per pair with distinct column-wise inputs of ``in_j`` bytes and a
  row-wise output of ``out`` bytes per sample (``in`` and ``out`` below are the layer's input
  and output bytes per sample), at local batch ``bl`` on the TP group:
  ``sum_pairs [(1 + recompute) * (sum_j all_gather(in_j bl) + reduce_scatter(out bl))
  + sum_j reduce_scatter(in_j bl) + all_gather(out bl)]`` (forward: gather the region's input,
  reduce-scatter the row-wise output; backward the reverse; a recomputed forward repeats its
  pairs' collectives) ``+ all_gather(out_layer bl) + all_gather(in_layer bl)`` (the boundary:
  the output gathered forward, the input's gradient gathered backward; cutting the input's
  chunk is local). On a ring, ``all_gather + reduce_scatter`` of a tensor costs one
  ``all_reduce`` of it, so SP pays its TP twin's time plus the two boundary gathers. With a
  measured profile (TP times include TP's all-reduces) SP adds the difference of the two
  modelled terms. The norm weights' gradients, which SP computes on sequence chunks, are
  summed over TP: ``sum_params all_reduce(bytes * reduce_bytes / param_bytes)`` on the TP
  group (:attr:`uniap.graph.Layer.sp_replicated_param_bytes`), in ``A`` when ``dp == 1``
  (after every micro-batch's backward) or the layer reduces every micro-batch (ZeRO2), else
  once per iteration in ``G``, not hidden (FSDP2 / ``replicate`` sum them before reducing).
- Activations: ``saved_bytes * bl * ((f + f_sp) / tp + 1 - f - f_sp)``, ``f_sp`` the layer's
  share of saved bytes outside its pairs (norm inputs and statistics, the residual stream's
  ops: :attr:`uniap.graph.Layer.sp_saved_fraction`), which SP computes on ``1 / tp`` of the
  sequence; the gathered inputs of the column-wise Linears stay whole (as in TP). A measured
  profile measures this (the profiler runs the layer sequence parallel and counts its saved
  bytes); an older one subtracts ``saved_bytes * bl * f_sp * (1 - 1 / tp)`` from its TP bytes.
  With recompute: ``in_bytes * bl / tp``, the checkpoint keeps the input's chunk.

What is hidden behind what (``rho``, the profile's overlap coefficient, is the fraction of a
collective that runs concurrently with compute; the executor arranges exactly these overlaps,
see :mod:`uniap.executor.data_parallel`). Each stage is one FSDP2 root over its FSDP /
``replicate`` layers, so:

- FSDP, ``c == 1``: the forward all-gather of layer ``u + 1`` is issued while layer ``u``
  computes (forward prefetch) and the backward all-gather of layer ``u - 1`` while layer
  ``u``'s backward computes (explicit backward prefetch): ``(1 - rho)`` of both is exposed,
  in ``A``. The reduce-scatter of layer ``u`` runs during the backward of the layers before
  it: exposed as below, in ``G`` and ``F``.
- FSDP, ``c > 1``: the one all-gather, in the first micro-batch's forward, is charged whole
  in ``G`` (conservative: prefetch hides all but the first layer's behind that forward, but
  the first micro-batch also pays the pipeline's warm-up, which the formula does not
  separate); the reduce-scatter during the last micro-batch's backward, exposed as below.
- FSDP-offload: as FSDP with ``c == 1`` in every micro-batch: each gather (the host-to-device
  copy of the shard, then the all-gather, both issued on FSDP2's all-gather streams and
  prefetched like FSDP's) is ``(1 - rho)`` exposed, and each reduce-scatter with the
  device-to-host copy of its result (on the reduce-scatter stream) is exposed as ZeRO2's
  (below). The CPU optimizer step waits for the last copies and overlaps with nothing.
- ZeRO2: the all-gather as FSDP's (``c == 1``: forward prefetch, ``(1 - rho)`` exposed, in
  ``A``; ``c > 1``: whole, in ``G``), none in backward; each micro-batch's reduce-scatter
  during that backward, exposed as below, in ``A`` (the stage-first part ``F`` once, in ``s_i``:
  in the other micro-batches the next one's work follows it).
- DDP (classic buckets, and ``replicate``): the all-reduce during the last micro-batch's
  backward. With ``pp > 1`` the stage reduces during its last backward too (not after the
  schedule, as torch's pipelining would for an FSDP root).
- TP all-reduces and reshards are on the critical path: never hidden.

Exposed gradient synchronisation. A layer's gradient collective of ``S`` seconds (DDP
all-reduce, FSDP reduce-scatter) starts when its backward is done and can only overlap with
the backward compute still to come on its stage, i.e. of the layers *before* it (backward
runs last layer first); the collectives of a stage run one after another on one stream (the
FSDP2 reduce-scatter stream, DDP's reducer). ``(1 - rho) S`` is always exposed (contention);
the rest, ``H = rho S``, is hideable. With ``B_u`` layer u's backward compute (``bwd_s`` plus
recompute and the loss) and the stage's layers ``s..e``, the collectives end
``X = max_v (H_v + sum_{s <= w < v} (H_w - B_w))`` after the backward (a serial stream with
release times; ``v = s``: the stage's first layer, with no backward after it). That depends on
the stage's composition and order, so the program charges the sound, order-free upper bound

``X <= sum_{u on i} max(0, H_u - B_u) + max_{u on i} min(H_u, B_u)``

(each term of the sum over ``w < v`` is at most ``max(0, H_w - B_w)``): per layer
``max(0, H - B)`` in ``G`` and per stage the largest ``F = min(H, B)``, through one continuous
variable per stage (:mod:`uniap.milp`). It is exact for a stage of identical layers, whether
the sync is shorter than the backward (then ``X = H``, the stage's first layer) or longer
(micro-batches of one or two samples: ``X = n (H - B) + B``). Classic DDP's buckets are
charged as the layers' shares (a bucket holding several small layers starts after the last
of them, which the per-layer release does not see).

Time per iteration of an assignment (stage ``i``: layers ``U_i``; edges ``e_i`` between stages):

``TPI = sum_i p_i + sum_i o_i + (c - 1) * max(max_i p_i, max_i o_i) + max_i s_i``,
``p_i = sum_{u in U_i} A[u,k_u] + sum_{u, u+1 in U_i} R[u, k_u, k_{u+1}]``,
``o_i = Rp[last(U_i), k, k']``, ``s_i = sum_{u in U_i} G[u,k_u] + max_{u in U_i} F[u,k_u]``.

Interleaved schedules (``v`` stages per rank, :mod:`uniap.schedules`; Narayanan et al.,
SC 2021): the chain is split into ``pp * v`` stages ``j``, stage ``j`` on rank ``r = j % pp``; a
rank's memory and synchronisation are those of all its stages (``s_r``: its layers' ``G`` and
its largest ``F``), and the bubble is paid in chunks ``v`` times smaller. No formula:
``TPI = max(L, c * max_r O_r) + max_r s_r + step`` with ``L`` the longest path through
torch's order of operations (:func:`uniap.schedules.schedule_makespan`; every operation starts
when its rank is free and its input has arrived, a link's time half forward, half back), each
stage's forward ``f_j`` and backward ``p_j - f_j`` split as zero bubble's below (``Aw = 0``),
``O_r = sum_{j on r} o_j``. With equal stages it is the paper's ``(c v + pp - 1)`` chunk
times, a bubble of ``(pp - 1) / (v c)`` of the ideal time; the closed form over each rank's
summed chunks, ``(sum_j p_j + sum_j o_j) / v + (c - 1 / v) max_r P_r + max_r s_r``, which
the cost model used before, is optimistic where a rank's chunks differ, and the planner, which
balances those sums, picked just such plans: their longest paths were 1.27-1.33x that
formula's time for Llama-7B at pp = 4 and 8 (``benchmarks/interleaved_fidelity.py``). The
stage edges use the slowest link between neighbouring ranks, the last rank's to the first
included.

Zero-bubble schedules (``InterleavedZeroBubble``, :mod:`uniap.schedules`): the same stages,
each layer's ``A`` split into forward ``Af`` (compute and half of its TP collectives), weight
gradient ``Aw`` (``Profile.weight_grad_s``: measured, or the backward's FLOP share of the
parameter products) and input gradient ``A - Af - Aw``; per stage ``f_j``, ``b_j``, ``w_j``
(a stage's reshards and overhead split evenly between ``f_j`` and ``b_j``,
:func:`stage_op_times`), timed as interleaved 1F1B above, by the longest path
through its own order (:func:`uniap.schedules.schedule_makespan`). Only strategies without
recompute and without reductions in autograd's hooks are offered
(:attr:`uniap.schedules.ScheduleSpec.data_parallel`, ``after_step_kinds``): ``dp = 1``; plain
replicas (DDP at ``tp = 1``) whose gradient the executor all-reduces after the step, charged
whole in ``G``; or FSDP at ``tp = 1`` as torch's schedule runs it (gradient sync off in every
backward, one reduce-scatter after the stage's last weight gradient): ``G = ag + rs``, the
reduce-scatter whole (no ``rho``), the memory of FSDP with ``c > 1`` (parameters and
gradients whole next to the shards: ``2 P + (2 P + O) / dp``).
In flight on stage ``j``: the micro-batches between their forward and their weight gradient.

All communication times are taken on the slowest group of that shape over all stages (the
collective waits for it). Everything is a pure function of its inputs: no process group.

One module: the formulas above, the tables they fill and the evaluation of a plan are one
concept (what a plan costs); the module docstring is most of its length.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from uniap.cluster import Cluster
from uniap.contract import DDP_BUCKET_BYTES, DEVICE_KINDS, KINDS, OFFLOAD, Plan, Strategy
from uniap.errors import ConfigError
from uniap.graph import Layer, ModelGraph
from uniap.precision import DTYPE_BYTES, Precision, precision_for_dtype
from uniap.profiles import AnalyticProfile, Profile
from uniap.profiles.analytic import loss_tp_share
from uniap.schedules import get_schedule, schedule_makespan
from uniap.strategies import layer_strategies, stage_strategies, why_not

__all__ = [
    "FIT_SLACK",
    "CostTables",
    "Evaluation",
    "CostModel",
    "LayerCost",
    "evaluate_assignment",
    "optimizer_bytes_per_param",
]

INF = float("inf")


def optimizer_bytes_per_param(dtype: str) -> int:
    """AdamW state bytes per parameter: two fp32 moments, plus an fp32 master copy when the
    parameters are in a 16-bit dtype."""
    return 8 + (4 if dtype in ("bfloat16", "float16") else 0)


@dataclass
class CostTables:
    """Coefficients of the program for one ``(pp, c, schedule)``.

    ``K`` strategies are shared by all layers; ``allowed[u]`` lists those layer ``u`` may use
    (others have ``A = inf``). ``layout[u, k]`` is the activation layout class of strategy ``k``
    (its dp); resharding costs are indexed by layout classes.
    """

    pp: int
    num_microbatches: int
    A: np.ndarray
    """(L, K) seconds per micro-batch."""
    G: np.ndarray
    """(L, K) seconds once per iteration."""
    M: np.ndarray
    """(L, K, num_stages) bytes per device of the layer on each (virtual) stage."""
    layout: np.ndarray
    """(L, K) int layout class."""
    R: np.ndarray
    """(L - 1, C, C) seconds, same-stage reshard after layer u."""
    Rp: np.ndarray
    """(L - 1, C, C) seconds, stage-boundary edge after layer u."""
    memory_limit_bytes: float
    allowed: list[list[int]]
    strategies: list[Strategy] = field(default_factory=list)
    schedule: str = "1F1B"
    microbatch_size: int = 1
    breakdown: dict[str, np.ndarray] = field(default_factory=dict)
    """Optional (L, K) parts of ``A`` and ``G`` for explanations (``compute`` and its ``forward``,
    ``tp_comm``, ``fsdp_comm``, ``dp_sync``, ``optimizer``) and of ``M``'s static bytes
    (``param_bytes``, ``grad_bytes``, ``optimizer_bytes``; the rest of ``M`` is activations)."""
    stage_overhead_s: float = 0.0
    """Seconds every stage pays per micro-batch whatever its layers (the pipeline schedule's
    own work and waits), added to every ``p_i``."""
    step_overhead_s: float = 0.0
    """Seconds every iteration pays once whatever the plan (the loss's all-reduce)."""
    F: np.ndarray | None = None
    """(L, K) seconds of the layer's hideable gradient sync that the backward compute after it
    may not cover (``min(H, B)``, see "Exposed gradient synchronisation" in the module
    docstring); the largest on a stage is added to its ``s_i`` once. None: zeros."""
    Mh: np.ndarray | None = None
    """(L, K) host-memory bytes per rank (FSDP-offload's state); None: zeros."""
    host_limit_bytes: float = float("inf")
    """Host-memory bytes one node may hold (``host_memory * memory_fraction``)."""
    host_ranks: np.ndarray | None = None
    """(nodes, pp) ranks of stage i on each node, distinct rows only (the host constraint's
    coefficients); None: one node holding one rank of each stage."""

    virtual_stages: int = 1
    """Stages per rank ``v`` (interleaved schedules): the chain is split into ``pp * v``
    stages, stage ``j`` on rank ``j % pp``; 1 otherwise."""
    Af: np.ndarray | None = None
    """(L, K) seconds of ``A`` in the forward (compute and half of the TP collectives), for
    schedules that split the backward (zero bubble); None: zeros."""
    Aw: np.ndarray | None = None
    """(L, K) seconds of ``A`` that compute weight gradients (the W of a zero-bubble
    schedule; ``A - Af - Aw`` is the input gradient B); None: zeros."""

    def __post_init__(self) -> None:
        if self.virtual_stages > 1 and not get_schedule(self.schedule).interleaved:
            raise ValueError(
                f"{self.virtual_stages} stages per rank need an interleaved schedule, not "
                f"{self.schedule!r}"
            )
        if self.longest_path:
            if self.Af is None:
                self.Af = np.zeros(np.shape(self.A))
            if self.Aw is None:
                self.Aw = np.zeros(np.shape(self.A))
        if self.F is None:
            self.F = np.zeros(np.shape(self.A))
        if self.Mh is None:
            self.Mh = np.zeros(np.shape(self.A))
        if self.host_ranks is None:
            self.host_ranks = np.ones((1, self.pp))

    @property
    def zero_bubble(self) -> bool:
        """Whether the schedule splits the backward into B and W."""
        return get_schedule(self.schedule).split_backward

    @property
    def longest_path(self) -> bool:
        """Whether the schedule's time is the longest path through its operations
        (:func:`uniap.schedules.schedule_makespan`): the interleaved ones."""
        return get_schedule(self.schedule).longest_path

    @property
    def uses_host_memory(self) -> bool:
        """Whether some strategy holds state in host memory (the host constraint matters)."""
        return bool(np.any(self.Mh > 0))

    @property
    def num_stages(self) -> int:
        """Stages of the chain: ``pp * v``."""
        return self.pp * self.virtual_stages

    @property
    def num_layers(self) -> int:
        return self.A.shape[0]

    @property
    def num_strategies(self) -> int:
        return self.A.shape[1]

    @property
    def num_layouts(self) -> int:
        return (
            self.R.shape[1] if self.R.ndim == 3 and self.R.shape[0] else int(self.layout.max()) + 1
        )

    def allowed_mask(self) -> np.ndarray:
        """``(L, K)`` booleans: layer u may use strategy k."""
        mask = np.zeros((self.num_layers, self.num_strategies), dtype=bool)
        # one scatter, not one per layer: 0.36 -> 0.12 ms on 131 layers, asked ~100 times a plan
        lens = [len(ks) for ks in self.allowed]
        rows = np.repeat(np.arange(len(lens)), lens)
        cols = np.fromiter(itertools.chain.from_iterable(self.allowed), np.int64, sum(lens))
        mask[rows, cols] = True
        return mask

    def minima(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each layer's smallest ``A`` and ``G`` over its allowed strategies, ``(L,)``, and its
        smallest memory per stage, ``(L, num_stages)``."""
        mask = self.allowed_mask()
        amin = np.where(mask, self.A, np.inf).min(axis=1)
        gmin = np.where(mask, self.G, np.inf).min(axis=1)
        mmin = np.where(mask[:, :, None], self.M, np.inf).min(axis=1)
        return amin, gmin, mmin


@dataclass(frozen=True)
class LayerCost:
    """One layer with one strategy: its entries of the cost tables."""

    PARTS = (
        "compute",
        "tp_comm",
        "fsdp_comm",
        "dp_sync",
        "optimizer",
        "forward",
        "weight_grad",
        "param_bytes",
        "grad_bytes",
        "optimizer_bytes",
    )

    per_microbatch_s: float
    """``A``: forward, backward (and recompute), TP collectives, exposed FSDP gathers."""
    per_iteration_s: float
    """``G``: exposed gradient synchronisation and the optimizer step."""
    memory_bytes: tuple[float, ...]
    """``M`` on each stage: parameters, gradients, optimizer state, activations in flight."""
    parts: dict[str, float]
    """The terms of ``A`` and ``G`` by name, the forward part of compute, and the static memory
    by kind (parameters, gradients, optimizer state; ``M``'s other part is activations), for
    explanations (:attr:`PARTS`)."""
    first_exposed_s: float = 0.0
    """``F``: the part of the hideable gradient sync that the layer's own backward covers, and
    that is exposed when the layer is the one the stage's largest ``F`` belongs to."""
    host_bytes: float = 0.0
    """``Mh``: bytes the layer keeps in host memory per rank (FSDP-offload)."""


@dataclass
class Evaluation:
    """The cost model's verdict on one assignment."""

    time_per_iteration_s: float
    stage_time_s: list[float]
    link_time_s: list[float]
    sync_time_s: list[float]
    peak_memory_bytes: list[float]
    fits: bool
    host_memory_bytes: list[float] = field(default_factory=list)
    """Host bytes per rank of each stage (FSDP-offload's state)."""
    host_node_bytes: float = 0.0
    """Host bytes of the fullest node (what :attr:`CostTables.host_limit_bytes` bounds)."""


FIT_SLACK = 1e-9
"""An assignment fits when each stage's memory (and each node's host memory) is at most its
limit times ``1 + FIT_SLACK``: rounding in the sums, not room to spare."""


def evaluate_assignment(
    t: CostTables, stage_of: Sequence[int], strategy_of: Sequence[int]
) -> Evaluation:
    """TPI and per-rank memory of an assignment (see the module docstring for the formula).

    ``stage_of[u]`` must be non-decreasing from 0 to ``num_stages - 1`` in steps of at most
    one; a strategy a layer may not use gives an infinite time. With ``v`` stages per rank
    (interleaved schedules) stage ``j`` runs on rank ``j % pp``: ``stage_time_s`` and
    ``link_time_s`` are per (virtual) stage, ``sync_time_s`` and ``peak_memory_bytes`` per
    rank.
    """
    L, pp, c, v = t.num_layers, t.pp, t.num_microbatches, t.virtual_stages
    V = pp * v
    # The sums of this per-layer loop, by numpy (0.35 -> 0.14 ms on 131 layers; called for
    # every start and local-search step), in its order, so with the same rounding:
    #     for u in order: p[i] += A[u, k]; then p[i] += R[u, a, b] (next layer on stage i)
    #     or o[i] += Rp[u, a, b] (next on stage i + 1); s[r] += G; mem[r] += M; host[r] += Mh
    # (np.bincount adds its weights in the order given); a layer whose strategy it may not
    # use adds nothing and makes its stage's time infinite.
    i_of = np.asarray(stage_of, dtype=np.int64)
    k_of = np.asarray(strategy_of, dtype=np.int64)
    if len(i_of) != L or len(k_of) != L:
        raise ValueError(f"an assignment of {L} layers needs {L} stages and strategies")
    if L and (i_of.min() < 0 or i_of.max() >= V):
        raise ValueError(f"stage_of must lie in 0..{V - 1}")
    ks = k_of.tolist()
    ok = np.fromiter((k in allowed for k, allowed in zip(ks, t.allowed)), bool, L)
    us = np.arange(L)
    k_safe = np.where((k_of >= 0) & (k_of < t.num_strategies), k_of, 0)
    r_of = i_of % pp
    a = np.where(ok, t.A[us, k_safe], 0.0)
    lay = t.layout[us, k_safe]
    weights = np.zeros(2 * L)
    bins = np.empty(2 * L, dtype=np.int64)
    weights[0::2], bins[0::2] = a, i_of
    if L > 1:
        same = i_of[1:] == i_of[:-1]
        edge = np.where(same, t.R[us[:-1], lay[:-1], lay[1:]], t.Rp[us[:-1], lay[:-1], lay[1:]])
        weights[1:-1:2] = np.where(ok[:-1], edge, 0.0)
        bins[1:-1:2] = np.where(same, i_of[:-1], V + i_of[:-1])
    weights, bins = weights[:-1], bins[:-1]  # the last layer has no edge
    sums = np.bincount(bins, weights, minlength=2 * V)
    p = sums[:V].tolist()
    o = sums[V : 2 * V - 1].tolist()
    if not ok.all():
        for i in set(i_of[~ok].tolist()):
            p[i] = INF
    s = np.bincount(r_of, np.where(ok, t.G[us, k_safe], 0.0), minlength=pp).tolist()
    mem = np.bincount(r_of, np.where(ok, t.M[us, k_safe, i_of], 0.0), minlength=pp).tolist()
    host = np.bincount(r_of, np.where(ok, t.Mh[us, k_safe], 0.0), minlength=pp).tolist()
    first_np = np.zeros(pp)  # the rank's largest F: the sync nothing after it hides
    np.maximum.at(first_np, r_of, np.where(ok, t.F[us, k_safe], 0.0))
    first = first_np.tolist()
    p = [x + t.stage_overhead_s for x in p]
    s = [x + f for x, f in zip(s, first)]
    if t.longest_path:
        tpi = _longest_path_time(t, stage_of, strategy_of, p, o) + max(s) + t.step_overhead_s
    else:
        bottleneck = max(p + o)
        tpi = sum(p) + sum(o) + (c - 1) * bottleneck + max(s) + t.step_overhead_s
    fits = all(m <= t.memory_limit_bytes * (1 + FIT_SLACK) for m in mem)
    node = float((t.host_ranks @ np.asarray(host)).max())
    fits = fits and node <= t.host_limit_bytes * (1 + FIT_SLACK)
    return Evaluation(tpi, p, o, s, mem, fits, host, node)


def stage_op_times(
    t: CostTables, stage_of: Sequence[int], strategy_of: Sequence[int], p: Sequence[float]
) -> tuple[list[float], list[float], list[float]]:
    """Per stage ``(f, b, w)``: seconds of one micro-batch's forward, input gradient and weight
    gradient (a schedule that does not split the backward: ``w = 0``, ``b`` the backward); ``p``
    the stage times (``f + b + w``). A stage's same-stage reshards and overhead are split evenly
    between its forward and its input gradient."""
    f = [0.0] * len(p)
    w = [0.0] * len(p)
    for u, (i, k) in enumerate(zip(stage_of, strategy_of)):
        f[i] += float(t.Af[u, k])
        w[i] += float(t.Aw[u, k])
    rest = [x - a - c for x, a, c in zip(p, f, w)]  # reshards, overhead, input gradient
    shared = [t.stage_overhead_s] * len(p)
    for u in range(len(stage_of) - 1):
        if stage_of[u + 1] == stage_of[u]:
            a, b = t.layout[u, strategy_of[u]], t.layout[u + 1, strategy_of[u + 1]]
            shared[stage_of[u]] += float(t.R[u, a, b])
    f = [x + h / 2 for x, h in zip(f, shared)]
    b = [r - h / 2 for r, h in zip(rest, shared)]
    return f, b, w


def _longest_path_time(
    t: CostTables,
    stage_of: Sequence[int],
    strategy_of: Sequence[int],
    p: Sequence[float],
    o: Sequence[float],
) -> float:
    """An interleaved schedule's compute time: the longest path through torch's order of
    operations with these stage times, at least ``c`` times the busiest rank's links."""
    if any(not np.isfinite(x) for x in p):
        return INF
    f, b, w = stage_op_times(t, stage_of, strategy_of, p)
    pp, c, v = t.pp, t.num_microbatches, t.virtual_stages
    links = max((sum(o[r::pp]) for r in range(pp)), default=0.0)
    return max(schedule_makespan(t.schedule, pp, v, c, f, b, w, o), c * links)


class CostModel:
    """Turns a model graph, a cluster and a profile into :class:`CostTables`; evaluates plans."""

    def __init__(
        self,
        graph: ModelGraph,
        cluster: Cluster,
        profile: Profile | None = None,
        *,
        memory_fraction: float = 0.9,
        max_tp: int | None = None,
        recompute: bool = True,
        precision: Precision | None = None,
        kinds: Sequence[str] | None = None,
        sequence_parallel: bool = False,
        layer_tp: Mapping[str, Collection[int]] | None = None,
        base_tp: int | None = None,
    ) -> None:
        """``memory_fraction`` of device memory is usable (the rest: allocator, workspace);
        ``max_tp`` caps the TP degree (default: devices per node, so TP stays intra-node);
        ``recompute`` offers activation checkpointing per layer; ``precision`` (default:
        :func:`~uniap.precision.precision_for_dtype` of the graph's dtype, which must be its
        ``param_dtype``) sets the gradient-reduction and per-parameter state bytes; ``kinds``:
        the data-parallel kinds offered (default all of :data:`uniap.contract.KINDS` on a
        cluster that declares host memory, else all but ``FSDP-offload``; a layer with
        ``dp == 1`` is always ``DDP``); ``sequence_parallel`` offers an sp variant of each
        ``tp > 1`` strategy (off by default, see :mod:`uniap.strategies`); ``layer_tp``: the TP
        degrees some layers (by FQN) are restricted to (the planner's layout cases, see
        :mod:`uniap.planner`). ``base_tp``: for a model that runs its own forward (not a declared
        chain), the first layer's TP degree at ``pp = 1``, whose layout is the base every
        other layout reshards from and back to (see ``R`` in the module docstring); the first
        layer is held to it. Host memory: each node may hold ``memory_fraction`` of its host
        memory."""
        if not 0 < memory_fraction <= 1:
            raise ConfigError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        self.graph = graph
        self.cluster = cluster
        self.profile = (
            profile if profile is not None else AnalyticProfile(cluster, dtype=graph.dtype)
        )
        self.profile.check_compatible(graph, cluster)
        self.memory_limit_bytes = cluster.device_memory_bytes * memory_fraction
        self.max_tp = max_tp if max_tp is not None else cluster.devices_per_node
        self.precision = precision if precision is not None else precision_for_dtype(graph.dtype)
        if self.precision.param_dtype != graph.dtype:
            raise ConfigError(
                f"precision {self.precision.name} computes in {self.precision.param_dtype} but the "
                f"model graph is in {graph.dtype}; build the graph with "
                f"dtype={self.precision.param_dtype}"
            )
        # per parameter: master copy + its gradient + two AdamW moments, all in master_dtype,
        # written as 2 P + O with P the bytes at param_dtype (see the module docstring)
        master = DTYPE_BYTES[self.precision.master_dtype]
        self.master_bytes = master
        self.opt_bytes = 4 * master - 2 * self.precision.param_bytes
        # gradients are reduced in reduce_dtype: bytes per parameter relative to P
        self.reduce_factor = self.precision.reduce_bytes / self.precision.param_bytes
        self.recompute = recompute
        self.sequence_parallel = sequence_parallel
        self._group_times: dict[tuple, float] = {}
        self.layer_tp = {fqn: frozenset(tps) for fqn, tps in (layer_tp or {}).items()}
        unknown = sorted(set(self.layer_tp) - {layer.fqn for layer in graph.layers})
        self.base_tp = base_tp if self.runs_own_forward else None
        if self.base_tp is not None:
            first = graph.layers[0].fqn
            self.layer_tp[first] = self.layer_tp.get(first, frozenset({base_tp})) & {base_tp}
        if unknown:
            raise ConfigError(f"layer_tp names layers the model does not have: {unknown}")
        default = KINDS if cluster.offload_enabled else DEVICE_KINDS
        self.kinds = tuple(kinds) if kinds is not None else default
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"kinds {list(self.kinds)}: choose one or more of {list(KINDS)}")
        if OFFLOAD in self.kinds and not cluster.offload_enabled:
            raise ConfigError(
                f"kind {OFFLOAD} needs host memory, but cluster {cluster.name!r} declares none; "
                "add a host section to the cluster YAML (host: {memory: 880 GiB, "
                "link_bandwidth: 24 GB/s, optimizer_time_per_param: 1.4 ns}) or leave "
                f"{OFFLOAD} out of kinds"
            )
        self.host_limit_bytes = (
            cluster.host_memory_bytes * memory_fraction if cluster.offload_enabled else float("inf")
        )
        self._rep: list[int] | None = None

    @property
    def runs_own_forward(self) -> bool:
        """At ``pp = 1`` the executor runs the model's own forward, with every layer in another
        layout than the first's resharded in and out (a model that is not a declared chain;
        :func:`uniap.executor.parallel_model.runs_own_forward`)."""
        return self.graph.extra.get("pipeline_split", "chain") != "chain"

    # ------------------------------------------------------------------ groups
    @lru_cache(maxsize=4096)  # noqa: B019 - the model is immutable once built
    def _worst_group(self, op: str, group_kind: str, pp: int, a: int, b: int) -> tuple[int, ...]:
        """The slowest group of this shape over all stages (a collective waits for it)."""
        g = self.cluster.world_size // pp
        worst, worst_t = (), -1.0
        per_node = self.cluster.devices_per_node
        # a collective's time depends on its group's shape only (size, one node or several,
        # consecutive or strided: uniap.profiles.fits.group_shape_key), which the extremes of
        # a group of distinct ranks decide
        seen: set[tuple[int, bool, bool]] = set()
        for ranks in _groups(group_kind, g, pp, a, b):
            lo, hi = min(ranks[0], ranks[-1]), max(ranks[0], ranks[-1])
            shape = (len(ranks), lo // per_node == hi // per_node, hi - lo == len(ranks) - 1)
            if shape in seen:
                continue
            seen.add(shape)
            t = self.profile.collective_s(op, float(2**20), ranks)
            if t > worst_t:
                worst, worst_t = tuple(ranks), t
        return worst

    def _group_time(
        self, op: str, nbytes: float, group_kind: str, pp: int, a: int, b: int
    ) -> float:
        if nbytes <= 0:
            return 0.0
        key = (op, nbytes, group_kind, pp, a, b)
        if key not in self._group_times:  # the same collective recurs across layers and tables
            ranks = self._worst_group(op, group_kind, pp, a, b)
            self._group_times[key] = self.profile.collective_s(op, nbytes, ranks) if ranks else 0.0
        return self._group_times[key]

    # ------------------------------------------------------------------ tables
    def strategies(self, pp: int) -> list[Strategy]:
        """Strategies for a stage of this pipeline degree."""
        # a model split by tracing its forward runs its stages at tp = 1 (uniap.executor)
        traced = pp > 1 and self.graph.extra.get("pipeline_split") == "traced"
        return stage_strategies(
            self.cluster.world_size // pp,
            max_tp=1 if traced else self.max_tp,
            recompute=self.recompute,
            kinds=self.kinds,
            max_shard=self.cluster.devices_per_node,
            sequence_parallel=self.sequence_parallel,
        )

    def tables(
        self,
        pp: int,
        num_microbatches: int,
        global_batch_size: int,
        schedule: str = "1F1B",
        virtual_stages: int | None = None,
    ) -> CostTables:
        """Cost tables for ``(pp, c, schedule)``: one row per layer and strategy from
        :meth:`layer_cost`, resharding and stage-boundary rows from :meth:`_edge_rows`; see the
        module docstring for every formula. ``virtual_stages``: stages per rank ``v`` of an
        interleaved schedule (default: the schedule's first, :mod:`uniap.schedules`)."""
        n = self.cluster.world_size
        if n % pp:
            raise ConfigError(f"pipeline degree ({pp}) must divide the number of devices ({n})")
        spec = get_schedule(schedule)
        v = 1 if pp == 1 else (virtual_stages or spec.stages_per_rank[0])
        reason = spec.why_not(pp, v, num_microbatches) if pp > 1 else None
        if reason:
            raise ConfigError(reason)
        if pp * v > self.graph.num_layers:
            raise ConfigError(
                f"{schedule} with pp={pp} and {v} stages per rank needs at least {pp * v} layers, "
                f"the model has {self.graph.num_layers}"
            )
        if global_batch_size % num_microbatches:
            raise ConfigError(
                f"num_microbatches ({num_microbatches}) must divide global_batch_size "
                f"({global_batch_size})"
            )
        c, b = num_microbatches, global_batch_size // num_microbatches
        strategies = self.strategies(pp)
        layers = self.graph.layers
        L, K = len(layers), len(strategies)
        dps = sorted({s.dp for s in strategies})
        A = np.full((L, K), INF)
        G = np.zeros((L, K))
        F = np.zeros((L, K))
        M = np.zeros((L, K, pp * v))
        Mh = np.zeros((L, K))
        layout = np.tile([dps.index(s.dp) for s in strategies], (L, 1)).astype(np.int64)
        parts = {k: np.zeros((L, K)) for k in LayerCost.PARTS}
        inflight = [spec.inflight(i, pp, c, v) for i in range(pp * v)]
        allowed: list[list[int]] = []
        rep = self._representatives()
        for u, layer in enumerate(layers):
            if rep[u] != u:
                # the same inputs as an earlier layer (a run of identical blocks): its rows are
                # copied below, all at once
                allowed.append(list(allowed[rep[u]]))
                continue
            in_bytes = layers[u - 1].output_bytes_per_sample if u else 0.0
            ks = layer_strategies(layer, strategies, b, in_bytes)
            if layer.fqn in self.layer_tp:
                ks = [k for k in ks if strategies[k].tp in self.layer_tp[layer.fqn]]
            if not spec.data_parallel:  # (zero bubble: no DDP / FSDP wrappers, uniap.schedules)
                ks = [
                    k
                    for k in ks
                    if spec.runs_data_parallel(
                        strategies[k].dp, strategies[k].tp, strategies[k].kind
                    )
                ]
            if not spec.recompute:
                ks = [k for k in ks if not strategies[k].recompute]
            if not ks:
                raise ConfigError(
                    f"layer {layer.fqn!r} has no strategy for micro-batch size {b} on {n // pp} "
                    "devices per stage"
                    + (
                        ""
                        if spec.data_parallel and spec.recompute
                        else f" ({schedule} runs layers without recompute, with dp = 1, or at "
                        "tp = 1 with kind DDP (plain replicas) or FSDP)"
                    )
                )
            allowed.append(ks)
            for k in ks:
                cost = self.layer_cost(
                    u,
                    strategies[k],
                    pp=pp,
                    num_microbatches=c,
                    microbatch_size=b,
                    inflight=inflight,
                    after_step=not spec.data_parallel,
                )
                A[u, k], G[u, k], M[u, k], F[u, k], Mh[u, k] = (
                    cost.per_microbatch_s,
                    cost.per_iteration_s,
                    cost.memory_bytes,
                    cost.first_exposed_s,
                    cost.host_bytes,
                )
                for name in LayerCost.PARTS:
                    parts[name][u, k] = cost.parts[name]
        same = np.asarray(rep)
        A, G, M, F, Mh = A[same], G[same], M[same], F[same], Mh[same]
        parts = {name: part[same] for name, part in parts.items()}
        if pp == 1 and self.base_tp is not None:
            R, Rp = self._adapter_rows(b, dps, n // self.base_tp)
        else:
            R, Rp = self._edge_rows(pp, b, dps, v)
        return CostTables(
            pp=pp,
            num_microbatches=c,
            A=A,
            G=G,
            M=M,
            layout=layout,
            R=R,
            Rp=Rp,
            memory_limit_bytes=self.memory_limit_bytes,
            allowed=allowed,
            strategies=strategies,
            schedule=schedule,
            microbatch_size=b,
            breakdown=parts,
            stage_overhead_s=self.profile.pipeline_overhead_s if pp > 1 else 0.0,
            step_overhead_s=self.profile.collective_s("all_reduce", 8.0, list(range(n))),
            F=F,
            Mh=Mh,
            host_limit_bytes=self.host_limit_bytes,
            host_ranks=self._host_ranks(pp),
            virtual_stages=v,
            Af=parts["forward"] + parts["tp_comm"] / 2 if spec.longest_path else None,
            Aw=parts["weight_grad"] if spec.split_backward else None,
        )

    def _host_ranks(self, pp: int) -> np.ndarray:
        """(nodes, pp): ranks of stage i on each node, distinct rows (stages hold consecutive
        ranks, nodes too)."""
        n, per_node = self.cluster.world_size, self.cluster.devices_per_node
        g = n // pp
        counts = np.zeros((self.cluster.num_nodes, pp))
        for r in range(n):
            counts[r // per_node, r // g] += 1
        return np.unique(counts, axis=0)

    def layer_cost(
        self,
        u: int,
        s: Strategy,
        *,
        pp: int,
        num_microbatches: int,
        microbatch_size: int,
        inflight: Sequence[int],
        after_step: bool = False,
    ) -> LayerCost:
        """Layer ``u`` with strategy ``s`` on a stage of a ``pp``-stage plan: its ``A``, ``G`` and
        per-stage ``M`` entries (``inflight[i]``: micro-batches in flight on stage i) and their
        parts. See the module docstring for the formulas. ``after_step``: no reduction in
        autograd's hooks (zero bubble): a ``dp > 1`` DDP layer's gradient is all-reduced after
        the step, an FSDP layer's (``pp > 1``) reduce-scattered after the stage's last weight
        gradient, both whole."""
        layers = self.graph.layers
        layer, last = layers[u], u == len(layers) - 1
        in_bytes = layers[u - 1].output_bytes_per_sample if u else 0.0
        c, rho = num_microbatches, self.profile.overlap_coefficient
        bl = microbatch_size / s.dp
        fwd, bwd = self.profile.layer_compute_s(layer, bl, s.tp)
        # a vocabulary-parallel head: the loss runs on V / tp of the logits (loss parallel)
        vocab = layer.tp_vocab if s.tp > 1 else None
        loss_share = 1 / loss_tp_share(layer, s.tp)
        wgrad_s = self.profile.weight_grad_s(layer, bl, s.tp) if layer.num_params else 0.0
        if last:
            bwd += self.profile.loss_s(layer, bl, s.tp)
        if s.recompute:
            bwd += fwd
        tp_comm_s = 0.0
        if s.tp > 1 and (s.sp or not self.profile.tp_comm_in_compute):
            tp_comm_s = self._tp_comm_s(layer, in_bytes, bl, s, pp)
            if s.sp and self.profile.tp_comm_in_compute:  # measured with TP's all-reduces
                tp_comm_s -= self._tp_comm_s(
                    layer, in_bytes, bl, dataclasses.replace(s, sp=False), pp
                )
        if loss_share < 1 and not self.profile.tp_comm_in_compute:  # loss parallel: max, sum,
            tp_comm_s += 3 * self._group_time(  # the target logit
                "all_reduce", 4.0 * vocab.loss_rows_per_sample * bl, "tp", pp, s.dp, s.tp
            )
        # TP shards the layer's parameters but a replicated part (a position table); the free
        # parameters (outside every layer, tied; with stages also a tied copy) stay whole
        elem = self.precision.param_bytes  # bytes per element at the training dtype
        free = layer.free_params + (layer.tied_copy_params if pp > 1 else 0)
        free_bytes = free * elem if free else 0.0
        p_bytes = max(
            _tp_local(layer.param_bytes, layer.tp_param_fraction, s.tp) - layer.free_params * elem,
            0.0,
        )
        local_params = max(
            _tp_local(layer.num_params, layer.tp_param_fraction, s.tp) - layer.free_params, 0.0
        )
        opt_bytes = local_params * self.opt_bytes
        fsdp_per_microbatch_s = sync_s = wrap_s = host_bytes = 0.0
        hideable_s = 0.0  # the part of the last backward's gradient sync that may overlap
        wrapped = s.dp > 1 and local_params > 0
        if s.kind == "FSDP":
            ag = self._group_time("all_gather", p_bytes, "dp", pp, s.dp, s.tp)
            rs = self._group_time(
                "reduce_scatter", p_bytes * self.reduce_factor, "dp", pp, s.dp, s.tp
            )
            hideable_s = rho * rs
            zb = after_step and pp > 1  # torch's split-backward schedule runs the layer
            if c == 1 and not zb:
                fsdp_per_microbatch_s = (1 - rho) * 2 * ag
                if wrapped:
                    fsdp_per_microbatch_s = max(
                        fsdp_per_microbatch_s + self.profile.dp_residual_s(layer, "FSDP", "single"),
                        0.0,
                    )
                sync_s = (1 - rho) * rs
                static_bytes = (2 * p_bytes + opt_bytes) / s.dp
            else:
                sync_s = ag + (1 - rho) * rs
                if zb:  # reduce-scattered after the stage's last weight gradient, exposed
                    hideable_s, sync_s = 0.0, ag + rs
                if wrapped:
                    wrap_s = self.profile.dp_residual_s(layer, "FSDP", "microbatch")
                    sync_s += self.profile.dp_residual_s(layer, "FSDP", "sync")
                # unsharded parameters and gradients stay resident next to the shards
                static_bytes = 2 * p_bytes + (2 * p_bytes + opt_bytes) / s.dp
            local_params /= s.dp
        elif s.kind == "HSDP":
            # FSDP inside each shard group of `sh` consecutive ranks (tp == 1), the reduced
            # shard all-reduced across the dp / sh replicas (stride sh)
            sh, reps = s.shard_degree, s.dp // s.shard_degree
            ag = self._group_time("all_gather", p_bytes, "tp", pp, reps, sh)
            red = p_bytes * self.reduce_factor
            rs = self._group_time("reduce_scatter", red, "tp", pp, reps, sh)
            rs += self._group_time("all_reduce", red / sh, "dp", pp, reps, sh)
            hideable_s = rho * rs
            if c == 1:
                fsdp_per_microbatch_s = (1 - rho) * 2 * ag
                sync_s = (1 - rho) * rs
                static_bytes = (2 * p_bytes + opt_bytes) / sh
            else:
                sync_s = ag + (1 - rho) * rs
                static_bytes = 2 * p_bytes + (2 * p_bytes + opt_bytes) / sh
            local_params /= sh
        elif s.kind == OFFLOAD:
            # FSDP2 CPUOffloadPolicy: the host shard copied in and gathered twice, the gradient
            # reduce-scattered and copied out once, in every micro-batch
            host_bytes = (2 * p_bytes + opt_bytes) / s.dp
            shard_s = (
                layer.num_params
                / s.dp
                * self.master_bytes
                / self.cluster.host_link_bandwidth_bytes_per_s
            )
            ag = self._group_time("all_gather", p_bytes, "dp", pp, s.dp, s.tp)
            rs = self._group_time(
                "reduce_scatter", p_bytes * self.reduce_factor, "dp", pp, s.dp, s.tp
            )
            gather_s = shard_s + ag
            # the copy-out overlaps only when no earlier micro-batch's gradient is there to add
            # to (FSDP2 copies synchronously to accumulate): with c > 1 it is charged whole
            red_s, blocking_s = (rs + shard_s, 0.0) if c == 1 else (rs, shard_s)
            hideable_s = rho * red_s
            fsdp_per_microbatch_s = (1 - rho) * (2 * gather_s + red_s) + blocking_s
            fsdp_per_microbatch_s += max(hideable_s - bwd, 0.0)
            static_bytes = 0.0
            local_params /= s.dp
        elif s.kind == "ZeRO2":
            ag = self._group_time("all_gather", p_bytes, "dp", pp, s.dp, s.tp)
            rs = self._group_time(
                "reduce_scatter", p_bytes * self.reduce_factor, "dp", pp, s.dp, s.tp
            )
            # a reduce-scatter in every micro-batch's backward, exposed per micro-batch like
            # the last one's (the stage-first part F once: between micro-batches the next one's
            # work follows it)
            hideable_s = rho * rs
            fsdp_per_microbatch_s = (1 - rho) * rs + max(hideable_s - bwd, 0.0)
            if c == 1:  # the one all-gather, prefetched in the forward
                fsdp_per_microbatch_s += (1 - rho) * ag
            else:  # gathered in the first micro-batch's forward, charged whole (as FSDP)
                sync_s = ag
            # whole parameters from the first forward to the last backward, next to the shards
            static_bytes = p_bytes + (2 * p_bytes + opt_bytes) / s.dp
            local_params /= s.dp
        elif after_step:  # plain replicas: one all-reduce after the last weight gradient
            ar = self._group_time("all_reduce", p_bytes * self.reduce_factor, "dp", pp, s.dp, s.tp)
            sync_s = ar if s.dp > 1 else 0.0
            static_bytes = 2 * p_bytes + opt_bytes
        else:
            if s.uses_classic_ddp:  # the layer's share of DDP's full buckets
                bk = DDP_BUCKET_BYTES
                ar = (
                    p_bytes
                    * self.reduce_factor
                    / bk
                    * self._group_time("all_reduce", bk, "dp", pp, s.dp, s.tp)
                )
            else:
                ar = self._group_time(
                    "all_reduce", p_bytes * self.reduce_factor, "dp", pp, s.dp, s.tp
                )
            hideable_s = rho * ar
            sync_s = (1 - rho) * ar
            if wrapped:
                wrap_s = self.profile.dp_residual_s(layer, "DDP", "microbatch")
                sync_s += self.profile.dp_residual_s(layer, "DDP", "sync")
            static_bytes = 2 * p_bytes + opt_bytes
        # what the layer's own backward cannot cover is exposed; the stage's largest covered
        # part is exposed once more (its first layer has no backward after it): F
        if s.kind not in ("ZeRO2", OFFLOAD):  # (ZeRO2, offload: in every micro-batch, above)
            sync_s += max(hideable_s - bwd, 0.0)
        first_exposed_s = min(hideable_s, bwd)
        sync_s = max(sync_s, 0.0)
        if s.sp:
            # the norm weights' gradients, summed over TP (uniap.executor.sequence_parallel):
            # after each micro-batch's backward at dp = 1 (and where the gradients are reduced
            # in every micro-batch), else once by FSDP2 / replicate before their reduction
            norm_s = sum(
                self._group_time("all_reduce", nb * self.reduce_factor, "tp", pp, s.dp, s.tp)
                for nb in layer.sp_replicated_param_bytes
            )
            if s.dp == 1 or s.reduces_every_microbatch:
                tp_comm_s += norm_s
            else:
                sync_s += norm_s
        if free:
            # the free parameters: whole on every rank (master copy, gradient, optimizer state),
            # their gradient all-reduced over the layer's dp group after the last backward
            # (:class:`uniap.executor.model_forward.FreeParamSync`), stepped on the device
            static_bytes += 2 * free_bytes + free * self.opt_bytes
            if s.dp > 1:
                sync_s += self._group_time(
                    "all_reduce", free_bytes * self.reduce_factor, "dp", pp, s.dp, s.tp
                )
        if s.kind == OFFLOAD:  # on the node's CPUs, shared by its ranks
            opt_s = (
                local_params
                * self.cluster.devices_per_node
                * self.cluster.host_optimizer_s_per_param
            )
            if free:
                opt_s += self.profile.optimizer_step_s(free, layer)
        else:
            opt_s = self.profile.optimizer_step_s(
                local_params + free, layer, dtensor=s.dtensor_params
            )
        fsdp_per_microbatch_s = max(fsdp_per_microbatch_s + wrap_s, 0.0)
        act_bytes = self.activation_bytes(u, microbatch_size / s.dp, s.tp, s.sp, s.recompute)
        # static memory by kind: FSDP and ZeRO2 shard it; FSDP with c > 1 keeps parameters and
        # gradients unsharded too, ZeRO2 the parameters
        shard = s.shard_size if not s.offloaded else INF  # (offload: nothing on the device)
        resident_bytes = p_bytes if s.kind in ("FSDP", "HSDP") and c > 1 else 0.0
        whole_param_bytes = p_bytes if s.kind == "ZeRO2" else 0.0
        # mixed precision outside FSDP2 (classic DDP, dp == 1): autocast casts the master
        # weights in each forward and autograd saves the param_dtype copy for backward, one per
        # micro-batch in flight (with recompute the copy is made again in backward, transient)
        cast_bytes = p_bytes if self._autocast_copies(s) else 0.0
        if free and self.precision.mixed and not s.recompute:  # free ones: plain, under autocast
            cast_bytes += free_bytes
        memory = []
        for n_inflight in inflight:
            m = static_bytes + (act_bytes + cast_bytes) * n_inflight
            if last:
                # The loss keeps a copy of the model output (log-softmax) per in-flight
                # micro-batch; the one in backward needs its working memory.
                m += layer.output_bytes_per_sample * bl * (n_inflight - 1) * loss_share
                m += self.profile.loss_working_bytes(layer, bl, s.tp)
            memory.append(m)
        return LayerCost(
            per_microbatch_s=fwd + bwd + tp_comm_s + fsdp_per_microbatch_s,
            per_iteration_s=sync_s + opt_s,
            memory_bytes=tuple(memory),
            first_exposed_s=first_exposed_s,
            host_bytes=host_bytes,
            parts={
                "compute": fwd + bwd,
                "tp_comm": tp_comm_s,
                "fsdp_comm": fsdp_per_microbatch_s,
                "dp_sync": sync_s,
                "optimizer": opt_s,
                "forward": fwd,
                "weight_grad": wgrad_s,
                "param_bytes": resident_bytes + whole_param_bytes + p_bytes / shard + free_bytes,
                "grad_bytes": resident_bytes + p_bytes / shard + free_bytes,
                "optimizer_bytes": opt_bytes / shard + free * self.opt_bytes,
            },
        )

    def activation_bytes(
        self, u: int, local_batch: float, tp: int, sp: bool = False, recompute: bool = False
    ) -> float:
        """Bytes layer ``u`` keeps for backward per micro-batch at ``local_batch`` samples:
        the profile's activation bytes, or with ``recompute`` the layer's input (the previous
        layer's output), of which sequence parallelism keeps ``1 / tp``."""
        if recompute:
            in_bytes = self.graph.layers[u - 1].output_bytes_per_sample if u else 0.0
            return in_bytes * local_batch / (tp if sp else 1)
        return self.profile.activation_bytes(self.graph.layers[u], local_batch, tp, sp=sp)

    def _tp_comm_s(self, layer: Layer, in_bytes: float, bl: float, s: Strategy, pp: int) -> float:
        """Seconds of the TP collectives of one micro-batch through ``layer`` with strategy
        ``s`` (``tp > 1``) at local batch ``bl`` (module docstring: TP, and SP)."""

        def t(op: str, nbytes: float) -> float:
            return self._group_time(op, nbytes * bl, "tp", pp, s.dp, s.tp)

        out = 0.0
        for pair in layer.tp_pairs:
            inputs = pair.input_bytes_per_sample or (pair.allreduce_bytes_per_sample,)
            if not s.sp:
                out += t("all_reduce", pair.allreduce_bytes_per_sample)
                out += sum(t("all_reduce", nbytes) for nbytes in inputs)
                continue
            # forward: all-gather the region's input, reduce-scatter the row-wise output;
            # backward: the reverse; with recompute the forward's pair runs again
            fwd = sum(t("all_gather", n) for n in inputs)
            fwd += t("reduce_scatter", pair.allreduce_bytes_per_sample)
            bwd = sum(t("reduce_scatter", n) for n in inputs)
            bwd += t("all_gather", pair.allreduce_bytes_per_sample)
            out += fwd * (2 if s.recompute else 1) + bwd
        if s.sp:  # the boundary: output gathered forward, input gradient gathered backward
            out += t("all_gather", layer.output_bytes_per_sample) + t("all_gather", in_bytes)
        if layer.tp_vocab is not None:  # embedding: its output forward; head: its input's grad
            out += t("all_reduce", layer.tp_vocab.allreduce_bytes_per_sample)
        return out

    def _autocast_copies(self, s: Strategy) -> bool:
        """Whether the executor runs layer strategy ``s`` on plain master weights under
        autocast, which saves a ``param_dtype`` copy of them for backward: mixed precision,
        parameters outside FSDP2 (classic DDP or ``dp == 1`` but FSDP-offload, see
        :attr:`uniap.contract.Strategy.fsdp2_wrapped`), no recompute."""
        outside = s.uses_classic_ddp or (s.dp == 1 and not s.offloaded)
        return self.precision.mixed and not s.recompute and outside

    def _edge_rows(
        self, pp: int, microbatch_size: int, dps: list[int], v: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """``R`` and ``Rp``: resharding between neighbours on one stage, and the stage-boundary
        transfer (activation forward, gradient back) plus that resharding (with ``v > 1``
        stages per rank, over the slowest link including the last rank's to the first)."""
        layers, b, C = self.graph.layers, microbatch_size, len(dps)
        L = len(layers)
        R = np.zeros((max(L - 1, 0), C, C))
        Rp = np.zeros((max(L - 1, 0), C, C))
        done: dict[float, int] = {}  # output bytes -> first layer with them (same R, Rp rows)
        for u in range(L - 1):
            out = layers[u].output_bytes_per_sample
            if out in done:
                R[u], Rp[u] = R[done[out]], Rp[done[out]]
                continue
            done[out] = u
            for a, da in enumerate(dps):
                for bb, db in enumerate(dps):
                    r = 0.0
                    if da != db:
                        lo, hi = min(da, db), max(da, db)
                        r = self._group_time("all_gather", out * b / lo, "reshard", pp, lo, hi)
                    R[u, a, bb] = r
                    if pp > 1:
                        Rp[u, a, bb] = (
                            2 * self._group_time("p2p", out * b / da, "p2p", pp, int(v > 1), 0) + r
                        )
        return R, Rp

    def _adapter_rows(
        self, microbatch_size: int, dps: list[int], base_dp: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``R`` of a model that runs its own forward at ``pp = 1`` with its first layer's
        layout (``base_dp``) as the base: ``R[u, a, b]`` charges layer ``u + 1`` in layout
        ``b`` whatever ``a`` is, since every layer's outputs are back in the base layout: 0 when
        ``b`` is the base, else its inputs resharded in and its outputs back (one all-gather
        each, in the forward or in the backward, as ``R`` of a chain) and the world
        all-gather of a signature of its arguments that every call makes (a clear error
        instead of a hang when the ranks pass different arguments), all per micro-batch."""
        layers, b, C = self.graph.layers, microbatch_size, len(dps)
        L, N = len(layers), self.cluster.world_size
        R = np.zeros((max(L - 1, 0), C, C))
        check = self._group_time("all_gather", 8.0 * N, "dp", 1, N, 1)
        for u in range(L - 1):
            into, out = layers[u].output_bytes_per_sample, layers[u + 1].output_bytes_per_sample
            for bb, db in enumerate(dps):
                if db != base_dp:
                    lo, hi = min(db, base_dp), max(db, base_dp)
                    R[u, :, bb] = check + sum(
                        self._group_time("all_gather", x * b / lo, "reshard", 1, lo, hi)
                        for x in (into, out)
                    )
        return R, np.zeros_like(R)

    def _representatives(self) -> list[int]:
        """For each layer, the first layer whose cost-table rows are necessarily equal to its
        own: the same :class:`Layer` fields but the FQN (what the profile and the formulas read),
        the same input bytes (its predecessor's output) and both last or both not."""
        if self._rep is None:
            layers = self.graph.layers
            first: dict[tuple, int] = {}
            self._rep = []
            for u, layer in enumerate(layers):
                key = (
                    dataclasses.replace(layer, fqn=""),
                    layers[u - 1].output_bytes_per_sample if u else 0.0,
                    u == len(layers) - 1,
                    self.layer_tp.get(layer.fqn),
                )
                self._rep.append(first.setdefault(key, u))
        return self._rep

    # ------------------------------------------------------------------ plans
    def allowed_strategies(
        self, layer: int | str, pp: int, num_microbatches: int, global_batch_size: int
    ) -> list[Strategy]:
        """The strategies ``layer`` (index or FQN) may use on a stage of a ``pp``-stage plan with
        ``num_microbatches`` micro-batches: the stage's strategies (``dp * tp`` = devices per
        stage, TP degree at most ``max_tp``, FSDP and ZeRO2 only with dp > 1, recompute only when
        the cost model offers it) that :func:`uniap.strategies.why_not` accepts (TP only with a
        TP plan, the micro-batch splits over dp, recompute only where it saves memory)."""
        u = self._layer_index(layer)
        b = global_batch_size // num_microbatches
        in_bytes = self.graph.layers[u - 1].output_bytes_per_sample if u else 0.0
        layer = self.graph.layers[u]
        tps = self.layer_tp.get(layer.fqn)
        return [
            s
            for s in self.strategies(pp)
            if why_not(layer, s, b, in_bytes) is None and (tps is None or s.tp in tps)
        ]

    def _layer_index(self, layer: int | str) -> int:
        if isinstance(layer, str):
            if layer not in self.graph.fqns:
                raise ConfigError(f"unknown layer {layer!r}; layers: {', '.join(self.graph.fqns)}")
            return self.graph.fqns.index(layer)
        if not 0 <= layer < self.graph.num_layers:
            raise ConfigError(f"layer index {layer} out of range 0..{self.graph.num_layers - 1}")
        return layer

    def assignment(self, plan: Plan, tables: CostTables) -> tuple[list[int], list[int]]:
        """(stage_of, strategy_of) of a plan in the indices of ``tables``; a strategy that a
        layer may not use (see :meth:`allowed_strategies`) is a :class:`ConfigError` naming the
        layer and the rule."""
        index = {s.key: k for k, s in enumerate(tables.strategies)}
        b = tables.microbatch_size
        stage_of, strategy_of = [], []
        for i, st in enumerate(plan.stages):
            for ls in st.layers:
                u = len(stage_of)
                stage_of.append(i)
                if ls.key not in index:
                    offered = ", ".join(_strategy_name(s) for s in tables.strategies)
                    raise ConfigError(
                        f"layer {ls.fqn!r}: strategy {_strategy_name(ls)} is not offered on a "
                        f"stage of {st.num_devices} devices (dp * tp must equal the stage size, tp "
                        f"at most {self.max_tp}, "
                        "FSDP and ZeRO2 need dp > 1"
                        f"{'' if self.recompute else ', recompute is off'}); "
                        f"offered: {offered}"
                    )
                k = index[ls.key]
                if k not in tables.allowed[u]:
                    in_bytes = self.graph.layers[u - 1].output_bytes_per_sample if u else 0.0
                    reason = why_not(self.graph.layers[u], tables.strategies[k], b, in_bytes)
                    raise ConfigError(
                        f"layer {ls.fqn!r} may not use {_strategy_name(ls)}: {reason}"
                    )
                strategy_of.append(k)
        return stage_of, strategy_of

    def evaluate(self, plan: Plan) -> Evaluation:
        """TPI and per-stage peak memory of ANY plan for this model and cluster (priced as
        :meth:`plan_tables` says)."""
        return evaluate_assignment(*self.plan_tables(plan))

    def plan_tables(self, plan: Plan) -> tuple[CostTables, list[int], list[int]]:
        """The tables ``plan`` is priced in and its ``(stage_of, strategy_of)`` in their
        indices: a plan with sequence-parallel layers with SP strategies offered, whatever
        ``sequence_parallel`` says; a model running its own forward at pp = 1 with the plan's
        first layer's layout as the base; a plan of another precision refused."""
        if not self.sequence_parallel and any(ls.sp for ls in plan.layer_strategies):
            with_sp = copy.copy(self)
            with_sp.sequence_parallel = True
            return with_sp.plan_tables(plan)
        plan.check_compatible(layer_fqns=self.graph.fqns, world_size=self.cluster.world_size)
        first_tp = plan.stages[0].layers[0].tp
        if plan.pp_degree == 1 and self.runs_own_forward and self.base_tp != first_tp:
            based = copy.copy(self)  # the base layout is the plan's first layer's
            based.base_tp, based.layer_tp = first_tp, dict(self.layer_tp)
            based.layer_tp[self.graph.layers[0].fqn] = frozenset({first_tp})
            return based.plan_tables(plan)
        if plan.precision is not None and plan.precision != self.precision:
            raise ConfigError(
                f"the plan is for precision {plan.precision.describe()}, this cost model charges "
                f"{self.precision.describe()}; build the graph with dtype="
                f"{plan.precision.param_dtype} and pass precision=plan.precision"
            )
        t = self.tables(
            plan.pp_degree,
            plan.num_microbatches,
            plan.global_batch_size,
            plan.schedule,
            plan.virtual_stages,
        )
        stage_of, strategy_of = self.assignment(plan, t)
        return t, stage_of, strategy_of


def _tp_local(total: float, fraction: float, tp: int) -> float:
    """A rank's part of ``total`` when TP shards ``fraction`` of it over ``tp`` ranks."""
    return total / tp if fraction == 1.0 else total * fraction / tp + total * (1 - fraction)


def _strategy_name(s) -> str:
    """``dp2 tp1 FSDP +ckpt`` (``HSDP2``: shard degree 2) for a strategy or a layer's."""
    s = getattr(s, "strategy", s)
    kind = f"HSDP{s.shard_degree}" if s.kind == "HSDP" else s.kind
    return f"dp{s.dp} tp{s.tp}{' sp' if s.sp else ''} {kind}" + (" +ckpt" if s.recompute else "")


def _groups(kind: str, g: int, pp: int, a: int, b: int):
    """Every rank group of one shape, over all stages.

    ``tp``: ``a`` = dp, ``b`` = tp: consecutive TP groups; ``dp``: the strided DP groups;
    ``reshard``: ``a`` = small dp, ``b`` = big dp: ranks holding the same small shard and
    different big shards; ``p2p``: a rank and its peer in the next stage (``a = 1``: also the
    last stage's rank and its peer in the first, the loop of interleaved schedules).
    """
    for i in range(pp):
        s0 = i * g
        if kind == "tp":
            dp, tp = a, b
            for m in range(dp):
                yield [s0 + m * tp + j for j in range(tp)]
        elif kind == "dp":
            dp, tp = a, b
            for q in range(tp):
                yield [s0 + q + m * tp for m in range(dp)]
        elif kind == "reshard":
            lo, hi = a, b
            blk, sub = g // lo, g // hi
            for bi in range(lo):
                for q in range(sub):
                    yield [s0 + bi * blk + m * sub + q for m in range(hi // lo)]
        elif kind == "p2p":
            if i + 1 < pp:
                for j in range(g):
                    yield [s0 + j, s0 + g + j]
            elif a and pp > 1:
                for j in range(g):
                    yield [s0 + j, j]
        else:  # pragma: no cover - internal
            raise AssertionError(kind)
