"""Hugging Face adapters (``uniap.models.hf``): the chain equals the Hugging Face model, keeps
its FQNs and parameters, and plans like any other model. Needs ``transformers`` (no downloads)."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("transformers")

from uniap.errors import UniapError  # noqa: E402
from uniap.graph import build_graph  # noqa: E402
from uniap.models.hf import FAMILIES, from_hf, hf_example_batch, tiny_hf_model  # noqa: E402

CHAINS = {
    "gpt2": [
        "transformer.wte",
        "transformer.wpe",
        "transformer.h.0",
        "transformer.h.1",
        "transformer.ln_f",
        "lm_head",
    ],
    "llama": ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"],
    "bert": ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "cls"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_chain_logits_equal_hf_logits(family: str) -> None:
    """Running the chain layer by layer gives the Hugging Face model's logits (rtol 1e-5)."""
    hf = tiny_hf_model(family, seed=0)
    chain = from_hf(hf)
    x, _ = hf_example_batch(hf, 3, seed=1)
    with torch.no_grad():
        expect = hf(x).logits
        got = x
        for fqn in chain.uniap_layer_fqns():
            got = chain.get_submodule(fqn)(got)
    assert chain.uniap_layer_fqns() == CHAINS[family]
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_chain_keeps_hf_fqns_and_shares_untied_parameters(family: str) -> None:
    """state_dict keys are the Hugging Face keys, in order; untied parameters are the HF ones
    (no copy), and a state dict of the chain loads into the HF model."""
    hf = tiny_hf_model(family, seed=0, tie_word_embeddings=False)
    chain = from_hf(hf)
    assert list(chain.state_dict()) == list(hf.state_dict())
    hf_params = dict(hf.named_parameters())
    for name, p in chain.named_parameters():
        assert p is hf_params[name], name
    other = tiny_hf_model(family, seed=1, tie_word_embeddings=False)
    other.load_state_dict(chain.state_dict())
    x, _ = hf_example_batch(hf, 2)
    with torch.no_grad():
        torch.testing.assert_close(other(x).logits, hf(x).logits)


def test_tied_output_projection_is_untied_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """GPT-2's lm_head tied to wte gets its own copy (same values, another tensor), with a
    warning that says how to avoid it; the HF model is left untouched."""
    hf = tiny_hf_model("gpt2", seed=0)
    assert hf.lm_head.weight is hf.transformer.wte.weight
    with caplog.at_level(logging.WARNING, logger="uniap.models.hf"):
        chain = from_hf(hf)
    assert chain.lm_head.weight is not chain.transformer.wte.weight
    assert torch.equal(chain.lm_head.weight, hf.transformer.wte.weight)
    assert chain.transformer.wte.weight is hf.transformer.wte.weight
    assert hf.lm_head.weight is hf.transformer.wte.weight
    assert [r.getMessage() for r in caplog.records] == [
        "lm_head.weight is tied to a parameter of transformer.wte; uniap untied it (a copy, "
        "trained separately): build the model with tie_word_embeddings=False to avoid this"
    ]


def test_other_hf_models_are_refused_by_name() -> None:
    """A model without an adapter is refused, naming the supported classes."""
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    with pytest.raises(
        UniapError,
        match="GPT2Model \\(model_type 'gpt2'\\) has no uniap adapter; "
        "supported: GPT2LMHeadModel, LlamaForCausalLM, BertForMaskedLM",
    ):
        from_hf(transformers.GPT2Model(config))


def test_graph_finds_llama_and_bert_tp_plans_and_excludes_gpt2_conv1d() -> None:
    """Llama and BERT blocks get Megatron pairs from their nn.Linears; GPT-2's fused Conv1D
    c_attn gets none, with the reason."""
    graphs = {}
    for family in FAMILIES:
        chain = from_hf(tiny_hf_model(family, tie_word_embeddings=False))
        graphs[family] = build_graph(chain, hf_example_batch(chain, 2)[0])
    llama = graphs["llama"].layer("model.layers.0")
    assert [(p.colwise, p.rowwise) for p in llama.tp_pairs] == [
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj"),
        (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    ]
    assert llama.supports_tp(2) and not llama.supports_tp(4)  # 2 kv heads
    assert graphs["bert"].layer("bert.encoder.layer.1").supports_tp(4)
    gpt2 = graphs["gpt2"].layer("transformer.h.0")
    assert not gpt2.tp_pairs
    assert gpt2.tp_excluded_reason == (
        "no column-wise/row-wise Linear pair found (fused or non-Linear projections: Conv1D)"
    )
    assert graphs["gpt2"].name == "hf-gpt2"


def test_planner_logs_gpt2_tp_exclusion_once(caplog: pytest.LogCaptureFixture) -> None:
    """Planning GPT-2 logs why its blocks get no TP once, not once per block; the plan has tp=1."""
    from uniap.planner import plan

    chain = from_hf(tiny_hf_model("gpt2", tie_word_embeddings=False))
    with caplog.at_level(logging.INFO, logger="uniap.planner"):
        p = plan(chain, "cpu-2", global_batch_size=8, example_inputs=hf_example_batch(chain, 8)[0])
    conv = [r.getMessage() for r in caplog.records if "Conv1D" in r.getMessage()]
    assert conv == [
        "tensor parallelism excluded for transformer.h.0 (and alike): no column-wise/row-wise "
        "Linear pair found (fused or non-Linear projections: Conv1D)"
    ]
    assert all(ls.tp == 1 for ls in p.layer_strategies)


@pytest.mark.parametrize(
    ("family", "layer", "reason"),
    [
        # fused qkv_proj cut at global offsets after the Linear
        (
            "phi3",
            "model.layers.0",
            "the output of self_attn.qkv_proj (64 features) is split after the Linear (a fused "
            "projection): column shards would not be shards of each part",
        ),
        # ALiBi biases (batch * heads, 1, seq) made by the model for all heads
        (
            "bloom",
            "transformer.h.0",
            "an input of shape [8, 1, 8] is indexed by attention head (a bias for all heads made "
            "outside the layer): head-sharded attention would need its shard",
        ),
        # the relative position bias made by block 0 and passed to every later block
        (
            "t5",
            "encoder.block.1",
            "an input of shape [1, 4, 8, 8] is indexed by attention head (a bias for all heads "
            "made outside the layer): head-sharded attention would need its shard",
        ),
    ],
)
def test_tp_refused_where_sharding_would_change_the_function(
    family: str, layer: str, reason: str
) -> None:
    """Layers whose Linear pairs exist but whose column/head shards would not compute the
    layer get no TP plan, with the reason; Llama's keep theirs."""
    import hf_own_forward as hf

    graph = build_graph(hf.build(family), hf.batch(family, 2, 0), pipeline_check=False)
    by_fqn = {lay.fqn: lay for lay in graph.layers}
    assert not by_fqn[layer].tp_enabled
    assert by_fqn[layer].tp_excluded_reason == reason
    llama = build_graph(hf.build("llama_tied"), hf.batch("llama_tied", 2, 0), pipeline_check=False)
    assert llama.layer("model.layers.0").tp_enabled


def test_a_batch_encoding_is_keyword_inputs_everywhere() -> None:
    """A tokenizer's ``BatchEncoding`` is a mapping but not a dict: the profiler's forward and
    layer-input capture, the graph trace and the pipeline split all call the model with its
    keys (the profiler called the model with it as the one positional input)."""
    from transformers import BatchEncoding

    from uniap.profiler.compute import call_model, capture_layer_inputs
    from uniap.tracing import pipeline_split_reason

    model = tiny_hf_model("llama")
    ids = torch.randint(0, 256, (2, 8))
    batch = BatchEncoding({"input_ids": ids, "labels": ids})
    ref = model(input_ids=ids, labels=ids).loss
    assert torch.equal(call_model(model, batch).loss, ref)
    graph = build_graph(model, batch)
    seen = capture_layer_inputs(model, graph.fqns, batch)
    assert set(seen) == set(graph.fqns)
    assert pipeline_split_reason(model, batch, list(graph.fqns)) is None
