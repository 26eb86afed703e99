"""Bidirectional encoders: BERT (masked language model) and ViT (image classifier).

BERT: ``embed`` (token + position + token-type embeddings, then LayerNorm; token types are all
0 since the chain carries one tensor), post-LN ``blocks``, and ``head`` (the MLM transform:
dense, GELU, LayerNorm, then the untied decoder Linear to the vocabulary). Input ids
(b, seq_len) -> logits (b, seq_len, vocab_size).

ViT: ``embed`` (Conv2d patch embedding, a cls token, learned positions), pre-LN ``blocks``,
``norm``, ``head`` (Linear on the cls token). Images (b, channels, size, size) -> logits
(b, num_classes).

Both are chain-executable: ``model(x)`` equals running ``model.uniap_layer_fqns()`` in order.
Attention and MLP use the shared ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and
``up_proj``/``down_proj`` names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uniap.errors import ConfigError
from uniap.models.layers import MLP, Attention, ClassifierHead, PreNormBlock

__all__ = [
    "BERT",
    "ViT",
    "BertConfig",
    "BertEmbedding",
    "MLMHead",
    "PatchEmbedding",
    "PostNormBlock",
    "ViTConfig",
    "bert_example_batch",
    "vit_example_batch",
]


@dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT masked language model."""

    vocab_size: int = 256
    """Vocabulary size."""
    seq_len: int = 32
    """Sequence length (and position table size)."""
    dim: int = 64
    """Hidden size."""
    n_layers: int = 2
    """Number of encoder blocks."""
    n_heads: int = 4
    """Attention heads."""
    ffn_dim: int = 256
    """MLP hidden size."""
    type_vocab_size: int = 2
    """Token-type (segment) embedding rows."""
    norm_eps: float = 1e-12
    """LayerNorm epsilon."""

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a Vision Transformer classifier."""

    image_size: int = 32
    """Input image height and width in pixels."""
    patch_size: int = 8
    """Patch height and width in pixels."""
    num_classes: int = 10
    """Classifier outputs."""
    dim: int = 64
    """Hidden size."""
    n_layers: int = 2
    """Number of encoder blocks."""
    n_heads: int = 4
    """Attention heads."""
    ffn_dim: int = 256
    """MLP hidden size."""
    in_channels: int = 3
    """Image channels."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size ({self.image_size}) must be divisible by patch_size "
                f"({self.patch_size})"
            )
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")

    @property
    def num_patches(self) -> int:
        """Patches per image (tokens before the cls token)."""
        return (self.image_size // self.patch_size) ** 2


class BertEmbedding(nn.Module):
    """Token + position + token-type (all type 0) embeddings, then LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.dim)
        self.position = nn.Embedding(config.seq_len, config.dim)
        self.token_type = nn.Embedding(config.type_vocab_size, config.dim)
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        types = torch.zeros_like(ids)
        return self.norm(self.token(ids) + self.position(positions) + self.token_type(types))


class PostNormBlock(nn.Module):
    """Post-LN encoder block (BERT): ``attn_norm(x + attn(x))`` then ``mlp_norm(x + mlp(x))``."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int, *, norm_eps: float) -> None:
        super().__init__()
        self.attn = Attention(dim, n_heads)
        self.attn_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, ffn_dim, activation="gelu")
        self.mlp_norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn_norm(x + self.attn(x))
        return self.mlp_norm(x + self.mlp(x))


class MLMHead(nn.Module):
    """BERT's masked-LM head: ``decoder(norm(gelu(dense(x))))``, untied from the embedding."""

    def __init__(self, dim: int, vocab_size: int, *, norm_eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


class BERT(nn.Module):
    """BERT masked language model: ``embed`` -> ``blocks`` -> ``head``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = BertEmbedding(config)
        self.blocks = nn.ModuleList(
            PostNormBlock(config.dim, config.n_heads, config.ffn_dim, norm_eps=config.norm_eps)
            for _ in range(config.n_layers)
        )
        self.head = MLMHead(config.dim, config.vocab_size, norm_eps=config.norm_eps)

    def uniap_layer_fqns(self) -> list[str]:
        """The pipeline-splittable layer chain, in execution order."""
        return ["embed", *(f"blocks.{i}" for i in range(len(self.blocks))), "head"]

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class PatchEmbedding(nn.Module):
    """Conv2d patch embedding, prepended cls token and learned positions: images
    (b, c, size, size) -> tokens (b, 1 + num_patches, dim)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            config.in_channels, config.dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.position = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.dim))

    def forward(self, images: Tensor) -> Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + self.position


class ViT(nn.Module):
    """Vision Transformer: ``embed`` -> pre-LN ``blocks`` -> ``norm`` -> ``head``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = PatchEmbedding(config)
        self.blocks = nn.ModuleList(
            PreNormBlock(
                config.dim, config.n_heads, config.ffn_dim, norm_eps=config.norm_eps, causal=False
            )
            for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.head = ClassifierHead(config.dim, config.num_classes, pool="cls")

    def uniap_layer_fqns(self) -> list[str]:
        """The pipeline-splittable layer chain, in execution order."""
        return ["embed", *(f"blocks.{i}" for i in range(len(self.blocks))), "norm", "head"]

    def forward(self, images: Tensor) -> Tensor:
        h = self.embed(images)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def bert_example_batch(
    config: BertConfig, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random ids (b, seq_len) and random MLM targets (b, seq_len) at every position."""
    ids = torch.randint(config.vocab_size, (batch_size, config.seq_len), generator=generator)
    targets = torch.randint(config.vocab_size, (batch_size, config.seq_len), generator=generator)
    return ids, targets


def vit_example_batch(
    config: ViTConfig, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random images (b, channels, size, size) and class labels (b,)."""
    shape = (batch_size, config.in_channels, config.image_size, config.image_size)
    images = torch.randn(shape, generator=generator)
    return images, torch.randint(config.num_classes, (batch_size,), generator=generator)
