"""Building blocks shared by the reference models: attention, MLP, norms, rotary, init.

Tensor-parallel friendly by construction: attention has separate ``q_proj``/``k_proj``/
``v_proj`` (column-wise) and ``o_proj`` (row-wise), the MLP has ``up_proj`` [+ ``gate_proj``]
then ``down_proj``, and heads are reshaped with ``view(b, s, -1, head_dim)`` so a shard holding
``n_heads / tp`` local heads runs the same code.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "Attention",
    "ClassifierHead",
    "PreNormBlock",
    "apply_rotary",
    "cross_entropy_loss",
    "init_weights",
    "make_norm",
]

_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """``nn.LayerNorm`` (``kind="layernorm"``) or ``nn.RMSNorm`` (``kind="rmsnorm"``)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; use 'layernorm' or 'rmsnorm'")


def apply_rotary(x: Tensor, theta: float) -> Tensor:
    """Rotary position embedding (rotate-half convention) of ``x`` shaped (b, s, heads, head_dim).

    The angles are computed on the fly from the positions ``0..s-1``: no buffer, so the module
    works unchanged after ``to_empty`` from the meta device.
    """
    s, d = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(s, device=x.device, dtype=torch.float32), inv_freq)
    cos = angles.cos()[None, :, None, :]
    sin = angles.sin()[None, :, None, :]
    xf = x.float()
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with grouped-query support and optional rotary / causal masking.

    ``forward(x, context=None, attn_mask=None)``: self-attention on ``x`` (b, s, dim), or
    cross-attention when ``context`` (b, s_kv, kv_dim) is given (keys and values from it).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        kv_dim: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        causal: bool = False,
        rope_theta: float | None = None,
    ) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if head_dim is None:
            if dim % n_heads:
                raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
            head_dim = dim // n_heads
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.causal = causal
        self.rope_theta = rope_theta
        kv_dim = kv_dim or dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)

    def forward(
        self, x: Tensor, context: Tensor | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        b, s, _ = x.shape
        kv = x if context is None else context
        s_kv = kv.shape[1]
        # -1, never self.n_heads: a tensor-parallel shard holds n_heads / tp local heads
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(kv).view(b, s_kv, -1, self.head_dim)
        v = self.v_proj(kv).view(b, s_kv, -1, self.head_dim)
        if self.rope_theta is not None:
            q, k = apply_rotary(q, self.rope_theta), apply_rotary(k, self.rope_theta)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if k.shape[1] != q.shape[1]:  # grouped-query attention: share each kv head
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """Feed-forward: ``down_proj(act(up_proj(x)))``, or gated (SwiGLU)
    ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)}"
            )
        self.activation = activation
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias) if gated else None
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        act = _ACTIVATIONS[self.activation]
        if self.gate_proj is not None:
            h = act(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = act(self.up_proj(x))
        return self.down_proj(h)


class PreNormBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(attn_norm(x))`` then ``x + mlp(mlp_norm(x))``."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        ffn_dim: int,
        *,
        n_kv_heads: int | None = None,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
        causal: bool = False,
        rope_theta: float | None = None,
    ) -> None:
        super().__init__()
        self.attn_norm = make_norm(norm, dim, norm_eps)
        self.attn = Attention(
            dim, n_heads, n_kv_heads, bias=bias, causal=causal, rope_theta=rope_theta
        )
        self.mlp_norm = make_norm(norm, dim, norm_eps)
        self.mlp = MLP(dim, ffn_dim, activation=activation, gated=gated, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ClassifierHead(nn.Module):
    """Pools a (b, tokens, dim) sequence (``pool="cls"``: token 0; ``"mean"``: average) and
    projects to class logits (b, num_classes)."""

    def __init__(self, dim: int, num_classes: int, *, pool: str = "cls") -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"unknown pooling {pool!r}; use 'cls' or 'mean'")
        self.pool = pool
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        pooled = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return self.fc(pooled)


def cross_entropy_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits (..., classes) against integer targets (...): token-level
    for language models, sample-level for classifiers."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def _fqn_seed(seed: int, fqn: str) -> int:
    digest = hashlib.sha256(f"{seed}:{fqn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def init_weights(
    module: nn.Module, *, seed: int = 0, std: float = 0.02, prefix: str = ""
) -> nn.Module:
    """Initialise every parameter deterministically from ``seed`` and its FQN; returns ``module``.

    Norm weights are 1, biases 0, everything else ``N(0, std^2)`` drawn from a CPU generator
    seeded by ``(seed, module FQN)``. The values thus depend only on the seed and the name,
    never on the device, the construction order or which other layers exist: a pipeline stage
    that materialises only its layers (``init_weights(block, seed=s, prefix="blocks.3")``)
    gets exactly the weights of the full model built with seed ``s``.
    """
    for fqn, mod in module.named_modules(prefix=prefix):
        own = list(mod.named_parameters(recurse=False))
        if not own:
            continue
        gen = torch.Generator(device="cpu").manual_seed(_fqn_seed(seed, fqn))
        for name, p in own:
            if isinstance(mod, _NORMS) and name == "weight":
                p.fill_(1.0)
            elif name == "bias":
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std))
    return module
