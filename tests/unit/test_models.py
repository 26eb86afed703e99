"""Reference models: chain-executability, shapes, determinism, presets and parameter counts."""

from __future__ import annotations

import pytest
import torch

from uniap.errors import UniapError
from uniap.graph import layer_chain, run_chain
from uniap.models import (
    build_model,
    example_batch,
    init_weights,
    list_models,
    loss_fn_for,
    model_config,
)
from uniap.models.layers import Attention

TINY = ["gpt-tiny", "llama-tiny", "bert-tiny", "vit-tiny", "t5-tiny", "swin-tiny"]
BIG = ["bert-huge", "vit-huge", "t5-large", "swin-huge", "llama-7b", "llama2-70b"]

OUTPUT_SHAPES = {
    "gpt-tiny": (3, 32, 256),
    "llama-tiny": (3, 32, 256),
    "bert-tiny": (3, 32, 256),
    "vit-tiny": (3, 10),
    "t5-tiny": (3, 32, 256),
    "swin-tiny": (3, 10),
}


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_forward_equals_layer_chain(name):
    """model(x) equals feeding x through its layer chain one layer at a time."""
    model = build_model(name, device="cpu", seed=0)
    x, _ = example_batch(name, 3)
    torch.testing.assert_close(model(x), run_chain(layer_chain(model), x))


@pytest.mark.parametrize("name", TINY)
def test_output_shape_and_loss_backward(name):
    """Outputs have the documented shape and the loss reaches every parameter."""
    model = build_model(name, device="cpu", seed=0)
    x, y = example_batch(name, 3)
    out = model(x)
    assert tuple(out.shape) == OUTPUT_SHAPES[name]
    loss = loss_fn_for(name)(out, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for fqn, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), fqn


@pytest.mark.parametrize("name", TINY)
def test_same_seed_builds_identical_weights(name):
    """Same seed -> identical weights; another seed -> different weights."""
    a = build_model(name, device="cpu", seed=7).state_dict()
    b = build_model(name, device="cpu", seed=7).state_dict()
    c = build_model(name, device="cpu", seed=8).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dim() >= 2)


def test_partial_materialisation_matches_full_model():
    """A stage that initialises only its layer (by FQN) gets the full model's weights."""
    full = build_model("llama-tiny", device="cpu", seed=3)
    block = build_model("llama-tiny").blocks[2].to_empty(device="cpu")
    init_weights(block, seed=3, prefix="blocks.2")
    for (name, p), q in zip(block.named_parameters(), full.blocks[2].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_example_batch_is_deterministic_and_shaped():
    """example_batch depends only on the seed; T5 packs encoder and decoder ids."""
    x1, y1 = example_batch("t5-tiny", 4, seed=1)
    x2, y2 = example_batch("t5-tiny", 4, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert tuple(x1.shape) == (4, 2, 32) and tuple(y1.shape) == (4, 32)
    ids, targets = example_batch(build_model("gpt-tiny"), 2)
    assert torch.equal(ids[:, 1:], targets[:, :-1])  # next-token targets


def test_t5_decoder_consumes_encoder_output():
    """Changing only the encoder ids changes the decoder logits (cross-attention is real)."""
    model = build_model("t5-tiny", device="cpu", seed=0)
    x, _ = example_batch("t5-tiny", 2)
    x2 = x.clone()
    x2[:, 0] = (x2[:, 0] + 1) % 256
    assert not torch.allclose(model(x), model(x2))


def test_swin_stages_halve_resolution_and_double_width():
    """Each PatchMerging halves the token map side and doubles the channels."""
    model = build_model("swin-tiny", device="cpu", seed=0)
    x, _ = example_batch("swin-tiny", 2)
    h = model.embed(x)
    assert tuple(h.shape) == (2, 64, 16)
    h = model.stages[0](h)
    assert tuple(h.shape) == (2, 16, 32)
    assert model.stages[0].blocks[1].shift_size == 2  # shifted windows on odd blocks
    assert model.stages[1].blocks[1].shift_size == 0  # window covers the whole 4x4 map


def test_attention_shard_with_fewer_local_heads():
    """A TP shard (half the q and kv heads) runs unchanged; the shards' outputs sum to the
    full output, as the row-wise all-reduce assumes."""
    torch.manual_seed(0)
    full = Attention(32, 4, 2, bias=False, causal=True, rope_theta=10000.0)
    x = torch.randn(2, 8, 32)
    out = torch.zeros(2, 8, 32)
    for rank in range(2):
        shard = Attention(32, 4, 2, bias=False, causal=True, rope_theta=10000.0)
        q_rows, kv_rows = slice(16 * rank, 16 * (rank + 1)), slice(8 * rank, 8 * (rank + 1))
        with torch.no_grad():
            shard.q_proj.weight = torch.nn.Parameter(full.q_proj.weight[q_rows])
            shard.k_proj.weight = torch.nn.Parameter(full.k_proj.weight[kv_rows])
            shard.v_proj.weight = torch.nn.Parameter(full.v_proj.weight[kv_rows])
            shard.o_proj.weight = torch.nn.Parameter(full.o_proj.weight[:, q_rows])
            out += shard(x)
    torch.testing.assert_close(out, full(x))


@pytest.mark.parametrize("name", BIG)
def test_big_presets_build_on_meta(name):
    """Big presets build on the meta device (their default) and allocate no real weights."""
    model = build_model(name)
    assert all(p.is_meta for p in model.parameters())


def _gpt_params(c) -> int:
    d, f, v = c.dim, c.hidden_dim, c.vocab_size
    kv = c.kv_heads * (d // c.n_heads)
    if c.style == "llama":  # RMSNorm (weight only), SwiGLU, no biases, rotary
        block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
        return v * d + c.n_layers * block + d + d * v
    block = (2 * d * d + 2 * d * kv + 2 * d + 2 * kv) + (2 * d * f + f + d) + 4 * d
    return v * d + c.seq_len * d + c.n_layers * block + 2 * d + d * v


def _encoder_block_params(d: int, f: int) -> int:
    return (4 * d * d + 4 * d) + (2 * d * f + f + d) + 4 * d


def _bert_params(c) -> int:
    d, v = c.dim, c.vocab_size
    embed = (v + c.seq_len + c.type_vocab_size) * d + 2 * d
    head = (d * d + d) + 2 * d + (d * v + v)
    return embed + c.n_layers * _encoder_block_params(d, c.ffn_dim) + head


def _vit_params(c) -> int:
    d = c.dim
    embed = c.in_channels * c.patch_size**2 * d + d + d + (c.num_patches + 1) * d
    head = d * c.num_classes + c.num_classes
    return embed + c.n_layers * _encoder_block_params(d, c.ffn_dim) + 2 * d + head


def _t5_params(c) -> int:
    d, f, v = c.dim, c.ffn_dim, c.vocab_size
    enc = 2 * d + 4 * d * d + 2 * d * f
    dec = 3 * d + 8 * d * d + 2 * d * f
    return v * d + c.n_layers * enc + c.n_decoder_layers * dec + 2 * d + d * v


def _swin_params(c) -> int:
    total = c.in_channels * c.patch_size**2 * c.embed_dim + 3 * c.embed_dim
    for i, depth in enumerate(c.depths):
        d = c.stage_dim(i)
        total += depth * (12 * d * d + 13 * d)  # 2 LN, q/k/v/o with bias, 4x MLP with bias
        if i < len(c.depths) - 1:
            total += 8 * d + 8 * d * d  # PatchMerging: LN(4d) + Linear(4d, 2d) without bias
    last = c.stage_dim(len(c.depths) - 1)
    return total + 2 * last + last * c.num_classes + c.num_classes


FORMULAS = {"gpt": _gpt_params, "llama": _gpt_params, "bert": _bert_params}
FORMULAS |= {"vit": _vit_params, "t5": _t5_params, "swin": _swin_params}


@pytest.mark.parametrize("name", list_models())
def test_parameter_count_matches_formula(name):
    """Every preset's parameter count equals the closed-form count of its config."""
    formula = FORMULAS[name.split("-")[0].removesuffix("2")]
    assert _num_params(build_model(name)) == formula(model_config(name))


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("llama-7b", 6.74e9),  # Touvron et al. 2023, 6,738,415,616
        ("llama2-70b", 68.98e9),  # Touvron et al. 2023 (Llama 2), 68,976,648,192
        ("vit-huge", 632e6),  # ViT-H/14, Dosovitskiy et al. 2021
        ("swin-huge", 658e6),  # SwinV2-H (C=352, depths 2-2-18-2), Liu et al. 2022
    ],
)
def test_parameter_count_matches_literature(name, published):
    """Presets are within 2% of the published sizes."""
    assert _num_params(build_model(name)) == pytest.approx(published, rel=0.02)


def test_t5_large_matches_literature_up_to_the_untied_head():
    """T5-large is 737.67M with its head tied to the embedding; ours adds an untied head."""
    c = model_config("t5-large")
    tied = _num_params(build_model("t5-large")) - c.vocab_size * c.dim
    assert tied == pytest.approx(737.67e6, rel=0.02)


def test_build_model_options_and_errors():
    """Overrides replace config fields; dtypes apply; bad names and fields are UniapErrors."""
    model = build_model("gpt-tiny", dtype=torch.bfloat16, n_layers=2)
    assert len(model.blocks) == 2 and next(model.parameters()).dtype == torch.bfloat16
    assert model.uniap_name == "gpt-tiny"
    with pytest.raises(UniapError, match="unknown model"):
        build_model("gpt-9000")
    with pytest.raises(UniapError, match="unknown config field"):
        build_model("gpt-tiny", n_layer=2)
    with pytest.raises(ValueError, match="n_kv_heads"):
        build_model("llama-tiny", n_kv_heads=3)
