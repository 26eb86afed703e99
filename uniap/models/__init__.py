"""Reference models (random init, plain torch) and their preset registry.

Every model is *chain-executable*: ``model(x)`` equals ``run_chain`` over
``model.uniap_layer_fqns()``, each layer taking one tensor and returning one tensor whose dim 0
is the batch. Presets:

=============  ==========================================================================
name           shape
=============  ==========================================================================
gpt-tiny       GPT-style, 4 blocks, hidden 64, 4 heads, vocab 256, seq 32 (the demo model)
llama-tiny     Llama-style, 4 blocks, hidden 64, 4 heads / 2 kv heads, vocab 256, seq 32
bert-tiny      BERT, 2 blocks, hidden 64, 4 heads, vocab 256, seq 32
vit-tiny       ViT, 2 blocks, hidden 64, 4 heads, image 32, patch 8, 10 classes
t5-tiny        T5-style, 2 + 2 blocks, d_model 64, 4 heads, vocab 256, seq 32
swin-tiny      Swin, embed 16, depths [2, 2], heads [2, 4], window 4, image 32, patch 4
bert-huge      BERT, 32 layers, hidden 1280, 16 heads, ffn 5120, seq 512, vocab 30522
vit-huge       ViT-H/14, 32 layers, hidden 1280, 16 heads, ffn 5120, image 224, 1000 classes
t5-large       T5, 24 + 24 layers, d_model 1024, 16 heads, ffn 4096, seq 512, vocab 32128
swin-huge      Swin, embed 352, depths [2, 2, 18, 2], heads [11, 22, 44, 88], window 7, image 224
llama-7b       Llama, 32 layers, 4096, 32 heads, ffn 11008, vocab 32000, seq 2048
llama2-70b     Llama 2, 80 layers, 8192, 64 heads, 8 kv heads, ffn 28672, vocab 32000, seq 4096
=============  ==========================================================================

``build_model(name)`` builds on the meta device (instant, no memory); ``device="cpu"``
materialises and initialises deterministically from the seed (see ``init_weights``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from uniap.errors import UniapError
from uniap.models.encoder import (
    BERT,
    BertConfig,
    ViT,
    ViTConfig,
    bert_example_batch,
    vit_example_batch,
)
from uniap.models.gpt import GPT, GPTConfig, gpt_example_batch
from uniap.models.layers import cross_entropy_loss, init_weights
from uniap.models.swin import Swin, SwinConfig, swin_example_batch
from uniap.models.t5 import T5, T5Config, t5_example_batch

__all__ = [
    "resolve_model",
    "BERT",
    "GPT",
    "T5",
    "BertConfig",
    "GPTConfig",
    "Swin",
    "SwinConfig",
    "T5Config",
    "ViT",
    "ViTConfig",
    "build_model",
    "cross_entropy_loss",
    "example_batch",
    "init_weights",
    "list_models",
    "loss_fn_for",
    "model_config",
]

ModelConfig = GPTConfig | BertConfig | ViTConfig | T5Config | SwinConfig

# config type -> (model class, example batch function)
_FAMILIES: dict[type, tuple[type[nn.Module], Callable[..., tuple[Tensor, Tensor]]]] = {
    GPTConfig: (GPT, gpt_example_batch),
    BertConfig: (BERT, bert_example_batch),
    ViTConfig: (ViT, vit_example_batch),
    T5Config: (T5, t5_example_batch),
    SwinConfig: (Swin, swin_example_batch),
}

_PRESETS: dict[str, ModelConfig] = {
    # tiny models for tests and the demo
    "gpt-tiny": GPTConfig(vocab_size=256, seq_len=32, dim=64, n_layers=4, n_heads=4),
    "llama-tiny": GPTConfig(
        vocab_size=256,
        seq_len=32,
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=176,
        style="llama",
    ),
    "bert-tiny": BertConfig(vocab_size=256, seq_len=32, dim=64, n_layers=2, n_heads=4, ffn_dim=256),
    "vit-tiny": ViTConfig(
        image_size=32, patch_size=8, num_classes=10, dim=64, n_layers=2, n_heads=4, ffn_dim=256
    ),
    "t5-tiny": T5Config(
        vocab_size=256, seq_len=32, dim=64, n_layers=2, n_decoder_layers=2, n_heads=4, ffn_dim=256
    ),
    "swin-tiny": SwinConfig(
        image_size=32,
        patch_size=4,
        num_classes=10,
        embed_dim=16,
        depths=(2, 2),
        n_heads=(2, 4),
        window_size=4,
    ),
    # the models of the UniAP paper's experiments and two Llama anchors
    "bert-huge": BertConfig(
        vocab_size=30522, seq_len=512, dim=1280, n_layers=32, n_heads=16, ffn_dim=5120
    ),
    "vit-huge": ViTConfig(
        image_size=224,
        patch_size=14,
        num_classes=1000,
        dim=1280,
        n_layers=32,
        n_heads=16,
        ffn_dim=5120,
    ),
    "t5-large": T5Config(
        vocab_size=32128,
        seq_len=512,
        dim=1024,
        n_layers=24,
        n_decoder_layers=24,
        n_heads=16,
        ffn_dim=4096,
    ),
    "swin-huge": SwinConfig(
        image_size=224,
        patch_size=4,
        num_classes=1000,
        embed_dim=352,
        depths=(2, 2, 18, 2),
        n_heads=(11, 22, 44, 88),
        window_size=7,
    ),
    "llama-7b": GPTConfig(
        vocab_size=32000,
        seq_len=2048,
        dim=4096,
        n_layers=32,
        n_heads=32,
        ffn_dim=11008,
        style="llama",
        norm_eps=1e-6,
    ),
    "llama2-70b": GPTConfig(
        vocab_size=32000,
        seq_len=4096,
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim=28672,
        style="llama",
        norm_eps=1e-5,
    ),
}


def list_models() -> list[str]:
    """Names of the presets, sorted."""
    return sorted(_PRESETS)


def model_config(name: str) -> ModelConfig:
    """The (frozen) config dataclass of preset ``name``."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise UniapError(f"unknown model {name!r}; presets: {list_models()}") from None


def build_model(
    name: str | ModelConfig,
    *,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build preset ``name`` (or a config object), with config fields replaced by ``overrides``.

    The model is constructed on the meta device (no memory, instant even for llama2-70b); for
    any other ``device`` it is materialised there with ``to_empty`` and initialised by
    ``init_weights(model, seed=seed or 0)``, so two processes with the same seed build
    identical weights. The preset name is kept as ``model.uniap_name``.
    """
    config = model_config(name) if isinstance(name, str) else name
    if type(config) not in _FAMILIES:
        raise UniapError(f"not a model name or config: {name!r}; presets: {list_models()}")
    if overrides:
        fields = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise UniapError(
                f"unknown config field(s) {unknown} for {type(config).__name__}; "
                f"fields: {sorted(fields)}"
            )
        config = dataclasses.replace(config, **overrides)
    model_cls, _ = _FAMILIES[type(config)]
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to(dtype=dtype)
    model.uniap_name = name if isinstance(name, str) else type(model).__name__.lower()
    device = torch.device(device)
    if device.type != "meta":
        model = model.to_empty(device=device)
        init_weights(model, seed=0 if seed is None else seed)
    return model


def _config_of(name_or_model: str | nn.Module) -> ModelConfig:
    if isinstance(name_or_model, str):
        return model_config(name_or_model)
    config = getattr(name_or_model, "config", None)
    if type(config) not in _FAMILIES:
        raise UniapError(
            f"{type(name_or_model).__name__} is not a uniap reference model (no known .config); "
            f"use one of {list_models()}"
        )
    return config


def example_batch(
    name_or_model: str | nn.Module,
    batch_size: int,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """A random ``(inputs, targets)`` batch of the right shapes for the model.

    Token ids (b, seq_len) and next-token targets for GPT/Llama; ids and MLM targets for BERT;
    images (b, 3, size, size) and labels (b,) for ViT/Swin; packed ids (b, 2, seq_len) and
    decoder targets (b, seq_len) for T5. Deterministic in ``seed``.
    """
    if batch_size < 1:
        raise UniapError(f"batch_size must be >= 1, got {batch_size}")
    config = _config_of(name_or_model)
    _, make_batch = _FAMILIES[type(config)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    inputs, targets = make_batch(config, batch_size, gen)
    return inputs.to(device), targets.to(device)


def loss_fn_for(name_or_model: str | nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The training loss ``loss_fn(logits, targets) -> scalar`` of the model: mean
    cross-entropy over all target positions (tokens, or samples for classifiers)."""
    _config_of(name_or_model)  # validates the name
    return cross_entropy_loss


def resolve_model(spec: str) -> tuple[Any, Any]:
    """What a command line's ``--model`` names: ``(preset name, None)`` for a preset, or
    ``(model, example_inputs)`` for ``module:function``, where the function returns a model or
    ``(model, example_inputs)`` (a model then needs an ``example_inputs`` attribute). Bad input
    raises one UniapError naming the fix."""
    if ":" not in spec:
        if spec not in list_models():
            raise UniapError(
                f"unknown model {spec!r}; presets: {', '.join(list_models())}; "
                "or give module:function"
            )
        return spec, None
    mod_name, fn_name = spec.split(":", 1)
    if not mod_name or not fn_name:
        raise UniapError(f"--model {spec!r}: expected module:function, e.g. mypkg.models:build")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does: modules in the current directory import
    try:
        mod = importlib.import_module(mod_name)
    except (ImportError, ValueError, TypeError) as e:
        raise UniapError(
            f"cannot import module {mod_name!r} for --model {spec!r}: {e} (looked in the "
            f"current directory {cwd} and on PYTHONPATH; run uniap from the folder that "
            f"holds {mod_name.split('.')[0]}, or add that folder to PYTHONPATH)"
        ) from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise UniapError(f"--model {spec!r}: {mod_name!r} has no callable {fn_name!r}")
    try:
        out = fn()
    except Exception as e:  # the user's builder: report it in one line
        raise UniapError(
            f"--model {spec!r}: calling {fn_name}() failed: {type(e).__name__}: {e}"
        ) from None
    if isinstance(out, tuple) and len(out) == 2:
        return out
    example = getattr(out, "example_inputs", None)
    if example is None:
        raise UniapError(
            f"--model {spec!r}: the function must return (model, example_inputs) "
            "or a model with an `example_inputs` attribute"
        )
    return out, example
