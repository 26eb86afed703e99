"""The parity grid on CUDA with NCCL (one GPU per rank); skipped without enough GPUs.

Standalone: ``python -m pytest tests/dist/test_gpu.py`` on a machine with GPUs. The last test
uses every GPU present (1 is enough; pipeline cases need an even count).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from grid import cases_of, w2_cases
from harness import run_cases

pytestmark = [
    pytest.mark.dist,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

_W2 = cases_of(w2_cases(), "parity")


@pytest.fixture(scope="module")
def gpu_results_w2() -> dict[str, Any]:
    cases = [c for c in w2_cases() if c["name"] in _W2 and c.get("plan")]
    return run_cases(2, "cases:run_case", cases, device="cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("name", [n for n in _W2 if not n.startswith("planned")])
def test_gpu_world2_matches_reference(gpu_results_w2: dict[str, Any], name: str) -> None:
    """World size 2 on two GPUs (NCCL): training under the plan matches one-GPU training."""
    res = gpu_results_w2[name]
    assert "error" not in res, res.get("error")
    assert res["losses_close"] and res["params_close"], res


def test_gpu_world1_runs_on_cuda() -> None:
    """A one-rank plan runs on cuda:0 with NCCL and matches one-GPU training."""
    from grid import toy

    case = toy("pp1_world1_cuda", 1, [[(1, 1, "DDP")]], c=2)
    res = run_cases(1, "cases:run_case", [case], device="cuda")["pp1_world1_cuda"]
    assert "error" not in res, res.get("error")
    assert res["losses_close"] and res["params_close"], res


def _gpu_cases(n: int) -> list[dict]:
    """What a GPU training loop runs, on ``n`` GPUs: bf16-mixed FSDP and DDP, fused AdamW with
    clipping, and (n even) 1F1B over two stages with clipping, bf16-mixed."""
    from grid import D, F, bf16, toy

    cases = [
        bf16(toy(f"pp1_dp{n}_fsdp_c2", n, [[(n, 1, F)]], c=2, B=4 * n)),
        bf16(toy(f"pp1_dp{n}_ddp_c2", n, [[(n, 1, D)]], c=2, B=4 * n)),
        toy(
            f"clip_fused_pp1_dp{n}_fsdp_c2",
            n,
            [[(n, 1, F)]],
            c=2,
            B=4 * n,
            optimizer="fused",
            clip=0.05,
        ),
    ]
    if n % 2 == 0:
        h = n // 2
        cases += [
            toy(
                f"clip_fused_pp2_dp{h}_1f1b_c4",
                n,
                [[(h, 1, F)], [(h, 1, D)]],
                c=4,
                B=4 * n,
                schedule="1F1B",
                optimizer="fused",
                clip=0.05,
            ),
            bf16(
                toy(
                    f"pp2_dp{h}_1f1b_c4",
                    n,
                    [[(h, 1, F)], [(h, 1, D)]],
                    c=4,
                    B=4 * n,
                    schedule="1F1B",
                )
            ),
        ]
    return cases


def test_gpu_all_devices_bf16_mixed_clip_fused_1f1b() -> None:
    """On every GPU present (NCCL): bf16-mixed FSDP / DDP / 1F1B match a one-GPU autocast
    reference with fp32 master weights and optimizer state; fused AdamW steps on
    pm.param_groups(); pm.clip_grad_norm_ equals torch's one-GPU norm and clips by it."""
    n = torch.cuda.device_count()
    cases = _gpu_cases(n)
    results = run_cases(n, "cases:run_case", cases, device="cuda")
    failures = []
    for case in cases:
        res = results[case["name"]]
        if "error" in res:
            failures.append(f"{case['name']}: {res['error']}")
            continue
        ok = res["losses_close"] and res["params_close"]
        if case.get("clip") is not None:
            ok = ok and res["grad_norms_close"]
            ok = ok and all(abs(p - 0.05) <= 1e-4 * 0.05 for p in res["post_clip_norms"])
        if case.get("precision"):
            ok = ok and res["linear_output_dtypes"] == ["torch.bfloat16"]
            ok = ok and res["master_dtypes"] == ["torch.float32"]
            ok = ok and res["optimizer_state_dtypes"] == ["torch.float32"]
        if not ok:
            failures.append(f"{case['name']}: {res}")
    assert not failures, "\n".join(failures)


def test_gpu_profiles_a_meta_model_one_layer_at_a_time() -> None:
    """On one GPU: meta models of 2 and 16 blocks profile; the forward capturing the layers'
    inputs holds one block at a time (CUDA allocator peak); the meta-built model measures what
    the CPU-built one does (profile_cases)."""
    cases = [
        {"name": "peak_by_depth", "fn": "peak_by_depth", "depths": [2, 16]},
        {"name": "meta_equals_real_deep", "fn": "meta_equals_real", "model": "deep"},
    ]
    res = run_cases(1, "test_profile_meta:_dispatch", cases, device="cuda")
    for r in res.values():
        assert "error" not in r, r.get("error")
    shallow, deep = res["peak_by_depth"]["2"], res["peak_by_depth"]["16"]
    block_bytes = deep["model_bytes"] / 16
    assert deep["peak_bytes"] <= shallow["peak_bytes"] + block_bytes / 10, res
    assert deep["peak_bytes"] < 2 * block_bytes, res
    assert res["meta_equals_real_deep"]["meta"] == res["meta_equals_real_deep"]["real"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (FSDP-offload: dp > 1)")
def test_gpu_offload_bf16_mixed_and_clip() -> None:
    """FSDP-offload on every GPU present (NCCL; shards, gradients and AdamW state in pinned host
    memory, the step on the CPU): bf16-mixed next to FSDP and DDP layers, and clipping by the
    global norm over host and device shards, match one-GPU training."""
    from grid import D, F, bf16, toy

    n, off = torch.cuda.device_count(), "FSDP-offload"
    cases = [
        bf16(
            toy(
                f"pp1_dp{n}_offload_fsdp_ddp_c2",
                n,
                [[(n, 1, off), (n, 1, F), (n, 1, D), (n, 1, off)]],
                c=2,
                B=4 * n,
            )
        ),
        toy(
            f"clip_pp1_dp{n}_offload_fsdp_c2",
            n,
            [[(n, 1, off), (n, 1, F)]],
            c=2,
            B=4 * n,
            clip=0.05,
        ),
    ]
    results = run_cases(n, "cases:run_case", cases, device="cuda")
    failures = []
    for case in cases:
        res = results[case["name"]]
        ok = "error" not in res and res["losses_close"] and res["params_close"]
        if ok and case.get("clip") is not None:
            ok = res["grad_norms_close"]
            ok = ok and all(abs(p - 0.05) <= 1e-4 * 0.05 for p in res["post_clip_norms"])
        if not ok:
            failures.append(f"{case['name']}: {res}")
    assert not failures, "\n".join(failures)


def test_gpu_offload_on_one_gpu_bf16_mixed_and_clip() -> None:
    """FSDP-offload at dp = 1 on one GPU (``fully_shard`` over the one rank, the whole state
    in pinned host memory, the step on the CPU) next to a plain layer: bf16-mixed, and
    clipping by the global norm over host and device tensors, match one-GPU training."""
    from grid import D, bf16, toy

    off = "FSDP-offload"
    stages = [[(1, 1, off), (1, 1, D), (1, 1, off), (1, 1, off)]]
    cases = [
        bf16(toy("pp1_dp1_offload_ddp_c2", 1, stages, c=2)),
        toy("clip_pp1_dp1_offload_ddp_c2", 1, stages, c=2, clip=0.05),
    ]
    results = run_cases(1, "cases:run_case", cases, device="cuda")
    for case in cases:
        res = results[case["name"]]
        assert "error" not in res, res.get("error")
        assert res["losses_close"] and res["params_close"], res
        assert res["offloaded"] == ["blocks.1", "embed", "head"], res
        if case.get("clip") is not None:
            assert res["grad_norms_close"], res
            assert all(abs(p - 0.05) <= 1e-4 * 0.05 for p in res["post_clip_norms"]), res
