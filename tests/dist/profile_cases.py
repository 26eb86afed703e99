"""Cases for tests/dist/test_profile_meta.py, run on every rank by ``harness.run_cases``:
profiling a model built on the meta device, one layer on the device at a time."""

from __future__ import annotations

import torch
from torch import nn

from uniap._dist import default_device
from uniap.cluster import Cluster, load_cluster
from uniap.graph import build_graph
from uniap.profiler import collect_profile

WIDTH = 512  # one block: 2 * WIDTH^2 parameters, 2 MiB in fp32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, WIDTH)
        self.down = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Deep(nn.Module):
    """``depth`` identical fat blocks on small activations: the parameters dominate."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block() for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _hf_llama(device: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if device == "meta":
        with torch.device("meta"):
            return LlamaForCausalLM(cfg)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _profile(model: nn.Module, example, graph, **kw):
    device = default_device()
    return collect_profile(
        model,
        example,
        graph=graph,
        cluster=Cluster.detect() if device.type == "cuda" else load_cluster("cpu-2"),
        global_batch_size=4,
        device=device,
        batches=[1, 2],
        warmup=1,
        repeats=1,
        **kw,
    )


def _shapes(profile) -> dict:
    """What a profile measures that does not depend on timing: per distinct layer, the bytes
    saved for backward and the state bytes, per TP degree."""
    return {
        lp.fqns[0]: {
            "fqns": list(lp.fqns),
            "activation": {str(t): v for t, v in lp.activation_bytes.items()},
            "state": {str(t): v for t, v in lp.state_bytes.items()},
        }
        for lp in profile.layers.values()
    }


def peak_by_depth(case: dict) -> dict:
    """For each depth: profile a meta ``Deep(depth)`` (the model stays on the meta device), and
    the allocator-level peak bytes of the step that runs the whole model's forward (capturing
    the layers' inputs, one layer materialised at a time), where a profiler holding the whole
    model would hold every block."""
    from uniap.executor.memory import AllocatorPeak
    from uniap.profiler.layers import LayerSource

    device = default_device()
    out = {}
    for depth in case["depths"]:
        with torch.device("meta"):
            model = Deep(depth)
        x = torch.randn(4, 8, WIDTH)
        graph = build_graph(model, x, name=f"deep{depth}")
        _profile(model, x, graph)
        source = LayerSource(model, graph.fqns, device)
        with AllocatorPeak(device) as mem:
            source.capture_inputs([graph.fqns[0], graph.fqns[-1]], x)
        out[str(depth)] = {
            "peak_bytes": mem.increase_bytes,
            "model_bytes": sum(p.numel() * 4 for p in model.parameters()),
            "still_meta": all(p.is_meta for p in model.parameters()),
        }
    return out


def meta_equals_real(case: dict) -> dict:
    """Profile the same model built on the meta device and on the CPU; return both profiles'
    timing-free measurements (equal when each layer runs on the inputs the model's own forward
    gives it, keywords included) and whether every time is positive."""
    if case["model"] == "hf-llama":
        meta, real = _hf_llama("meta"), _hf_llama("cpu")
        ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
        example, targets, loss_fn = {"input_ids": ids, "labels": ids}, None, None
    else:
        with torch.device("meta"):
            meta = Deep(3)
        torch.manual_seed(0)
        real = Deep(3)
        example = torch.randn(4, 8, WIDTH)
        targets = torch.randn(4, 8, WIDTH)
        loss_fn = nn.functional.mse_loss
    graph = build_graph(real, example)
    kw = {"targets": targets, "loss_fn": loss_fn}
    meta_profile, real_profile = (
        _profile(meta, example, graph, **kw),
        _profile(real, example, graph, **kw),
    )
    times = [
        t
        for p in (meta_profile, real_profile)
        for lp in p.layers.values()
        for per_tp in (lp.fwd_s, lp.bwd_s)
        for ts in per_tp.values()
        for t in ts
    ]
    return {
        "meta": _shapes(meta_profile),
        "real": _shapes(real_profile),
        "tp_degrees": sorted({t for lp in meta_profile.layers.values() for t in lp.fwd_s}),
        "times_positive": all(t > 0 for t in times),
        "still_meta": all(p.is_meta for p in meta.parameters()),
    }
