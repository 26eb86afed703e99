"""T5-style encoder-decoder, chain-executable with a single tensor.

Packing (how one tensor carries both streams through the chain):

- input: token ids (b, 2, seq_len); row 0 = encoder input ids, row 1 = decoder input ids;
- ``embed`` (the shared ``nn.Embedding``) maps them to a float tensor (b, 2, seq_len, dim);
- ``encoder.blocks.i`` update stream 0 (bidirectional self-attention + MLP) and pass stream 1
  through unchanged; ``encoder.norm`` normalises stream 0;
- ``decoder.blocks.i`` read stream 0 as the encoder output (keys and values of the
  cross-attention) and update stream 1 (causal self-attention, cross-attention, MLP), passing
  stream 0 on, so every decoder block really consumes the encoder output (and its gradient
  flows back to the encoder); ``decoder.norm`` normalises stream 1;
- ``head`` maps stream 1 to vocabulary logits (b, seq_len, vocab_size).

T5 details kept: RMSNorm, pre-norm blocks, ReLU MLP, no biases. Simplifications: rotary
position embeddings in the self-attentions instead of T5's relative position buckets (no
parameters either), encoder and decoder share ``seq_len``, and the head is untied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from uniap.errors import ConfigError
from uniap.models.layers import MLP, Attention

__all__ = [
    "T5",
    "T5Config",
    "T5DecoderBlock",
    "T5EncoderBlock",
    "T5Stack",
    "StreamHead",
    "StreamRMSNorm",
    "t5_example_batch",
]

ENCODER_STREAM = 0
DECODER_STREAM = 1


@dataclass(frozen=True)
class T5Config:
    """Shape of a T5-style encoder-decoder."""

    vocab_size: int = 256
    """Vocabulary size (shared embedding rows, head outputs)."""
    seq_len: int = 32
    """Encoder and decoder sequence length."""
    dim: int = 64
    """Model width (``d_model``)."""
    n_layers: int = 2
    """Encoder blocks."""
    n_decoder_layers: int = 2
    """Decoder blocks."""
    n_heads: int = 4
    """Attention heads."""
    ffn_dim: int = 256
    """MLP hidden size (``d_ff``)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Rotary base of the self-attentions."""

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")


def _replace_stream(x: Tensor, stream: int, value: Tensor) -> Tensor:
    """``x`` (b, 2, ...) with stream ``stream`` replaced by ``value`` (out of place)."""
    parts = [value if i == stream else x[:, i] for i in range(x.shape[1])]
    return torch.stack(parts, dim=1)


class StreamRMSNorm(nn.RMSNorm):
    """RMSNorm applied to one stream of the packed (b, 2, s, dim) tensor."""

    def __init__(self, dim: int, *, stream: int, eps: float) -> None:
        super().__init__(dim, eps=eps)
        self.stream = stream

    def forward(self, x: Tensor) -> Tensor:
        return _replace_stream(x, self.stream, super().forward(x[:, self.stream]))


class StreamHead(nn.Linear):
    """Linear head on the decoder stream: (b, 2, s, dim) -> logits (b, s, vocab)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x[:, DECODER_STREAM])


class T5EncoderBlock(nn.Module):
    """Encoder block on stream 0: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        c = config
        self.attn_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.attn = Attention(c.dim, c.n_heads, bias=False, rope_theta=c.rope_theta)
        self.mlp_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.mlp = MLP(c.dim, c.ffn_dim, activation="relu", bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = x[:, ENCODER_STREAM]
        h = h + self.attn(self.attn_norm(h))
        h = h + self.mlp(self.mlp_norm(h))
        return _replace_stream(x, ENCODER_STREAM, h)


class T5DecoderBlock(nn.Module):
    """Decoder block on stream 1: causal self-attention, cross-attention over stream 0, MLP."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        c = config
        self.attn_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.attn = Attention(c.dim, c.n_heads, bias=False, causal=True, rope_theta=c.rope_theta)
        self.cross_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.cross_attn = Attention(c.dim, c.n_heads, bias=False)
        self.mlp_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.mlp = MLP(c.dim, c.ffn_dim, activation="relu", bias=False)

    def forward(self, x: Tensor) -> Tensor:
        enc = x[:, ENCODER_STREAM]
        h = x[:, DECODER_STREAM]
        h = h + self.attn(self.attn_norm(h))
        h = h + self.cross_attn(self.cross_norm(h), context=enc)
        h = h + self.mlp(self.mlp_norm(h))
        return _replace_stream(x, DECODER_STREAM, h)


class T5Stack(nn.Module):
    """``blocks`` then the final ``norm`` of one side (encoder or decoder)."""

    def __init__(self, blocks: list[nn.Module], norm: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class T5(nn.Module):
    """T5-style encoder-decoder over packed ids (b, 2, seq_len); see the module docstring."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        c = config
        self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.encoder = T5Stack(
            [T5EncoderBlock(c) for _ in range(c.n_layers)],
            StreamRMSNorm(c.dim, stream=ENCODER_STREAM, eps=c.norm_eps),
        )
        self.decoder = T5Stack(
            [T5DecoderBlock(c) for _ in range(c.n_decoder_layers)],
            StreamRMSNorm(c.dim, stream=DECODER_STREAM, eps=c.norm_eps),
        )
        self.head = StreamHead(c.dim, c.vocab_size, bias=False)

    def uniap_layer_fqns(self) -> list[str]:
        """The chain: embed, encoder blocks, encoder norm, decoder blocks, decoder norm, head."""
        enc = [f"encoder.blocks.{i}" for i in range(len(self.encoder.blocks))]
        dec = [f"decoder.blocks.{i}" for i in range(len(self.decoder.blocks))]
        return ["embed", *enc, "encoder.norm", *dec, "decoder.norm", "head"]

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 3 or ids.shape[1] != 2:
            raise ValueError(
                f"T5 expects packed ids (batch, 2, seq_len) (encoder row 0, decoder row 1), "
                f"got shape {tuple(ids.shape)}"
            )
        return self.head(self.decoder(self.encoder(self.embed(ids))))


def t5_example_batch(
    config: T5Config, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random packed ids (b, 2, seq_len) and decoder targets (b, seq_len).

    Row 1 (decoder input) is the target sequence shifted right by one, as in teacher forcing.
    """
    v, s = config.vocab_size, config.seq_len
    enc = torch.randint(v, (batch_size, s), generator=generator)
    targets = torch.randint(v, (batch_size, s), generator=generator)
    dec = torch.cat((torch.zeros(batch_size, 1, dtype=targets.dtype), targets[:, :-1]), dim=1)
    return torch.stack((enc, dec), dim=1), targets
