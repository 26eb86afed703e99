"""Hugging Face ``transformers`` models as chain-executable uniap models.

:func:`from_hf` turns a ``GPT2LMHeadModel``, ``LlamaForCausalLM`` or ``BertForMaskedLM`` into an
:class:`HFChain`: a module whose layers are the Hugging Face modules themselves, at their
Hugging Face FQNs (``transformer.h.0``, ``model.layers.3``, ``bert.encoder.layer.1``), so the
parameter names and ``state_dict`` keys are the Hugging Face ones and a full state dict of the
parallel model loads back into the Hugging Face model. ``chain(input_ids)`` returns what
``hf_model(input_ids).logits`` returns.

Each chain position computes what the Hugging Face forward computes around that module:

=================  ==========================================================================
family             chain (what the position adds around the Hugging Face module)
=================  ==========================================================================
GPT-2              ``transformer.wte`` -> ``transformer.wpe`` (adds the position embedding of
                   ``arange(seq)`` to the token embedding, then the embedding dropout) ->
                   ``transformer.h.{i}`` (causal mask from ``create_causal_mask``) ->
                   ``transformer.ln_f`` -> ``lm_head``
Llama              ``model.embed_tokens`` -> ``model.layers.{i}`` (position ids, rotary
                   ``(cos, sin)`` from the model's own rotary module, causal mask) ->
                   ``model.norm`` -> ``lm_head``
BERT (masked LM)   ``bert.embeddings`` -> ``bert.encoder.layer.{i}`` (bidirectional mask from
                   ``create_bidirectional_mask``) -> ``cls``
=================  ==========================================================================

A position that needs more than its input is a *rebound* copy of the Hugging Face module: an
instance of a subclass of its class that shares the module's parameters, buffers and children
(no weights are copied) and whose ``forward(x)`` calls the Hugging Face ``forward`` with the
extra arguments. The Hugging Face model itself is not modified. The Llama rotary module (buffers
only, not in the state dict) is registered under every decoder layer as ``rotary_emb`` so that
each pipeline stage has it.

Inputs are ``input_ids`` (batch, seq) without padding (no attention mask). Weights tied across
layers (GPT-2's and BERT's output projection = the token embedding) are untied: the later layer
gets its own copy, with a warning, because the executor needs every parameter in one layer;
build the model with ``tie_word_embeddings=False`` to avoid it.

``transformers`` is imported lazily (only when a model is adapted or built): it is an optional,
test-time dependency of uniap.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uniap._torch_utils import attach_module
from uniap.errors import UniapError

__all__ = ["FAMILIES", "HFChain", "from_hf", "hf_example_batch", "tiny_hf_model"]

logger = logging.getLogger(__name__)

FAMILIES = ("gpt2", "llama", "bert")
"""Model families :func:`from_hf` adapts (``config.model_type``)."""

_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForMaskedLM"}
_CONFIGS = {"gpt2": "GPT2Config", "llama": "LlamaConfig", "bert": "BertConfig"}


class HFChain(nn.Module):
    """A Hugging Face model as a chain of its own modules (see the module docstring).

    Its children mirror the Hugging Face model's tree down to the chain's layers, so every
    parameter keeps its Hugging Face FQN.
    """

    def __init__(self, layer_fqns: list[str], *, name: str, hf_config: Any) -> None:
        super().__init__()
        self._layer_fqns = list(layer_fqns)
        self.uniap_name = name
        """Name used in plans (``hf-gpt2``, ``hf-llama``, ``hf-bert``)."""
        self.hf_config = hf_config
        """The Hugging Face config of the adapted model."""

    def uniap_layer_fqns(self) -> list[str]:
        """The layer chain, in execution order."""
        return list(self._layer_fqns)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits of the Hugging Face model for ``input_ids`` (batch, seq)."""
        x: Any = input_ids
        for fqn in self._layer_fqns:
            x = self.get_submodule(fqn)(x)
        return x


# ------------------------------------------------------------------------------ rebinding
@functools.cache
def _chain_class(base: type, forward: Callable[..., Any]) -> type:
    """A subclass of ``base`` whose ``forward`` is ``forward``; ``_hf_forward`` is base's."""
    return type(
        f"Chain{base.__name__}",
        (base,),
        {"forward": forward, "_hf_forward": base.forward, "__module__": __name__},
    )


def _rebind(module: nn.Module, forward: Callable[..., Any], **attrs: Any) -> nn.Module:
    """A new module of a subclass of ``type(module)`` sharing its parameters, buffers and
    children, with ``forward`` replaced and ``attrs`` set; its own hook and child tables."""
    cls = _chain_class(type(module), forward)
    new = cls.__new__(cls)
    for key, value in module.__dict__.items():
        new.__dict__[key] = copy.copy(value) if isinstance(value, dict | set) else value
    for key, value in attrs.items():
        setattr(new, key, value)
    return new


def _output(out: Any) -> Tensor:
    """The hidden states of a Hugging Face layer's return value (a tensor, or a tuple whose
    first element it is, in older ``transformers``)."""
    return out[0] if isinstance(out, tuple) else out


def _positions(x: Tensor) -> Tensor:
    return torch.arange(x.shape[1], device=x.device).unsqueeze(0)


# ------------------------------------------------------------------------------ forwards
def _gpt2_wpe_forward(self: nn.Embedding, x: Tensor) -> Tensor:
    """GPT2Model: ``drop(inputs_embeds + wpe(position_ids))``."""
    h = x + self._hf_forward(_positions(x)).to(x.device)
    return F.dropout(h, self.uniap_dropout_p, self.training)


def _gpt2_block_forward(self: nn.Module, x: Tensor) -> Tensor:
    """GPT2Model's call of a block: causal mask and position ids as the model makes them."""
    from transformers.masking_utils import create_causal_mask

    pos = _positions(x)
    mask = create_causal_mask(
        config=self.uniap_hf_config,
        inputs_embeds=x,
        attention_mask=None,
        past_key_values=None,
        position_ids=pos,
    )
    out = self._hf_forward(
        x, None, mask, None, encoder_attention_mask=None, use_cache=False, position_ids=pos
    )
    return _output(out)


def _llama_layer_forward(self: nn.Module, x: Tensor) -> Tensor:
    """LlamaModel's call of a decoder layer: causal mask, position ids, rotary (cos, sin)."""
    from transformers.masking_utils import create_causal_mask

    pos = _positions(x)
    mask = create_causal_mask(
        config=self.uniap_hf_config,
        inputs_embeds=x,
        attention_mask=None,
        past_key_values=None,
        position_ids=pos,
    )
    cos_sin = self.rotary_emb(x, position_ids=pos)
    out = self._hf_forward(
        x,
        attention_mask=mask,
        position_embeddings=cos_sin,
        position_ids=pos,
        past_key_values=None,
        use_cache=False,
    )
    return _output(out)


def _bert_layer_forward(self: nn.Module, x: Tensor) -> Tensor:
    """BertEncoder's call of a layer: the bidirectional mask BertModel makes without padding."""
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(
        config=self.uniap_hf_config, inputs_embeds=x, attention_mask=None
    )
    out = self._hf_forward(x, mask, None, encoder_attention_mask=None, past_key_values=None)
    return _output(out)


# ------------------------------------------------------------------------------ adapters
def _chain_gpt2(hf: nn.Module) -> list[tuple[str, nn.Module]]:
    t, cfg = hf.transformer, hf.config
    chain: list[tuple[str, nn.Module]] = [
        ("transformer.wte", t.wte),
        ("transformer.wpe", _rebind(t.wpe, _gpt2_wpe_forward, uniap_dropout_p=t.drop.p)),
    ]
    for i, block in enumerate(t.h):
        chain.append(
            (f"transformer.h.{i}", _rebind(block, _gpt2_block_forward, uniap_hf_config=cfg))
        )
    return [*chain, ("transformer.ln_f", t.ln_f), ("lm_head", hf.lm_head)]


def _chain_llama(hf: nn.Module) -> list[tuple[str, nn.Module]]:
    m, cfg = hf.model, hf.config
    chain: list[tuple[str, nn.Module]] = [("model.embed_tokens", m.embed_tokens)]
    for i, layer in enumerate(m.layers[: cfg.num_hidden_layers]):
        new = _rebind(layer, _llama_layer_forward, uniap_hf_config=cfg)
        new.add_module("rotary_emb", m.rotary_emb)
        chain.append((f"model.layers.{i}", new))
    return [*chain, ("model.norm", m.norm), ("lm_head", hf.lm_head)]


def _chain_bert(hf: nn.Module) -> list[tuple[str, nn.Module]]:
    b, cfg = hf.bert, hf.config
    if getattr(b, "pooler", None) is not None:
        raise UniapError(
            "BertForMaskedLM with a pooler is not supported (it is unused by the logits)"
        )
    chain: list[tuple[str, nn.Module]] = [("bert.embeddings", b.embeddings)]
    for i, layer in enumerate(b.encoder.layer):
        chain.append(
            (f"bert.encoder.layer.{i}", _rebind(layer, _bert_layer_forward, uniap_hf_config=cfg))
        )
    return [*chain, ("cls", hf.cls)]


_ADAPTERS = {"gpt2": _chain_gpt2, "llama": _chain_llama, "bert": _chain_bert}


def _untie(chain: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Give each layer that shares a parameter with an earlier layer its own copy of it."""
    owner: dict[int, str] = {}
    out = []
    for fqn, module in chain:
        tied = {
            id(p): (name, owner[id(p)]) for name, p in module.named_parameters() if id(p) in owner
        }
        if tied:  # deep-copy the layer, sharing everything but the tied parameters
            keep: dict[int, Any] = {
                id(t): t for t in [*module.parameters(), *module.buffers()] if id(t) not in tied
            }
            module = copy.deepcopy(module, keep)
            for name, other in sorted(tied.values()):
                logger.warning(
                    "%s.%s is tied to a parameter of %s; uniap untied it (a copy, trained "
                    "separately): build the model with tie_word_embeddings=False to avoid this",
                    fqn,
                    name,
                    other,
                )
        for p in module.parameters():
            owner.setdefault(id(p), fqn)
        out.append((fqn, module))
    return out


def from_hf(model: nn.Module) -> HFChain:
    """The chain-executable :class:`HFChain` of a Hugging Face ``GPT2LMHeadModel``,
    ``LlamaForCausalLM`` or ``BertForMaskedLM`` (sharing its parameters; see the module
    docstring). Raises :class:`~uniap.errors.UniapError` for any other model."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in _ADAPTERS or type(model).__name__ != _CLASSES[family]:
        raise UniapError(
            f"{type(model).__name__} (model_type {family!r}) has no uniap adapter; supported: "
            + ", ".join(_CLASSES.values())
        )
    if getattr(config, "add_cross_attention", False):
        raise UniapError(f"{type(model).__name__} with cross-attention is not supported")
    chain = _untie(_ADAPTERS[family](model))
    out = HFChain([fqn for fqn, _ in chain], name=f"hf-{family}", hf_config=config)
    for fqn, module in chain:
        attach_module(out, fqn, module)
    out.train(model.training)
    logger.info(
        "adapted %s: %d layers (%s .. %s)",
        type(model).__name__,
        len(chain),
        chain[0][0],
        chain[-1][0],
    )
    return out


# ------------------------------------------------------------------------------ tiny models
def tiny_hf_model(family: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """A small, randomly initialised Hugging Face model of ``family`` (``gpt2``, ``llama``,
    ``bert``) built from a config, never downloaded: hidden 64, 4 heads (Llama: 2 kv heads),
    2 layers, vocabulary 256, 32 positions, no dropout; ``overrides`` replace any config field.
    Same ``seed``, same weights."""
    import transformers

    common = {"vocab_size": 256, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    defaults = {
        "gpt2": dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
        "llama": dict(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        ),
        "bert": dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
    }
    if family not in defaults:
        raise UniapError(f"unknown family {family!r}; one of {list(FAMILIES)}")
    config_cls = getattr(transformers, _CONFIGS[family])
    config = config_cls(**{**common, **defaults[family], **overrides})  # overrides replace
    torch.manual_seed(seed)
    return getattr(transformers, _CLASSES[family])(config)


def hf_example_batch(
    model: nn.Module, batch_size: int, *, seq_len: int = 32, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Random ``(input_ids, targets)`` for a (adapted) Hugging Face model: next-token targets
    for causal LMs, random token targets at every position for BERT. Deterministic in ``seed``."""
    config = getattr(model, "hf_config", None) or model.config
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(config.vocab_size, (batch_size, seq_len + 1), generator=gen)
    if config.model_type == "bert":
        return seq[:, :-1].contiguous(), torch.randint(
            config.vocab_size, (batch_size, seq_len), generator=gen
        )
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
