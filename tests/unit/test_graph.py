"""Layer chains and the meta trace: FLOPs, bytes, parameters, TP plans, cost keys."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from uniap.errors import UniapError
from uniap.graph import TRACE_BATCH_SIZE, build_graph, layer_chain, run_chain
from uniap.models import build_model, example_batch


def _fqns(model: nn.Module) -> list[str]:
    return [fqn for fqn, _ in layer_chain(model)]


def _graph(name: str, **overrides):
    model = build_model(name, **overrides)
    return build_graph(model, example_batch(model, 1)[0])


@pytest.fixture(scope="module")
def gpt_graph():
    return _graph("gpt-tiny")


@pytest.fixture(scope="module")
def llama_graph():
    return _graph("llama-tiny")


# ------------------------------------------------------------------------------ layer chains


def test_chain_of_sequential_is_its_children():
    """An nn.Sequential's chain is its children, parameterless ones included."""
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert _fqns(seq) == ["0", "1", "2"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(run_chain(layer_chain(seq), x), seq(x))


def test_chain_of_gpt_tiny():
    """GPT: embed, the blocks, norm, head."""
    fqns = _fqns(build_model("gpt-tiny"))
    assert fqns == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "norm", "head"]


def test_chain_of_t5_tiny_runs_encoder_then_decoder():
    """T5: the whole encoder (and its norm) precedes the decoder."""
    assert _fqns(build_model("t5-tiny")) == [
        "embed",
        "encoder.blocks.0",
        "encoder.blocks.1",
        "encoder.norm",
        "decoder.blocks.0",
        "decoder.blocks.1",
        "decoder.norm",
        "head",
    ]


def test_chain_discovery_expands_lists_and_wrappers():
    """Without uniap_layer_fqns: lists expand, wrappers holding a list expand recursively,
    parameterless children are dropped."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
            self.norm = nn.LayerNorm(8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.drop = nn.Dropout(0.1)
            self.encoder = Encoder()
            self.head = nn.Linear(8, 10)

    assert _fqns(Net()) == ["embed", "encoder.layers.0", "encoder.layers.1", "encoder.norm", "head"]


def test_bad_layer_fqns_are_rejected():
    """Unknown or nested layer FQNs are UniapErrors."""
    model = build_model("gpt-tiny")
    x = torch.zeros(1, 32, dtype=torch.long)
    with pytest.raises(UniapError, match="not a submodule"):
        build_graph(model, x, layer_fqns=["embed", "blocks.9"])
    with pytest.raises(UniapError, match="nested"):
        build_graph(model, x, layer_fqns=["blocks", "blocks.0"])


# ------------------------------------------------------------------------- FLOPs and bytes


def test_linear_flops_and_bytes_are_exact():
    """Linear: 2*in*out FLOPs per token forward, 4*in*out backward (input + weight grads;
    the first layer's input is data, so weight grads only); output bytes and saved bytes
    (the input, never the weight) exact."""
    seq = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    tokens = 3
    graph = build_graph(seq, torch.randn(5, tokens, 8))
    first, second = graph.layers
    assert first.fwd_flops_per_sample == 2 * 8 * 16 * tokens
    assert first.bwd_flops_per_sample == 2 * 8 * 16 * tokens
    assert second.fwd_flops_per_sample == 2 * 16 * 4 * tokens
    assert second.bwd_flops_per_sample == 4 * 16 * 4 * tokens
    assert first.output_bytes_per_sample == tokens * 16 * 4
    assert second.saved_bytes_per_sample == tokens * 16 * 4  # its input; weights excluded
    assert (first.num_params, first.param_bytes) == (8 * 16 + 16, (8 * 16 + 16) * 4)
    assert graph.sample_shape == (tokens, 8) and graph.extra["trace_batch_size"] == 2


def test_dtype_halves_bytes():
    """Tracing in bfloat16 halves parameter, output and saved bytes."""
    seq = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    f32 = build_graph(seq, torch.randn(2, 8))
    bf16 = build_graph(seq, torch.randn(2, 8), dtype=torch.bfloat16)
    assert bf16.dtype == "bfloat16"
    for a, b in zip(f32.layers, bf16.layers):
        assert b.param_bytes * 2 == a.param_bytes
        assert b.output_bytes_per_sample * 2 == a.output_bytes_per_sample
        assert b.saved_bytes_per_sample * 2 == a.saved_bytes_per_sample


def test_block_costs_are_sensible(gpt_graph):
    """A GPT block: FLOPs ~ 2 * params per token (+ attention), backward ~ 2x forward,
    saved activations a small multiple of its input (fused attention, no seq x seq)."""
    cfg = build_model("gpt-tiny").config
    block = gpt_graph.layer("blocks.0")
    s, h = cfg.seq_len, cfg.dim
    linear_flops = 2 * s * (4 * h * h + 2 * h * 4 * h)
    attention_flops = 4 * s * s * h
    assert block.fwd_flops_per_sample == linear_flops + attention_flops
    assert block.bwd_flops_per_sample == pytest.approx(2 * block.fwd_flops_per_sample, rel=0.05)
    assert block.output_bytes_per_sample == s * h * 4
    assert 8 * s * h * 4 < block.saved_bytes_per_sample < 24 * s * h * 4


def test_parameters_counted_once_and_never_read():
    """Tied weights count on their first layer; the real model is left untouched."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.blocks = nn.ModuleList([nn.Linear(8, 8)])
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.blocks[0](self.embed(ids)))

    model = Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = build_graph(model, torch.zeros(4, 5, dtype=torch.long))
    assert [layer.num_params for layer in graph.layers] == [16 * 8, 8 * 8 + 8, 0]
    assert sum(layer.num_params for layer in graph.layers) == sum(
        p.numel() for p in model.parameters()
    )
    assert all(p.grad is None and not p.is_meta for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_big_preset_traces_in_seconds():
    """llama-7b traces on meta; forward FLOPs ~ 2 * params * tokens plus attention."""
    model = build_model("llama-7b")
    graph = build_graph(model, torch.zeros(1, model.config.seq_len, dtype=torch.long))
    params = sum(layer.num_params for layer in graph.layers)
    assert params == pytest.approx(6.74e9, rel=0.01)
    fwd = graph.extra["fwd_flops_per_sample"]
    assert fwd == pytest.approx(2 * params * model.config.seq_len, rel=0.10)


# ----------------------------------------------------------------------------- TP plans


def test_llama_blocks_get_megatron_pairs(llama_graph):
    """q/k/v -> o and gate/up -> down, divisible by heads and kv heads."""
    block = llama_graph.layer("blocks.1")
    assert [(p.colwise, p.rowwise) for p in block.tp_pairs] == [
        (("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn.o_proj"),
        (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    ]
    assert {2, 4, 32, 64, 176} <= set(block.tp_divisors)  # kv heads, heads, k/v out, dims
    assert all(p.allreduce_bytes_per_sample == 32 * 64 * 4 for p in block.tp_pairs)
    assert block.supports_tp(2) and not block.supports_tp(4)  # only 2 kv heads
    assert 0.0 < block.tp_saved_fraction < 1.0


def test_embedding_and_head_get_vocabulary_tp_norm_none(llama_graph):
    """Embedding and head are vocabulary-parallel where tp divides the vocabulary (256); a
    norm has nothing to shard."""
    embed, head = llama_graph.layer("embed"), llama_graph.layer("head")
    assert (embed.tp_vocab.kind, embed.tp_vocab.module, embed.tp_vocab.vocab_size) == (
        "embedding",
        "token",
        256,
    )
    assert (head.tp_vocab.kind, head.tp_vocab.module) == ("head", "")
    # one all-reduce of (seq 32 x dim 64) fp32 per sample: the embedding's output forward, the
    # gradient of the head's input backward; the head's 32 rows of logits for the loss
    assert embed.tp_vocab.allreduce_bytes_per_sample == 32 * 64 * 4
    assert head.tp_vocab.allreduce_bytes_per_sample == 32 * 64 * 4
    assert head.tp_vocab.loss_rows_per_sample == 32
    assert embed.tp_vocab.param_fraction == head.tp_vocab.param_fraction == 1.0
    for layer in (embed, head):
        assert layer.tp_enabled and layer.supports_tp(2) and layer.supports_tp(4)
        assert layer.why_not_tp(3) == (
            f"the vocabulary size (256) of the {layer.tp_vocab.kind} is not divisible by tp=3"
        )
    assert "no nn.Linear" in llama_graph.layer("norm").tp_excluded_reason


def test_gpt_embedding_shards_the_token_table_not_the_positions(gpt_graph):
    """The GPT-style embedding shards its vocabulary table (256 x 64) only; the learned
    position table (32 x 64) stays replicated, as the parameter fraction says."""
    embed = gpt_graph.layer("embed")
    assert embed.tp_vocab.module == "token"
    assert embed.tp_vocab.param_fraction == pytest.approx(256 / (256 + 32))
    assert embed.tp_param_fraction == embed.tp_vocab.param_fraction


def test_tied_embedding_and_head_get_no_vocabulary_tp():
    """A head tied to the embedding keeps both at tp = 1, naming the tie."""

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(64, 16)
            self.body = nn.Linear(16, 16)
            self.head = nn.Linear(16, 64, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(self.embed(ids)))

    graph = build_graph(TiedLM(), torch.zeros(2, 8, dtype=torch.long), pipeline_check=False)
    embed, head = graph.layer("embed"), graph.layer("head")
    assert embed.tp_excluded_reason == (
        "embedding/head: the vocabulary weight embed.weight is tied to head.weight; "
        "vocabulary-parallel TP needs untied input and output embeddings"
    )
    assert head.tp_excluded_reason == (
        "embedding/head: the vocabulary weight head.weight is tied to embed.weight; "
        "vocabulary-parallel TP needs untied input and output embeddings"
    )
    assert not embed.supports_tp(2) and not head.supports_tp(2)


def test_escaping_column_output_is_not_paired():
    """A column-wise output used outside its row-wise Linear cannot be sharded."""

    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 32)
            self.down = nn.Linear(32, 8)

        def forward(self, x):
            u = self.up(x)
            return self.down(torch.relu(u)) + u[..., :8]

    class Ok(Leaky):
        def forward(self, x):
            return x + self.down(torch.relu(self.up(x)))

    model = nn.Sequential(Leaky(), Ok(), Ok())
    graph = build_graph(model, torch.randn(2, 8))
    assert not graph.layers[0].tp_enabled
    assert "do not line up" in graph.layers[0].tp_excluded_reason
    assert [(p.colwise, p.rowwise) for p in graph.layers[1].tp_pairs] == [(("up",), "down")]


def test_t5_decoder_cross_attention_is_a_pair():
    """Cross-attention (q from the decoder, k/v from the encoder) forms one pair."""
    graph = _graph("t5-tiny")
    pairs = [(p.colwise, p.rowwise) for p in graph.layer("decoder.blocks.0").tp_pairs]
    assert (
        ("cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj"),
        "cross_attn.o_proj",
    ) in pairs
    assert len(pairs) == 3


# ---------------------------------------------------------------------- keys and signature


def test_identical_blocks_share_cost_key(gpt_graph):
    """Identical blocks share a cost key; other layers do not."""
    keys = [layer.cost_key for layer in gpt_graph.layers]
    assert len({keys[i] for i in range(1, 5)}) == 1
    assert len(set(keys)) == 4  # embed, blocks, norm, head


def test_swin_stages_have_different_cost_keys():
    """Swin blocks of different widths get different keys; merges have no TP plan."""
    graph = _graph("swin-tiny")
    stage0 = {graph.layer(f"stages.0.blocks.{j}").cost_key for j in range(2)}
    stage1 = {graph.layer(f"stages.1.blocks.{j}").cost_key for j in range(2)}
    assert stage0.isdisjoint(stage1) and len(stage1) == 1  # stage 1 has no shifted windows
    merge = graph.layer("stages.0.downsample")
    assert not merge.tp_enabled and merge.tp_excluded_reason
    assert graph.layer("stages.1.blocks.0").tp_divisors[0] == 4


def test_signature_changes_with_shape(gpt_graph):
    """Same model -> same signature; another sequence length or width -> another."""
    assert _graph("gpt-tiny").signature == gpt_graph.signature
    assert _graph("gpt-tiny", seq_len=16).signature != gpt_graph.signature
    assert _graph("gpt-tiny", dim=32).signature != gpt_graph.signature


# ------------------------------------------------------------------ Hugging Face structures


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="Hugging Face transformers not installed")


def _hf_graph(cls, config):
    with torch.device("meta"):
        model = cls(config)
    return build_graph(model, torch.zeros(1, 16, dtype=torch.long))


def test_hf_gpt2_chain_and_conv1d_exclusion(transformers):
    """GPT-2: discovered chain; fused Conv1D projections give no TP plan, with a reason."""
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64, use_cache=False
    )
    graph = _hf_graph(transformers.GPT2LMHeadModel, cfg)
    assert graph.fqns == (
        "transformer.wte",
        "transformer.wpe",
        "transformer.h.0",
        "transformer.h.1",
        "transformer.ln_f",
        "lm_head",
    )
    block = graph.layer("transformer.h.0")
    assert not block.tp_enabled and "Conv1D" in block.tp_excluded_reason
    assert block.fwd_flops_per_sample > 0 and block.saved_bytes_per_sample > 0
    assert graph.layer("lm_head").num_params == 0  # tied to wte


def test_hf_llama_pairs_and_divisors(transformers):
    """Llama: Megatron pairs found without model-specific names; kv heads from the config."""
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
        use_cache=False,
    )
    graph = _hf_graph(transformers.LlamaForCausalLM, cfg)
    assert graph.fqns[0] == "model.embed_tokens" and graph.fqns[-1] == "lm_head"
    block = graph.layer("model.layers.0")
    assert [p.rowwise for p in block.tp_pairs] == ["self_attn.o_proj", "mlp.down_proj"]
    assert {2, 4} <= set(block.tp_divisors)


def test_hf_bert_chain_and_pairs(transformers):
    """BERT: embeddings, encoder layers, MLM head; query/key/value -> output.dense pairs."""
    cfg = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
    )
    graph = _hf_graph(transformers.BertForMaskedLM, cfg)
    assert graph.fqns == ("bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "cls")
    block = graph.layer("bert.encoder.layer.0")
    assert [(p.colwise, p.rowwise) for p in block.tp_pairs] == [
        (
            ("attention.self.query", "attention.self.key", "attention.self.value"),
            "attention.output.dense",
        ),
        (("intermediate.dense",), "output.dense"),
    ]


def test_trace_batch_is_two():
    """Per-sample numbers come from a batch-2 trace, whatever the example batch."""
    assert TRACE_BATCH_SIZE == 2
    seq = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    a = build_graph(seq, torch.randn(1, 4))
    b = build_graph(seq, torch.randn(64, 4))
    assert a.layers == b.layers


@pytest.mark.parametrize("name", ["t5-tiny", "swin-tiny", "llama-tiny"])
def test_meta_trace_gives_the_fake_tensor_graph(name: str, monkeypatch) -> None:
    """The fast plain-meta trace and the fake-tensor trace give identical layer chains."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import uniap.graph as graph_module

    fast = _graph(name)
    monkeypatch.setattr(
        graph_module, "_MetaMode", lambda: FakeTensorMode(allow_non_fake_inputs=True)
    )
    assert _graph(name).layers == fast.layers


def test_data_dependent_forward_falls_back_to_fake_tensors() -> None:
    """A forward that checks a tensor's value unless it is being traced with fake tensors
    (as Hugging Face models do) has no answer on plain meta tensors: it is traced with fake
    tensors instead of failing."""
    from torch._subclasses.fake_tensor import FakeTensor

    class Checked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not isinstance(x, FakeTensor) and bool((x != 0).all()):  # raises on meta
                x = x * 1.0
            return self.b(self.a(x))

    g = build_graph(Checked(), torch.randn(2, 8), layer_fqns=["a", "b"])
    assert [layer.fqn for layer in g.layers] == ["a", "b"]
    assert g.layer("a").fwd_flops_per_sample == 2 * 8 * 8


def test_only_the_first_layer_embedding_is_vocabulary_parallel():
    """A position table that is its own layer (GPT-2's wpe: its output has no batch dim)
    keeps tp = 1, with the reason; the token embedding before it is vocabulary-parallel."""

    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(64, 16)
            self.pos = nn.Embedding(8, 16)
            self.head = nn.Linear(16, 64, bias=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(ids.shape[1], device=ids.device)[None]
            return self.head(self.tok(ids) + self.pos(positions))

    graph = build_graph(Positions(), torch.zeros(2, 8, dtype=torch.long), pipeline_check=False)
    assert graph.layer("tok").supports_tp(2) and graph.layer("head").supports_tp(2)
    assert graph.layer("pos").tp_excluded_reason == (
        "embedding/head: only the first layer's embedding (of the model's input ids) is "
        "vocabulary-parallel; a later embedding layer (a position table, GPT-2's wpe) may return "
        "a tensor without the batch dim, whose gradient differs across the TP ranks"
    )


# ---------------------------------------------------------------- replaying repeated layers


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "t5-tiny", "swin-tiny"])
def test_replayed_trace_equals_the_full_trace(name: str) -> None:
    """Replaying layers that copy an earlier one gives the graph of running every layer:
    per-layer FLOPs, bytes, parameters, TP plans and cost keys all equal."""
    model = build_model(name, n_layers=5) if name != "swin-tiny" else build_model(name)
    inputs = example_batch(model, 1)[0]
    fast = build_graph(model, inputs)
    full = build_graph(model, inputs, reuse_repeated_layers=False)
    assert fast.layers == full.layers
    assert fast.signature == full.signature


class _Counted(nn.Module):
    """A Linear block that counts its real forward runs; ``twice`` changes what it computes
    without changing its parameters."""

    runs = 0

    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.twice = twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).runs += 1
        x = self.fc(x)
        return self.fc(x) if self.twice else x


def test_repeated_layers_run_once_and_attributes_are_compared() -> None:
    """Equal blocks with equal inputs run once in the trace; a block equal in parameters but not
    in its attributes (it computes more) runs and gets its own FLOPs. The first block's input
    needs no gradient (the second's does), so it runs too: 3 runs for 5 blocks."""
    model = nn.Sequential(_Counted(), _Counted(), _Counted(twice=True), _Counted(), _Counted())
    _Counted.runs = 0
    fast = build_graph(model, torch.randn(2, 8))
    assert _Counted.runs == 3
    _Counted.runs = 0
    full = build_graph(model, torch.randn(2, 8), reuse_repeated_layers=False)
    assert _Counted.runs == 5
    assert fast.layers == full.layers
    flops = [layer.fwd_flops_per_sample for layer in fast.layers]
    assert flops == [2 * 8 * 8] * 2 + [4 * 8 * 8] + [2 * 8 * 8] * 2


def test_a_layer_called_twice_is_traced_in_full() -> None:
    """A layer that its model's forward calls twice costs twice: no replay, every layer run."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.c = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.b(self.a(x))))

    fast = build_graph(Twice(), torch.randn(2, 8), pipeline_check=False)
    full = build_graph(
        Twice(), torch.randn(2, 8), pipeline_check=False, reuse_repeated_layers=False
    )
    assert fast.layers == full.layers
    assert fast.layer("b").fwd_flops_per_sample == 2 * fast.layer("a").fwd_flops_per_sample


def test_hf_llama_replayed_trace_equals_the_full_trace(transformers) -> None:
    """Hugging Face Llama (layer indices, rotary tables, masks as keyword inputs): the replayed
    trace equals the full one."""
    cfg = transformers.LlamaConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
        use_cache=False,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    inputs = torch.zeros(1, 16, dtype=torch.long)
    fast = build_graph(model, inputs, pipeline_check=False)
    full = build_graph(model, inputs, pipeline_check=False, reuse_repeated_layers=False)
    assert fast.layers == full.layers


class _Pair(nn.Module):
    """Two Linears, one of them twice, a plain tensor attribute, a list, a reference back to
    its parent and a hook: what a module tree's copy must keep shared or apart."""

    def __init__(self, parent: nn.Module | None = None) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a
        self.c = nn.Linear(3, 2)
        self.scale = torch.ones(3)  # not a buffer: a plain attribute
        self.sizes = [3, 2]
        self.owner = [parent]
        self.c.register_forward_hook(lambda *args: None)


class _CopiesItself(nn.Linear):
    def __deepcopy__(self, memo):
        out = nn.Linear(self.in_features, self.out_features, device="meta")
        out.copied_by_itself = True
        return out


def test_the_trace_copy_is_a_deep_copy() -> None:
    """The trace's copy of a module tree (tracing._deepcopy_module) shares and separates what
    copy.deepcopy does: a submodule held twice stays one module, a parameter tied across
    modules stays one parameter, nothing (hooks, lists, plain tensors, modules) is shared with
    the original, and a module with its own __deepcopy__ is copied by it."""
    from uniap.tracing import _deepcopy_module

    root = nn.Module()
    root.p = _Pair()
    root.p.owner[0] = root
    root.q = _CopiesItself(2, 2)
    root.tied = nn.Linear(3, 3)
    root.tied.weight = root.p.a.weight
    copies = {"deepcopy": copy.deepcopy(root), "uniap": _deepcopy_module(root, {})}
    for how, new in copies.items():
        assert new.p.b is new.p.a and new.p.a is not root.p.a, how
        assert new.tied.weight is new.p.a.weight and new.tied.weight is not root.p.a.weight, how
        assert new.p.owner[0] is new and new.p.owner is not root.p.owner, how
        assert new.p.sizes == [3, 2] and new.p.sizes is not root.p.sizes, how
        assert new.p.scale is not root.p.scale and torch.equal(new.p.scale, root.p.scale), how
        assert len(new.p.c._forward_hooks) == 1, how
        assert new.p.c._forward_hooks is not root.p.c._forward_hooks, how
        assert new.p._forward_hooks is not root.p._forward_hooks, how
        assert getattr(new.q, "copied_by_itself", False), how
        assert [n for n, _ in new.named_parameters()] == [n for n, _ in root.named_parameters()]
        assert [n for n, _ in new.named_modules()] == [n for n, _ in root.named_modules()]
    new = copies["uniap"]
    new.p.c.register_forward_hook(lambda *args: None)
    assert len(root.p.c._forward_hooks) == 1  # the original's hooks are untouched


def test_trace_resumes_the_garbage_collector_as_it_was() -> None:
    """build_graph pauses the cyclic collector while it traces and leaves it as it found it,
    also when the trace fails."""
    import gc

    model = build_model("gpt-tiny", device="meta")
    ids = example_batch(model, 2, device="meta")[0]
    assert gc.isenabled()
    build_graph(model, ids)
    assert gc.isenabled()
    with pytest.raises(UniapError):
        build_graph(model, ids, layer_fqns=["missing"])
    assert gc.isenabled()
    gc.disable()
    try:
        build_graph(model, ids)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_model_taking_a_named_tuple_and_a_mapping_is_traced() -> None:
    """Example inputs nested in a named tuple and a non-dict mapping trace at the trace batch
    (the trace's fake copies rebuilt a named tuple from one generator and raised)."""
    from collections import UserDict, namedtuple

    Pair = namedtuple("Pair", "x scale")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, pair: Pair, extra: UserDict) -> torch.Tensor:
            return self.b(self.a(pair.x) * pair.scale + extra["bias"])

    x = Pair(torch.randn(4, 8), torch.tensor(2.0))
    graph = build_graph(Net(), {"pair": x, "extra": UserDict(bias=torch.zeros(4, 8))})
    assert graph.fqns == ("a", "b")
    assert graph.layers[0].output_bytes_per_sample == 8 * 4


def test_fake_copy_keeps_shapes_strides_sharing_and_casts_floats():
    """The traced copy's tensors are new meta tensors with the originals' shapes and strides
    (a transposed parameter stays transposed), floating ones in the trace dtype and trainable,
    integer buffers as they are, and a parameter shared by two modules stays one tensor."""
    from uniap.graph import _MetaMode
    from uniap.tracing import fake_copy

    a, b = nn.Linear(3, 5), nn.Linear(5, 3)
    b.weight = nn.Parameter(torch.empty(3, 5, device="meta").t().contiguous().t())
    model = nn.Sequential(a, b, nn.Linear(3, 5))
    model[2].weight = a.weight  # shared
    model.register_buffer("steps", torch.zeros(2, 3, dtype=torch.long, device="meta"))
    copy_ = fake_copy(model, torch.bfloat16, _MetaMode())
    old, new = dict(model.named_parameters()), dict(copy_.named_parameters())
    assert new.keys() == old.keys()
    for name, p in new.items():
        assert p is not old[name] and p.is_meta and p.requires_grad
        want = (old[name].shape, old[name].stride(), torch.bfloat16)
        assert (p.shape, p.stride(), p.dtype) == want
    assert not b.weight.is_contiguous() and new["1.weight"].stride() == (1, 3)
    assert copy_[2].weight is copy_[0].weight
    assert copy_.steps.dtype == torch.long and copy_.steps.is_meta
