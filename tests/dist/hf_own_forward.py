"""Hugging Face models, unmodified, under pp = 1 plans: tiny configs (2 layers, hidden 32,
random weights, never downloaded) and the per-rank case function.

Each case builds ``AutoModelFor...``-style classes from a config, passes the model to
``parallelize`` as is, trains three SGD steps on dict batches (``input_ids``,
``attention_mask`` with padding, ``labels``, ``pixel_values``, ``decoder_input_ids``) with the
model's own loss, and compares per-step losses and every gradient after the first backward
with the same model on one process. Dropout is off (``eval()``, on both sides).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from own_forward import ATOL, RTOL, _compare, full_grads, sgd
from toy import make_plan

from uniap.api import parallelize
from uniap.graph import build_graph

VOCAB, SEQ, IMAGE = 128, 8, 16
_LM = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
_VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=IMAGE,
    patch_size=8,
)


def _families() -> dict[str, tuple[str, str, dict, str]]:
    """family -> (model class, config class, config, batch kind)."""
    return {
        "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2,
                 n_head=4, n_positions=64), "lm"),
        "llama_untied": ("LlamaForCausalLM", "LlamaConfig",
                         dict(_LM, num_key_value_heads=2, tie_word_embeddings=False), "lm"),
        "llama_tied": ("LlamaForCausalLM", "LlamaConfig",
                       dict(_LM, num_key_value_heads=2, tie_word_embeddings=True), "lm"),
        "bert_seqcls": ("BertForSequenceClassification", "BertConfig", dict(_LM, num_labels=3),
                        "cls"),
        "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(_LM), "lm"),
        "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(_LM, num_key_value_heads=2, head_dim=8),
                  "lm"),
        "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(_LM, num_key_value_heads=2,
                 pad_token_id=0), "lm"),
        "falcon": ("FalconForCausalLM", "FalconConfig", dict(vocab_size=VOCAB, hidden_size=32,
                   num_hidden_layers=2, num_attention_heads=4), "lm"),
        "bloom": ("BloomForCausalLM", "BloomConfig", dict(vocab_size=VOCAB, hidden_size=32,
                  n_layer=2, n_head=4), "lm"),
        "bart": ("BartForConditionalGeneration", "BartConfig", dict(vocab_size=VOCAB, d_model=32,
                 encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                 max_position_embeddings=64), "seq2seq"),
        "t5": ("T5ForConditionalGeneration", "T5Config", dict(vocab_size=VOCAB, d_model=32,
               d_kv=8, d_ff=64, num_layers=2, num_heads=4), "seq2seq"),
        "deit": ("DeiTForImageClassification", "DeiTConfig", dict(_VIT, num_labels=3), "image"),
        "clip_vision": ("CLIPVisionModel", "CLIPVisionConfig", dict(_VIT), "vision"),
    }  # fmt: skip


FAMILIES = tuple(_families())


def build(family: str) -> torch.nn.Module:
    """The family's model from its tiny config; same weights on every process."""
    import transformers

    model_cls, config_cls, config, _ = _families()[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
    return model.eval()


def batch(family: str, size: int, seed: int) -> dict[str, torch.Tensor]:
    """A dict batch as the family's forward takes it (padded attention masks)."""
    kind = _families()[family][3]
    g = torch.Generator().manual_seed(seed)
    if kind in ("image", "vision"):
        out = {"pixel_values": torch.randn(size, 3, IMAGE, IMAGE, generator=g)}
        if kind == "image":
            out["labels"] = torch.randint(3, (size,), generator=g)
        return out
    ids = torch.randint(1, VOCAB, (size, SEQ), generator=g)
    mask = torch.ones(size, SEQ, dtype=torch.long)
    mask[::2, -3:] = 0  # every other sample padded
    out = {"input_ids": ids, "attention_mask": mask}
    if kind == "cls":
        out["labels"] = torch.randint(3, (size,), generator=g)
    elif kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(1, VOCAB, (size, SEQ), generator=g)
        out["labels"] = torch.randint(1, VOCAB, (size, SEQ), generator=g)
    else:
        out["labels"] = ids
    return out


@functools.cache
def graph(family: str, size: int) -> Any:
    """The family's graph for a batch of ``size`` (``batch(family, size, 0)``), traced once per
    process and without the pipeline-split check: the cases read its layer FQNs, signature and
    TP plans only (``parallelize`` traces the model it is given itself)."""
    return build_graph(build(family), batch(family, size, 0), pipeline_check=False)


def _vision_loss(out: Any, _: Any) -> torch.Tensor:
    """A mean over the batch for a headless vision model."""
    return out.pooler_output.pow(2).mean()


def _loss_fn(family: str) -> Any:
    return _vision_loss if _families()[family][3] == "vision" else None


def _loss(family: str, out: Any) -> torch.Tensor:
    fn = _loss_fn(family)
    return fn(out, None) if fn is not None else out.loss


def _memory(pm: Any, family: str, big_b: int) -> dict[str, float]:
    """Rank 0's measured parameter and gradient bytes (the last step) next to what the cost
    model charges for them under the plan (``param_bytes`` and ``grad_bytes`` parts)."""
    from uniap.cluster import load_cluster
    from uniap.cost_model import CostModel

    g = graph(family, big_b)
    cm = CostModel(g, load_cluster(f"cpu-{dist.get_world_size()}"), recompute=False)
    t = cm.tables(1, pm.plan.num_microbatches, big_b)
    _, strategy_of = cm.assignment(pm.plan, t)
    parts = {
        name: float(sum(t.breakdown[name][u, k] for u, k in enumerate(strategy_of)))
        for name in ("param_bytes", "grad_bytes")
    }
    measured = pm.memory_breakdown
    return {
        "measured_params": float(measured["parameters_bytes"]),
        "measured_grads": float(measured["gradients_bytes"]),
        "predicted_params": parts["param_bytes"],
        "predicted_grads": parts["grad_bytes"],
        "free_bytes": float(sum(layer.free_params for layer in g.layers) * 4),
    }


def hf_case(case: dict) -> dict[str, Any] | None:
    """Train ``case["family"]`` at pp = 1: layers with a TP plan get ``case["tp_layers"]``,
    the others ``case["others"]``; compare with one process."""
    family, big_b, c, steps = case["family"], case.get("B", 16), case.get("c", 2), 3
    x0 = batch(family, big_b, 0)
    plan = None
    if "cluster" not in case:  # else planned by uniap on rank 0
        g = graph(family, big_b)
        per_layer = [
            tuple(case["tp_layers"] if layer.supports_tp(case["tp_layers"][1]) else case["others"])
            for layer in g.layers
        ]
        plan = make_plan(
            list(g.fqns),
            dist.get_world_size(),
            [per_layer],
            global_batch_size=big_b,
            num_microbatches=c,
            model_name=g.name,
            signature=g.signature,
        )
    pm = parallelize(
        build(family), case.get("cluster"), plan=plan, loss_fn=_loss_fn(family),
        global_batch_size=big_b, example_inputs=x0,
    )  # fmt: skip
    pm.measure_memory = bool(case.get("memory"))
    opt = sgd(pm.parameters())
    losses, grads = [], {}
    for step in range(steps):
        opt.zero_grad()
        targets = torch.zeros(big_b) if _loss_fn(family) is not None else None
        losses.append(pm.train_step(batch(family, big_b, step), targets))
        if step == 0:
            grads = full_grads(pm)
        opt.step()
    pm.eval()
    with torch.no_grad():
        out = pm(batch(family, big_b, steps))  # inference: the whole batch on every rank
    if dist.get_rank() != 0:
        return None
    ref = build(family)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, foreach=True)
    ref_losses, ref_grads = [], {}
    for step in range(steps):
        ref_opt.zero_grad()
        loss = _loss(family, ref(**batch(family, big_b, step)))
        loss.backward()
        ref_losses.append(float(loss.detach()))
        if step == 0:
            ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        ref_opt.step()
    with torch.no_grad():
        expect = ref(**batch(family, big_b, steps))
    key = "pooler_output" if _families()[family][3] == "vision" else "logits"
    got, want = out[key], expect[key]
    memory = _memory(pm, family, big_b) if case.get("memory") else None
    return {
        "memory": memory,
        "plan": pm.plan.summary(),
        "forward_close": got.shape == want.shape
        and float((got - want).abs().max()) <= ATOL + RTOL * float(want.abs().max()),
        "training": pm.training,
        "losses": losses,
        "ref_losses": ref_losses,
        "losses_close": all(
            abs(a - b) <= ATOL + RTOL * abs(b) for a, b in zip(losses, ref_losses, strict=True)
        ),
        "bad_grads": _compare(grads, ref_grads),
        "num_grads": len(grads),
    }
