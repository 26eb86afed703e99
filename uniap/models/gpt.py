"""Decoder-only language models: GPT-style and Llama-style, one class.

GPT-style (``style="gpt"``): LayerNorm, GELU MLP, learned position embedding, biases.
Llama-style (``style="llama"``): RMSNorm, SwiGLU MLP (``gate_proj``/``up_proj``/``down_proj``),
rotary embeddings computed inside attention, grouped-query attention (``n_kv_heads``), no
biases.

Layer chain (``model.uniap_layer_fqns()``): ``embed``, ``blocks.0`` .. ``blocks.{n-1}``,
``norm``, ``head``; ``model(ids)`` equals running them in order on token ids (b, seq_len),
and returns logits (b, seq_len, vocab_size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from uniap.errors import ConfigError
from uniap.models.layers import PreNormBlock, make_norm

__all__ = ["GPT", "GPTConfig", "TokenEmbedding", "gpt_example_batch"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a decoder-only language model."""

    vocab_size: int = 256
    """Vocabulary size (embedding rows, head outputs)."""
    seq_len: int = 32
    """Training sequence length (and the size of the learned position table, GPT-style)."""
    dim: int = 64
    """Hidden size."""
    n_layers: int = 4
    """Number of decoder blocks."""
    n_heads: int = 4
    """Attention (query) heads."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means ``n_heads``."""
    ffn_dim: int | None = None
    """MLP hidden size; None means ``4 * dim``."""
    style: str = "gpt"
    """``"gpt"`` (LayerNorm, GELU, learned positions, biases) or ``"llama"`` (RMSNorm, SwiGLU,
    rotary, no biases)."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    rope_theta: float = 10000.0
    """Rotary base (Llama-style only)."""

    def __post_init__(self) -> None:
        if self.style not in ("gpt", "llama"):
            raise ConfigError(f"style must be 'gpt' or 'llama', got {self.style!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})"
            )

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used."""
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """MLP hidden size actually used."""
        return self.ffn_dim or 4 * self.dim


class TokenEmbedding(nn.Module):
    """Token embedding, plus a learned position embedding when ``max_positions`` is given;
    maps ids (b, s) to (b, s, dim)."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int | None = None) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_positions, dim) if max_positions else None

    def forward(self, ids: Tensor) -> Tensor:
        h = self.token(ids)
        if self.position is not None:
            h = h + self.position(torch.arange(ids.shape[1], device=ids.device))
        return h


class GPT(nn.Module):
    """Decoder-only transformer: ``embed`` -> ``blocks`` -> ``norm`` -> ``head`` (untied)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        llama = config.style == "llama"
        self.embed = TokenEmbedding(
            config.vocab_size, config.dim, None if llama else config.seq_len
        )
        self.blocks = nn.ModuleList(
            PreNormBlock(
                config.dim,
                config.n_heads,
                config.hidden_dim,
                n_kv_heads=config.kv_heads,
                norm="rmsnorm" if llama else "layernorm",
                norm_eps=config.norm_eps,
                activation="silu" if llama else "gelu",
                gated=llama,
                bias=not llama,
                causal=True,
                rope_theta=config.rope_theta if llama else None,
            )
            for _ in range(config.n_layers)
        )
        self.norm = make_norm("rmsnorm" if llama else "layernorm", config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)

    def uniap_layer_fqns(self) -> list[str]:
        """The pipeline-splittable layer chain, in execution order."""
        return ["embed", *(f"blocks.{i}" for i in range(len(self.blocks))), "norm", "head"]

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def gpt_example_batch(
    config: GPTConfig, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random next-token batch: ids (b, seq_len) and targets = ids shifted by one."""
    seq = torch.randint(config.vocab_size, (batch_size, config.seq_len + 1), generator=generator)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
