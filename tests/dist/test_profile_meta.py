"""Profiling a model that is never whole on the device (2 gloo processes, one spawn): a model
built on the meta device is profiled one layer at a time, measures what the same model built on
the CPU measures, and the forward that captures the layers' inputs holds one layer at a time
(allocator-level peak, the same at every depth)."""

from __future__ import annotations

import pytest
from harness import run_cases

pytestmark = pytest.mark.dist

CASES = [
    {"name": "peak_by_depth", "fn": "peak_by_depth", "depths": [2, 16]},
    {"name": "meta_equals_real_deep", "fn": "meta_equals_real", "model": "deep"},
    {"name": "meta_equals_real_hf_llama", "fn": "meta_equals_real", "model": "hf-llama"},
]


def _dispatch(case: dict) -> dict:
    import profile_cases

    return getattr(profile_cases, case["fn"])(case)


@pytest.fixture(scope="module")
def results() -> dict:
    return run_cases(2, "test_profile_meta:_dispatch", CASES)


def _ok(results: dict, name: str) -> dict:
    res = results[name]
    assert "error" not in res, res.get("error")
    return res


def test_peak_does_not_grow_with_depth(results: dict) -> None:
    """Meta models of 2 and 16 blocks of 2 MiB each profile on the device and stay on the meta
    device; running the whole forward to capture the layers' inputs peaks, at the allocator,
    at the same bytes for both depths and below two blocks: one block is materialised at a
    time (a profiler holding the whole model would hold all 16)."""
    res = _ok(results, "peak_by_depth")
    shallow, deep = res["2"], res["16"]
    block_bytes = deep["model_bytes"] / 16
    assert deep["peak_bytes"] <= shallow["peak_bytes"] + block_bytes / 10, res
    assert block_bytes <= deep["peak_bytes"] < 2 * block_bytes, res
    assert shallow["still_meta"] and deep["still_meta"]


@pytest.mark.parametrize("model", ["deep", "hf_llama"])
def test_meta_profile_measures_what_the_real_model_measures(results: dict, model: str) -> None:
    """Saved activations and state bytes per layer and TP degree are equal for the meta-built
    and the CPU-built model (each layer ran on its real inputs: a Hugging Face decoder layer
    gets its mask and rotary tables as keywords), at tp 1 and 2."""
    res = _ok(results, f"meta_equals_real_{model}")
    assert res["meta"] == res["real"]
    assert res["tp_degrees"] == [1, 2]
    assert res["times_positive"] and res["still_meta"]
