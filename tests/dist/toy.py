"""A tiny chain-executable transformer with hand-written layer descriptions (TP plans), so the
executor's tests do not depend on graph extraction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uniap.contract import LayerStrategy, Plan, Stage, Strategy
from uniap.graph import Layer, TPPair

VOCAB, SEQ, DIM, HEADS, FFN = 32, 8, 16, 4, 32


class Embed(nn.Module):
    """Token + position embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos


class Block(nn.Module):
    """Pre-norm block; heads reshaped with -1 so TP shards run the same code."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.q = nn.Linear(DIM, DIM, bias=False)
        self.k = nn.Linear(DIM, DIM, bias=False)
        self.v = nn.Linear(DIM, DIM, bias=False)
        self.o = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, FFN)
        self.fc2 = nn.Linear(FFN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm1(x)
        q, k, v = (
            p(h).view(b, s, -1, DIM // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Head(nn.Module):
    """Final norm + vocabulary projection."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.proj = nn.Linear(DIM, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class Toy(nn.Module):
    """``embed`` -> ``blocks.0..n-1`` -> ``head``."""

    def __init__(self, n_blocks: int = 2) -> None:
        super().__init__()
        self.embed = Embed()
        self.blocks = nn.ModuleList(Block() for _ in range(n_blocks))
        self.head = Head()

    def uniap_layer_fqns(self) -> list[str]:
        return ["embed", *(f"blocks.{i}" for i in range(len(self.blocks))), "head"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def build_toy(n_blocks: int = 2, seed: int = 0) -> Toy:
    """Same weights for the same seed on every process."""
    torch.manual_seed(seed)
    return Toy(n_blocks)


def toy_init_weights(layer: nn.Module) -> None:
    """Initialise one toy layer in place (for a model built on the meta device)."""
    for m in layer.modules():
        if isinstance(m, Embed):
            nn.init.normal_(m.pos, std=0.02)
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


def toy_layers(n_blocks: int = 2) -> dict[str, Layer]:
    """Hand-written layer descriptions: blocks have two TP pairs."""
    pairs = (
        TPPair(("q", "k", "v"), "o", 4.0 * SEQ * DIM),
        TPPair(("fc1",), "fc2", 4.0 * SEQ * DIM),
    )
    out = {
        "embed": Layer("embed", "Embed", 0, 0, 0, 0, 0, 0),
        "head": Layer("head", "Head", 0, 0, 0, 0, 0, 0),
    }
    for i in range(n_blocks):
        out[f"blocks.{i}"] = Layer(
            f"blocks.{i}", "Block", 0, 0, 0, 0, 0, 0, tp_pairs=pairs, tp_divisors=(HEADS, FFN)
        )
    return out


def toy_batch(batch_size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and next-token targets."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(VOCAB, (batch_size, SEQ + 1), generator=g)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def toy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_plan(
    fqns: list[str],
    world_size: int,
    stages: list[list[tuple]],
    *,
    global_batch_size: int,
    num_microbatches: int,
    schedule: str = "GPipe",
    split: list[int] | None = None,
    model_name: str = "toy",
    signature: str = "toy",
) -> Plan:
    """A plan from per-stage strategy lists; ``split`` = layers per stage (even by default).

    ``stages[i]`` is either one ``(dp, tp, kind)`` for all of stage i's layers, or one per layer;
    a fourth element ``True`` turns on ``recompute`` (activation checkpointing).
    """
    pp = len(stages)
    g = world_size // pp
    if split is None:
        base, extra = divmod(len(fqns), pp)
        split = [base + (1 if i < extra else 0) for i in range(pp)]
    out, pos = [], 0
    for i, strat in enumerate(stages):
        n = split[i]
        names = fqns[pos : pos + n]
        pos += n
        per = strat if len(strat) == n and isinstance(strat[0], tuple) else [strat[0]] * n
        layers = tuple(LayerStrategy(f, Strategy(*strategy)) for f, strategy in zip(names, per))
        out.append(Stage(tuple(range(i * g, (i + 1) * g)), layers))
    return Plan(
        model_name=model_name,
        model_signature=signature,
        num_layers=len(fqns),
        world_size=world_size,
        global_batch_size=global_batch_size,
        num_microbatches=num_microbatches,
        schedule=schedule,
        stages=tuple(out),
    )


def toy_signature(n_blocks: int = 2, dtype: torch.dtype | None = None) -> str:
    """``ModelGraph.signature`` of the toy (what ``parallelize`` checks plans against), with
    the graph in compute ``dtype`` (a plan's precision; default the model's)."""
    from uniap.graph import build_graph

    return build_graph(build_toy(n_blocks), toy_batch(2)[0], dtype=dtype).signature


def toy_fqns(n_blocks: int = 2) -> list[str]:
    """The toy's layer chain."""
    return ["embed", *(f"blocks.{i}" for i in range(n_blocks)), "head"]


SEQ_DIM, SEQ_HIDDEN = 16, 64


def build_sequential(seed: int = 0) -> nn.Sequential:
    """A plain ``nn.Sequential`` MLP stack (no uniap hooks): its children are the layers."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(SEQ_DIM, SEQ_HIDDEN),
        nn.GELU(),
        nn.Linear(SEQ_HIDDEN, SEQ_HIDDEN),
        nn.GELU(),
        nn.Linear(SEQ_HIDDEN, SEQ_HIDDEN),
        nn.LayerNorm(SEQ_HIDDEN),
        nn.Linear(SEQ_HIDDEN, SEQ_DIM),
    )


def sequential_batch(batch_size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random regression inputs and targets for :func:`build_sequential`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, SEQ_DIM, generator=g), torch.randn(
        batch_size, SEQ_DIM, generator=g
    )
