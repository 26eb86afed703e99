"""The cases of the distributed suite, per world size: all of one world size run inside ONE
spawned process group (``conftest.py``), each reported as its own test.

Parity cases are named by their plan: ``pp{P}_{strategies}_{schedule}_c{C}``.
"""

from __future__ import annotations

import functools
from typing import Any

from toy import make_plan, toy_fqns, toy_signature

D, F = "DDP", "FSDP"


@functools.cache
def _toy_sig() -> str:
    return toy_signature()


def toy(
    name: str,
    ws: int,
    stages: list,
    *,
    c: int = 1,
    schedule: str = "GPipe",
    B: int = 8,
    split: list[int] | None = None,
    **extra: Any,
) -> dict:
    """A parity case on the 4-layer toy (embed, blocks.0, blocks.1, head)."""
    plan = make_plan(
        toy_fqns(),
        ws,
        stages,
        global_batch_size=B,
        num_microbatches=c,
        schedule=schedule,
        split=split,
        model_name="Toy",
        signature=_toy_sig(),
    )
    return {"name": name, "model": "toy", "plan": plan.to_dict(), **extra}


@functools.cache
def _graph(name: str) -> Any:
    from uniap.graph import build_graph

    if name.startswith("hf-"):
        from uniap.models.hf import from_hf, hf_example_batch, tiny_hf_model

        model = from_hf(tiny_hf_model(name.removeprefix("hf-")))
        return build_graph(model, hf_example_batch(model, 2)[0])
    from uniap.models import build_model, example_batch

    return build_graph(build_model(name), example_batch(name, 2)[0], name=name)


@functools.cache
def _toy_sig_bf16() -> str:
    import torch

    return toy_signature(dtype=torch.bfloat16)


def has_transformers() -> bool:
    """True when Hugging Face ``transformers`` is installed (the HF cases need it)."""
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def hf_cases() -> list[dict]:
    """World-size-2 parity cases on Hugging Face models adapted by ``uniap.models.hf``."""
    if not has_transformers():
        return []
    return [
        # GPT-2's fused Conv1D c_attn has no TP plan: FSDP everywhere
        preset(
            "hf_gpt2_pp1_dp2_fsdp_c2",
            "hf-gpt2",
            2,
            1,
            tp_layers=(2, 1, F),
            others=(2, 1, F),
            c=2,
            kind="hf_parity",
        ),
        preset(
            "hf_llama_pp1_tp2_c2",
            "hf-llama",
            2,
            1,
            tp_layers=(1, 2, D),
            others=(2, 1, D),
            c=2,
            kind="hf_parity",
        ),
        preset(
            "hf_bert_pp2_1f1b_c2",
            "hf-bert",
            2,
            2,
            tp_layers=(1, 1, D),
            others=(1, 1, D),
            c=2,
            schedule="1F1B",
            kind="hf_parity",
        ),
    ]


def preset(
    name: str,
    model: str,
    ws: int,
    pp: int,
    *,
    tp_layers: tuple,
    others: tuple,
    c: int,
    schedule: str = "GPipe",
    B: int = 8,
    **extra: Any,
) -> dict:
    """A parity case on a reference model: layers with a TP plan get ``tp_layers`` ((dp, tp,
    kind)), the others ``others``; layers split evenly over ``pp`` stages."""
    graph = _graph(model)
    per_layer = [tp_layers if layer.supports_tp(tp_layers[1]) else others for layer in graph.layers]
    n = graph.num_layers
    split = [n // pp + (1 if i < n % pp else 0) for i in range(pp)]
    stages, pos = [], 0
    for k in split:
        stages.append(per_layer[pos : pos + k])
        pos += k
    plan = make_plan(
        list(graph.fqns),
        ws,
        stages,
        global_batch_size=B,
        num_microbatches=c,
        schedule=schedule,
        split=split,
        model_name=model,
        signature=graph.signature,
    )
    return {"name": name, "model": model, "plan": plan.to_dict(), **extra}


# ------------------------------------------------------------------------------ the grid
def bf16(case: dict) -> dict:
    """The same case with ``precision: bf16-mixed`` in its plan (reference under autocast)."""

    case["plan"]["precision"] = "bf16-mixed"
    # parallelize checks the plan against the model's graph in the plan's compute dtype
    case["plan"]["model"]["signature"] = _toy_sig_bf16()
    return {**case, "name": "bf16_" + case["name"], "precision": "bf16-mixed", "optimizer": "sgd"}


def precision_cases() -> list[dict]:
    """World size 4, bf16-mixed: DDP, FSDP, TP (with FSDP and with classic DDP), pp = 2, and
    pp = 4 with FSDP-offload on stages of one device."""
    return [
        bf16(toy("pp1_dp4_ddp_c2", 4, [[(4, 1, D)]], c=2, forward=True)),
        # planned by parallelize(precision="bf16-mixed") on rank 0, on the cpu-4 preset
        {
            "name": "bf16_planned_gpt_tiny_cpu4",
            "model": "gpt-tiny",
            "plan": None,
            "cluster": "cpu-4",
            "global_batch_size": 8,
            "precision": "bf16-mixed",
            "optimizer": "sgd",
        },
        bf16(toy("pp1_dp4_fsdp_c2", 4, [[(4, 1, F)]], c=2)),
        bf16(toy("pp1_tp4_blocks_c1", 4, [[(4, 1, D), (1, 4, D), (1, 4, D), (4, 1, D)]])),
        bf16(toy("pp1_dp2tp2_fsdp_c2", 4, [[(4, 1, F), (2, 2, F), (2, 2, D), (4, 1, F)]], c=2)),
        bf16(
            toy(
                "pp2_fsdp_tp2_1f1b_c2",
                4,
                [[(2, 1, F), (1, 2, D)], [(1, 2, F), (2, 1, D)]],
                c=2,
                schedule="1F1B",
            )
        ),
        # stages of one device: offload at dp = 1 (FSDP2 casts its parameters, no autocast
        # copy) next to plain layers (autocast casts the master weights)
        bf16(
            toy(
                "pp4_dp1_offload_1f1b_c4",
                4,
                [[(1, 1, "FSDP-offload")], [(1, 1, D)], [(1, 1, "FSDP-offload")], [(1, 1, D)]],
                c=4,
                schedule="1F1B",
            )
        ),
    ]


def w2_cases() -> list[dict]:
    """World size 2."""
    return [
        toy("pp1_dp2_ddp_c1", 2, [[(2, 1, D)]], forward=True),
        toy("pp1_dp2_ddp_c2", 2, [[(2, 1, D)]], c=2),
        toy("pp1_dp2_fsdp_c1", 2, [[(2, 1, F)]]),
        toy("pp1_dp2_fsdp_c4", 2, [[(2, 1, F)]], c=4),
        toy("pp1_tp2_blocks_c1", 2, [[(2, 1, D), (1, 2, D), (1, 2, D), (2, 1, D)]], forward=True),
        toy("pp1_mixed_fsdp_tp2_c2", 2, [[(2, 1, F), (1, 2, F), (1, 2, D), (2, 1, F)]], c=2),
        toy(
            "pp1_mixed_via_apply_plan_c2",
            2,
            [[(2, 1, D), (1, 2, D), (1, 2, D), (2, 1, F)]],
            c=2,
            via="apply_plan",
        ),
        toy(
            "pp1_fsdp_tp2_recompute_blocks_c2",
            2,
            [[(2, 1, F), (1, 2, F, True), (1, 2, D, True), (2, 1, F)]],
            c=2,
        ),
        toy("pp1_dp2_ddp_recompute_all_c1", 2, [[(2, 1, D, True)]], forward=True),
        toy("pp2_gpipe_c1", 2, [[(1, 1, D)], [(1, 1, D)]]),
        toy("pp2_gpipe_c4", 2, [[(1, 1, D)], [(1, 1, F)]], c=4, schedule="GPipe", forward=True),
        toy("pp2_1f1b_c2", 2, [[(1, 1, D)], [(1, 1, D)]], c=2, schedule="1F1B"),
        toy(
            "pp2_1f1b_c1_fewer_microbatches_than_stages",
            2,
            [[(1, 1, D)], [(1, 1, D)]],
            c=1,
            schedule="1F1B",
        ),
        toy(
            "pp2_1f1b_c4_split13", 2, [[(1, 1, D)], [(1, 1, F)]], c=4, schedule="1F1B", split=[1, 3]
        ),
        toy(
            "pp2_1f1b_recompute_c4",
            2,
            [[(1, 1, D), (1, 1, D, True)], [(1, 1, F, True), (1, 1, F)]],
            c=4,
            schedule="1F1B",
        ),
        # classic DDP (embed), FSDP x TP, TP alone (plain norms next to DTensors), FSDP: one stage
        toy(
            "fused_pp1_ddp_fsdptp2_tp2_fsdp_c2",
            2,
            [[(2, 1, D), (1, 2, F), (1, 2, D), (2, 1, F)]],
            c=2,
            optimizer="fused",
        ),
        preset("gpt_tiny_pp1_tp2_c2", "gpt-tiny", 2, 1, tp_layers=(1, 2, D), others=(2, 1, D), c=2),
        preset(
            "llama_tiny_pp1_fsdp_tp2_c2",
            "llama-tiny",
            2,
            1,
            tp_layers=(1, 2, F),
            others=(2, 1, F),
            c=2,
        ),
        preset(
            "bert_tiny_pp2_gpipe_c2", "bert-tiny", 2, 2, tp_layers=(1, 1, D), others=(1, 1, D), c=2
        ),
        preset(
            "vit_tiny_pp1_tp2_ddp_c1",
            "vit-tiny",
            2,
            1,
            tp_layers=(1, 2, D),
            others=(2, 1, D),
            c=1,
            forward=True,
        ),
        preset(
            "t5_tiny_pp2_1f1b_c4",
            "t5-tiny",
            2,
            2,
            tp_layers=(1, 1, D),
            others=(1, 1, F),
            c=4,
            schedule="1F1B",
        ),
        preset(
            "swin_tiny_pp1_dp2_fsdp_c2",
            "swin-tiny",
            2,
            1,
            tp_layers=(2, 1, F),
            others=(2, 1, F),
            c=2,
        ),
        {
            "name": "planned_sequential_cpu2",
            "model": "sequential",
            "plan": None,
            "cluster": "cpu-2",
            "global_batch_size": 8,
        },
        *hf_cases(),
        {
            "name": "planned_gpt_tiny_cpu2",
            "model": "gpt-tiny",
            "plan": None,
            "cluster": "cpu-2",
            "global_batch_size": 8,
        },
        toy(
            "consistency_rank1_other_plan",
            2,
            [[(2, 1, D)]],
            c=2,
            kind="plan_consistency",
            odd_rank=1,
        ),
        toy(
            "checkpoint_pp1_fsdp_tp2",
            2,
            [[(2, 1, F), (1, 2, F), (1, 2, D), (2, 1, D)]],
            c=2,
            kind="checkpoint",
        ),
        toy("memory_pp1_dp2_ddp_c2", 2, [[(2, 1, D)]], c=2, kind="memory"),
        # allocator-level peak: FSDP keeps parameters and gradients unsharded across the
        # micro-batches (the tensor count sees only the shards); classic DDP
        toy("allocator_pp1_dp2_fsdp_c2", 2, [[(2, 1, F)]], c=2, kind="allocator_memory"),
        toy("allocator_pp1_dp2_ddp_c2", 2, [[(2, 1, D)]], c=2, kind="allocator_memory"),
        # the model's output is not held by the executor through backward
        toy("output_freed_pp1_dp2_ddp_c2", 2, [[(2, 1, D)]], c=2, kind="output_freed"),
        # classic DDP copies its gradients during a step only when they hold values
        preset(
            "allocator_gpt_tiny_pp1_dp2_ddp_c1",
            "gpt-tiny",
            2,
            1,
            tp_layers=(2, 1, D),
            others=(2, 1, D),
            c=1,
            kind="allocator_memory",
        ),
        # gradients doubled after each backward (a sum over the 2 ranks instead of the mean)
        toy(
            "control_pp1_dp2_fsdp_grads_summed_c2",
            2,
            [[(2, 1, F)]],
            c=2,
            kind="grad_scale_control",
            scale_grads=2.0,
        ),
        toy(
            "comm_pp1_tp2_c2",
            2,
            [[(2, 1, D), (1, 2, D), (1, 2, D), (2, 1, D)]],
            c=2,
            kind="comm_count",
            # embed/head DDP tp1: classic DDP, one bucket for both; blocks: 2 pairs x (1 fwd +
            # 1 bwd) x c; reshard embed->blocks gathers forward, blocks->head gathers backward,
            # per micro-batch
            expect={"all_reduce@2": 1, "tp_all_reduce@2": 16, "all_gather_single@2": 4},
        ),
    ]


def w4_cases() -> list[dict]:
    """World size 4."""
    return [
        toy("pp1_dp4_ddp_c1", 4, [[(4, 1, D)]]),
        toy("pp1_dp4_fsdp_c2", 4, [[(4, 1, F)]], c=2),
        toy("pp1_tp4_blocks_c1", 4, [[(4, 1, D), (1, 4, D), (1, 4, D), (4, 1, D)]], forward=True),
        toy("pp1_dp2tp2_ddp_c2", 4, [[(4, 1, D), (2, 2, D), (2, 2, D), (4, 1, D)]], c=2),
        toy("pp1_dp2tp2_fsdp_c1", 4, [[(4, 1, F), (2, 2, F), (2, 2, F), (4, 1, F)]]),
        toy("pp1_dp2tp2_fsdp_c4", 4, [[(4, 1, F), (2, 2, F), (2, 2, F), (4, 1, F)]], c=4, B=16),
        toy(
            "pp1_mixed_dp4_dp2tp2_tp4_c2",
            4,
            [[(4, 1, F), (2, 2, D), (1, 4, F), (4, 1, D)]],
            c=2,
            forward=True,
        ),
        toy("pp2_dp2_ddp_gpipe_c2", 4, [[(2, 1, D)], [(2, 1, D)]], c=2),
        toy(
            "pp2_dp2_fsdp_1f1b_c4",
            4,
            [[(2, 1, F)], [(2, 1, F)]],
            c=4,
            schedule="1F1B",
            forward=True,
        ),
        toy(
            "pp2_tp2_cross_stage_reshard_gpipe_c2",
            4,
            [[(2, 1, D), (1, 2, D)], [(2, 1, F), (2, 1, F)]],
            c=2,
        ),
        toy(
            "pp2_fsdp_tp2_1f1b_c2",
            4,
            [[(2, 1, F), (1, 2, D)], [(1, 2, F), (2, 1, F)]],
            c=2,
            schedule="1F1B",
        ),
        toy(
            "pp2_fsdp_tp2_recompute_1f1b_c2",
            4,
            [[(2, 1, F), (1, 2, D, True)], [(1, 2, F, True), (2, 1, F, True)]],
            c=2,
            schedule="1F1B",
        ),
        # AdamW(fused=True) and the global gradient norm on stages that mix every kind;
        # clip 0.05 is below the toy's gradient norms (about 1), so clipping really scales
        toy(
            "clip_fused_pp1_ddp_dp2tp2fsdp_tp4_fsdp_c2",
            4,
            [[(4, 1, D), (2, 2, F), (1, 4, D), (4, 1, F)]],
            c=2,
            optimizer="fused",
            clip=0.05,
        ),
        toy(
            "clip_fused_pp2_fsdp_tp2_1f1b_c2",
            4,
            [[(2, 1, F), (1, 2, D)], [(1, 2, F), (2, 1, D)]],
            c=2,
            schedule="1F1B",
            optimizer="fused",
            clip=0.05,
        ),
        toy("clip_pp4_1f1b_c4", 4, [[(1, 1, D)]] * 4, c=4, schedule="1F1B", clip=0.05),
        *precision_cases(),
        # built on the meta device: FSDP; FSDP x TP with classic DDP; pp = 2 with TP
        toy("meta_pp1_dp4_fsdp_c2", 4, [[(4, 1, F)]], c=2, kind="meta"),
        toy(
            "meta_pp1_ddp_dp2tp2fsdp_tp4_c2",
            4,
            [[(4, 1, D), (2, 2, F), (1, 4, D), (4, 1, F)]],
            c=2,
            kind="meta",
        ),
        toy(
            "meta_pp2_fsdp_tp2_1f1b_c2",
            4,
            [[(2, 1, F), (1, 2, D)], [(1, 2, F), (2, 1, D)]],
            c=2,
            schedule="1F1B",
            kind="meta",
        ),
        toy("pp4_gpipe_c4", 4, [[(1, 1, D)]] * 4, c=4),
        toy("pp4_1f1b_c4", 4, [[(1, 1, D)]] * 4, c=4, schedule="1F1B", forward=True),
        toy("pp4_gpipe_c1", 4, [[(1, 1, D)]] * 4, c=1),
        toy(
            "pp4_1f1b_c2_fewer_microbatches_than_stages", 4, [[(1, 1, D)]] * 4, c=2, schedule="1F1B"
        ),
        toy(
            "pp2_split13_fsdp_dp2_gpipe_c4",
            4,
            [[(2, 1, F)], [(2, 1, F), (1, 2, D), (2, 1, D)]],
            c=4,
            split=[1, 3],
        ),
        preset(
            "llama_tiny_pp2_dp2_tp2_1f1b_c2",
            "llama-tiny",
            4,
            2,
            tp_layers=(1, 2, F),
            others=(2, 1, D),
            c=2,
            schedule="1F1B",
        ),
        preset(
            "gpt_tiny_pp1_dp2tp2_fsdp_c2",
            "gpt-tiny",
            4,
            1,
            tp_layers=(2, 2, F),
            others=(4, 1, F),
            c=2,
        ),
        {
            "name": "planned_bert_tiny_cpu4",
            "model": "bert-tiny",
            "plan": None,
            "cluster": "cpu-4",
            "global_batch_size": 8,
        },
        toy(
            "checkpoint_pp2_mixed",
            4,
            [[(2, 1, F), (1, 2, D)], [(1, 2, F), (2, 1, D)]],
            c=2,
            kind="checkpoint",
        ),
        # per-iteration collectives seen by rank 0 (4 layers with parameters on stage 0 when pp=1)
        # classic DDP: the toy's gradients fit in one bucket, all-reduced once per iteration
        toy(
            "comm_pp1_ddp_c2", 4, [[(4, 1, D)]], c=2, kind="comm_count", expect={"all_reduce@4": 1}
        ),
        # DDP with tp > 1 is FSDP2's replicate: one all-reduce per layer over its dp group
        toy(
            "comm_pp1_dp2tp2_ddp_c2",
            4,
            [[(4, 1, D), (2, 2, D), (2, 2, D), (4, 1, D)]],
            c=2,
            kind="comm_count",
            expect={
                "all_reduce@4": 1,
                "all_reduce@2": 2,
                "all_gather_single@2": 4,
                "tp_all_reduce@2": 16,
            },
        ),
        toy(
            "comm_pp1_fsdp_c1",
            4,
            [[(4, 1, F)]],
            kind="comm_count",
            expect={"all_gather_single@4": 8, "reduce_scatter_single@4": 4},
        ),
        toy(
            "comm_pp1_fsdp_c4",
            4,
            [[(4, 1, F)]],
            c=4,
            B=16,
            kind="comm_count",
            expect={"all_gather_single@4": 4, "reduce_scatter_single@4": 4},
        ),
        toy(
            "comm_pp1_dp2tp2_fsdp_c2",
            4,
            [[(4, 1, D), (2, 2, F), (2, 2, F), (4, 1, D)]],
            c=2,
            kind="comm_count",
            expect={
                "all_reduce@4": 1,
                "all_gather_single@2": 2 + 4,
                "reduce_scatter_single@2": 2,
                "tp_all_reduce@2": 16,
            },
        ),
        toy(
            "comm_pp2_dp2_1f1b_c2",
            4,
            [[(2, 1, D)], [(2, 1, F)]],
            c=2,
            schedule="1F1B",
            kind="comm_count",
            expect={"all_reduce@2": 1},
        ),
    ]


def cases_of(cases: list[dict], kind: str) -> list[str]:
    """Names of the cases of one kind (``parity`` by default)."""
    return [c["name"] for c in cases if c.get("kind", "parity") == kind]
