"""Vocabulary-parallel embedding and head: the per-rank case function.

Each case trains a tiny model (the GPT-style preset class, or an unmodified Hugging Face
Llama) at pp = 1 on 2 ranks with its embedding and head at tp = 2 (vocabulary-parallel, the
loss under ``loss_parallel()``; ``case["vocab"]``: another strategy for one of them), its
blocks at ``case["others"]`` and its final norm (no TP plan) at dp = 2; three SGD steps
(foreach), per-step losses and every gradient after the first backward against one process.
It also records the logits each rank holds (their type and local width: ``V / tp``) and,
for ``case["loss"]`` (``softmax``, ``gather``), that a loss which would gather the logits
is refused. :func:`profile_case` measures the model's profile (embedding and head at tp = 2,
the loss under ``loss_parallel()``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hf_own_forward import batch as hf_batch
from hf_own_forward import build as hf_build
from own_forward import full_grads, parity_summary, rank_verdicts, sgd
from toy import make_plan

from uniap.api import parallelize
from uniap.graph import build_graph
from uniap.models import GPT, GPTConfig

# the end of the refusal of a loss that would gather the sharded logits: the fix it names
FIX = (
    "Use such a loss, or plan 'head' at tp=1 (plan with vocab_parallel=False, or uniap plan "
    "--no-vocab-parallel)"
)
GPT_CONFIG = GPTConfig(vocab_size=64, seq_len=8, dim=32, n_layers=2, n_heads=4)


def _build(family: str) -> torch.nn.Module:
    if family == "gpt":
        torch.manual_seed(0)
        return GPT(GPT_CONFIG)
    return hf_build("llama_untied")


def _batch(family: str, size: int, seed: int) -> tuple[Any, Any]:
    if family != "gpt":
        return hf_batch("llama_untied", size, seed), None
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(GPT_CONFIG.vocab_size, (size, GPT_CONFIG.seq_len + 1), generator=g)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy, as a user writes it (a view, a cast)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def _softmax_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A loss that needs the whole vocabulary row (softmax): not loss-parallel."""
    return -logits.softmax(-1).amax(-1).log().mean()


def _gather_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy written by hand with ``gather``: DTensor cannot mix the sharded logits
    with the plain targets."""
    logp = logits.log_softmax(-1).view(-1, logits.shape[-1])
    return -logp.gather(1, targets.view(-1, 1)).mean()


def _loss_fn(family: str, case: dict) -> Any:
    if family != "gpt":
        return None  # the model's own loss (labels=)
    return {"softmax": _softmax_loss, "gather": _gather_loss}.get(case.get("loss"), _ce)


def _call_loss(family: str, model: torch.nn.Module, x: Any, y: Any) -> torch.Tensor:
    if family != "gpt":
        return model(**x).loss
    return _ce(model(x), y)


def vocab_case(case: dict) -> dict[str, Any] | None:
    """Train ``case["family"]`` with its embedding and head at tp = 2; compare with one
    process (see the module docstring)."""
    family, big_b, c, steps = case["family"], 8, case.get("c", 2), 3
    x0, _ = _batch(family, big_b, 0)
    # no pipeline-split check: parallelize traces the model itself (and the GPT preset is a
    # declared chain, split without one)
    graph = build_graph(_build(family), x0, pipeline_check=False)
    vocab_layers = [layer.fqn for layer in graph.layers if layer.tp_vocab is not None]
    others = tuple(case["others"])
    vocab = {kind: tuple(s) for kind, s in case.get("vocab", {}).items()}
    per_layer = [
        vocab.get(layer.tp_vocab.kind, (1, 2, "DDP"))
        if layer.tp_vocab is not None
        else (others if layer.supports_tp(others[1]) else (2, 1, others[2]))
        for layer in graph.layers
    ]
    pp = case.get("pp", 1)  # pp = 2 (world 4): the embedding and first block, the rest
    plan = make_plan(
        list(graph.fqns),
        dist.get_world_size(),
        [per_layer[:2], per_layer[2:]] if pp == 2 else [per_layer],
        global_batch_size=big_b,
        num_microbatches=c,
        split=[2, len(per_layer) - 2] if pp == 2 else None,
        schedule="1F1B" if pp == 2 else "GPipe",
        model_name=graph.name,
        signature=graph.signature,
    )
    try:
        pm = parallelize(
            _build(family),
            plan=plan,
            loss_fn=_loss_fn(family, case),
            global_batch_size=big_b,
            example_inputs=x0,
        )
    except Exception as e:  # noqa: BLE001 - the refusal is the result
        if not case.get("refused"):
            raise
        return {"refused": f"{type(e).__name__}: {e}"} if dist.get_rank() == 0 else None
    head = graph.layers[-1]
    held: list[tuple[str, int]] = []
    if pm.is_last_stage:
        head_module = pm.module.get_submodule(head.fqn)
        if head.tp_vocab.module:
            head_module = head_module.get_submodule(head.tp_vocab.module)
        head_module.register_forward_hook(
            lambda m, a, out: held.append((type(out).__name__, out.to_local().shape[-1]))
        )
    if case.get("loss"):
        refused = None
        try:
            x, y = _batch(family, big_b, 0)
            pm.train_step(x, y)
        except Exception as e:  # noqa: BLE001 - the refusal is the result
            refused = f"{type(e).__name__}: {e}"
        # every rank's outcome: at pp = 2 the stage without the loss must be told too
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, refused)
        return {"refused": every[0], "refused_on": every} if dist.get_rank() == 0 else None
    opt = sgd(pm.parameters())
    losses, grads = [], {}
    for step in range(steps):
        opt.zero_grad()
        x, y = _batch(family, big_b, step)
        losses.append(pm.train_step(x, y))
        if step == 0:
            grads = full_grads(pm)
        opt.step()
    pm.eval()
    with torch.no_grad():
        x, _ = _batch(family, big_b, steps)
        out = pm(x)
    logits = out if family == "gpt" else out["logits"]
    ref = _build(family)  # on every rank: with pipeline stages each checks its own gradients
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, foreach=True)
    ref_losses, ref_grads = [], {}
    for step in range(steps):
        ref_opt.zero_grad()
        x, y = _batch(family, big_b, step)
        loss = _call_loss(family, ref, x, y)
        loss.backward()
        ref_losses.append(float(loss.detach()))
        if step == 0:
            ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        ref_opt.step()
    every = rank_verdicts(grads, ref_grads, sorted(set(held)), staged=pp > 1)
    if every is None:
        return None
    return {
        "plan": pm.plan.summary(),
        "vocab_layers": vocab_layers,
        "vocab_size": head.tp_vocab.vocab_size,
        "held_logits": sorted({tuple(h) for _, _, hs in every for h in hs}),
        "inference_logits_shape": list(logits.shape),
        **parity_summary(every, ref_grads, losses, ref_losses),
    }


def profile_case(case: dict) -> dict[str, Any] | None:
    """The measured profile of the GPT-style model: its embedding and head measured at tp=2
    with the executor's vocabulary TP, the loss at tp=2 under loss_parallel(); the numbers
    the cost model reads at tp=1 and tp=2."""
    from uniap._dist import default_device
    from uniap.cluster import load_cluster
    from uniap.profiler import collect_profile

    # a vocabulary large enough for the logits to dominate the loss's working memory
    config = GPTConfig(vocab_size=1024, seq_len=8, dim=32, n_layers=1, n_heads=4)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(config.vocab_size, (4, config.seq_len + 1), generator=g)
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    torch.manual_seed(0)
    model = GPT(config)
    graph = build_graph(model, x)
    profile = collect_profile(
        model,
        x,
        graph=graph,
        cluster=load_cluster("cpu-2"),
        global_batch_size=4,
        device=default_device(),
        batches=[1, 2],
        warmup=1,
        repeats=1,
        targets=y,
        loss_fn=_ce,
    )
    if dist.get_rank() != 0:
        return None
    embed, head = graph.layers[0], graph.layers[-1]
    return {
        "tp_measured": {
            layer.fqn: sorted(profile.layers[layer.cost_key].fwd_s) for layer in (embed, head)
        },
        "loss_tp": sorted(profile.layers[head.cost_key].loss_tp),
        "working_bytes": {tp: profile.loss_working_bytes(head, 2, tp) for tp in (1, 2)},
        "loss_s": {tp: profile.loss_s(head, 2, tp) for tp in (1, 2)},
        "logits_bytes": head.output_bytes_per_sample * 2,
    }


def case(case: dict) -> dict[str, Any] | None:
    """Dispatch: :func:`profile_case` or :func:`vocab_case`."""
    return profile_case(case) if case.get("profile") else vocab_case(case)
