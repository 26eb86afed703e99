"""Swin transformer (hierarchical, windowed attention), chain-executable.

Layer chain: ``embed`` (Conv2d patch embedding + LayerNorm), then per stage ``i`` its blocks
``stages.i.blocks.j`` and, between stages, ``stages.i.downsample`` (``PatchMerging``: the
resolution halves, the channels double), then ``norm`` and ``head`` (mean pooling + Linear).
Every block and merge takes and returns a (b, h * w, channels) tensor; the spatial resolution
is stored in the module, so the chain carries one tensor. Blocks of different stages have
different widths, so the layers are not uniform.

Blocks use windowed multi-head self-attention (window partition by reshape) with the usual
q/k/v/o projections; odd blocks shift the windows by half a window (``torch.roll``) and mask
attention across the wrapped-around regions. Simplification: no relative position bias
table. When a stage's resolution is not larger than the window, the window covers the whole
map and there is no shift (as in the reference implementation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from uniap.errors import ConfigError
from uniap.models.layers import MLP, Attention, ClassifierHead

__all__ = [
    "PatchMerging",
    "Swin",
    "SwinBlock",
    "SwinConfig",
    "SwinPatchEmbedding",
    "SwinStage",
    "swin_example_batch",
]


@dataclass(frozen=True)
class SwinConfig:
    """Shape of a Swin transformer classifier."""

    image_size: int = 32
    """Input image height and width in pixels."""
    patch_size: int = 4
    """Patch size of the embedding in pixels."""
    num_classes: int = 10
    """Classifier outputs."""
    embed_dim: int = 16
    """Channels of the first stage (doubled by each merge)."""
    depths: tuple[int, ...] = (2, 2)
    """Blocks per stage."""
    n_heads: tuple[int, ...] = (2, 4)
    """Attention heads per stage."""
    window_size: int = 4
    """Window side in tokens."""
    mlp_ratio: int = 4
    """MLP hidden size / channels."""
    in_channels: int = 3
    """Image channels."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.n_heads):
            raise ConfigError(
                f"depths ({list(self.depths)}) and n_heads ({list(self.n_heads)}) need one "
                "entry per stage"
            )
        res = self.image_size // self.patch_size
        if self.image_size % self.patch_size or res % (2 ** (len(self.depths) - 1)):
            raise ConfigError(
                f"image_size ({self.image_size}) / patch_size ({self.patch_size}) must be an "
                f"integer divisible by 2^(stages - 1) = {2 ** (len(self.depths) - 1)}"
            )
        for i, heads in enumerate(self.n_heads):
            if self.stage_dim(i) % heads:
                raise ConfigError(
                    f"stage {i}: channels ({self.stage_dim(i)}) must be divisible by heads "
                    f"({heads})"
                )

    def stage_dim(self, stage: int) -> int:
        """Channels of stage ``stage``."""
        return self.embed_dim * 2**stage

    def stage_resolution(self, stage: int) -> int:
        """Side of the token map of stage ``stage``."""
        return self.image_size // self.patch_size // 2**stage


def _window_partition(x: Tensor, window: int) -> Tensor:
    """(b, h, w, c) -> (b * num_windows, window * window, c)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _window_reverse(windows: Tensor, window: int, b: int, h: int, w: int) -> Tensor:
    """(b * num_windows, window * window, c) -> (b, h, w, c)."""
    x = windows.view(b, h // window, w // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, -1)


class SwinPatchEmbedding(nn.Module):
    """Images (b, c, size, size) -> LayerNorm(Conv2d patches) as tokens (b, h * w, dim)."""

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.embed_dim, kernel_size=p, stride=p)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)

    def forward(self, images: Tensor) -> Tensor:
        return self.norm(self.proj(images).flatten(2).transpose(1, 2))


class SwinBlock(nn.Module):
    """Pre-LN block with (shifted-)window attention on a (b, res * res, dim) token map."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        resolution: int,
        window_size: int,
        shift: bool,
        mlp_ratio: int = 4,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.window_size = min(window_size, resolution)
        self.shift_size = self.window_size // 2 if shift and resolution > window_size else 0
        self.attn_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_heads, causal=False)
        self.mlp_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, mlp_ratio * dim, activation="gelu")

    def _shift_mask(self, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Additive mask (batch * windows, 1, n, n) that stops attention across the regions
        the cyclic shift wrapped around."""
        r, ws, s = self.resolution, self.window_size, self.shift_size
        region = torch.zeros(1, r, r, 1, device=device)
        label = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                region[:, hs, wsl, :] = label
                label += 1
        ids = _window_partition(region, ws).squeeze(-1)  # (windows, n)
        differs = ids.unsqueeze(1) != ids.unsqueeze(2)  # (windows, n, n)
        mask = torch.zeros(differs.shape, device=device, dtype=dtype).masked_fill(differs, -1e4)
        n_win, n = ids.shape
        return mask.unsqueeze(0).expand(batch, n_win, n, n).reshape(batch * n_win, 1, n, n)

    def forward(self, x: Tensor) -> Tensor:
        b, length, c = x.shape
        r, ws, s = self.resolution, self.window_size, self.shift_size
        if length != r * r:
            raise ValueError(f"SwinBlock expects {r}x{r} = {r * r} tokens, got {length}")
        y = self.attn_norm(x).view(b, r, r, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        mask = self._shift_mask(b, x.device, x.dtype) if s else None
        windows = self.attn(_window_partition(y, ws), attn_mask=mask)
        y = _window_reverse(windows, ws, b, r, r)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, length, c)
        return x + self.mlp(self.mlp_norm(x))


class PatchMerging(nn.Module):
    """2x2 neighbour merge: (b, r * r, dim) -> (b, r/2 * r/2, 2 * dim)."""

    def __init__(self, dim: int, *, resolution: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        r = self.resolution
        x = x.view(b, r, r, c)
        parts = (x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2])
        x = torch.cat(parts, dim=-1).view(b, (r // 2) ** 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """One resolution: ``blocks``, then ``downsample`` (PatchMerging) except after the last."""

    def __init__(self, config: SwinConfig, stage: int) -> None:
        super().__init__()
        c = config
        dim, res = c.stage_dim(stage), c.stage_resolution(stage)
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                c.n_heads[stage],
                resolution=res,
                window_size=c.window_size,
                shift=j % 2 == 1,
                mlp_ratio=c.mlp_ratio,
                norm_eps=c.norm_eps,
            )
            for j in range(c.depths[stage])
        )
        last = stage == len(c.depths) - 1
        self.downsample = None if last else PatchMerging(dim, resolution=res, norm_eps=c.norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class Swin(nn.Module):
    """Swin classifier: ``embed`` -> ``stages`` -> ``norm`` -> ``head`` (mean pool)."""

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = SwinPatchEmbedding(config)
        self.stages = nn.ModuleList(SwinStage(config, i) for i in range(len(config.depths)))
        last_dim = config.stage_dim(len(config.depths) - 1)
        self.norm = nn.LayerNorm(last_dim, eps=config.norm_eps)
        self.head = ClassifierHead(last_dim, config.num_classes, pool="mean")

    def uniap_layer_fqns(self) -> list[str]:
        """The chain: embed, every block and merge of every stage in order, norm, head."""
        fqns = ["embed"]
        for i, stage in enumerate(self.stages):
            fqns += [f"stages.{i}.blocks.{j}" for j in range(len(stage.blocks))]
            if stage.downsample is not None:
                fqns.append(f"stages.{i}.downsample")
        return [*fqns, "norm", "head"]

    def forward(self, images: Tensor) -> Tensor:
        x = self.embed(images)
        for stage in self.stages:
            x = stage(x)
        return self.head(self.norm(x))


def swin_example_batch(
    config: SwinConfig, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random images (b, channels, size, size) and class labels (b,)."""
    shape = (batch_size, config.in_channels, config.image_size, config.image_size)
    images = torch.randn(shape, generator=generator)
    return images, torch.randint(config.num_classes, (batch_size,), generator=generator)
