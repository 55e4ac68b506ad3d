"""Named architecture presets (released names where they exist) and ``build_model``."""

from __future__ import annotations

import contextlib

import torch

from beit3.model.beit3 import BEiT3Model
from beit3.model.config import ModelConfig, ModelConfigError

_PRESETS: dict[str, ModelConfig] = {}


def register(name: str, cfg: ModelConfig) -> None:
    """Add a preset; names are unique."""
    if name in _PRESETS:
        raise ValueError(f"model {name!r} is already registered")
    _PRESETS[name] = cfg


def list_models() -> list[str]:
    return sorted(_PRESETS)


def get_config(name: str, **overrides) -> ModelConfig:
    """The preset's config with ``overrides`` applied."""
    if name not in _PRESETS:
        raise ModelConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _PRESETS[name].replace(**overrides) if overrides else _PRESETS[name]


def build_model(name: str, device: str | torch.device | None = None, **overrides) -> BEiT3Model:
    """Build a registered model, optionally with config overrides (``img_size=384``, ``drop_path_rate=0.1``).

    ``device="meta"`` builds it without memory (shapes and parameter counts only).
    """
    cfg = get_config(name, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return BEiT3Model(cfg)


# Released layout (decoupled attention, no vision-language experts): the released checkpoints.
register("beit3_base_patch16_224", ModelConfig(embed_dim=768, depth=12, num_heads=12, ffn_dim=3072))
register("beit3_large_patch16_224", ModelConfig(embed_dim=1024, depth=24, num_heads=16, ffn_dim=4096))
# Paper layout: shared attention, V/L experts everywhere, VL experts in the top layers.
register(
    "beit3_giant_patch14_224",
    ModelConfig(
        layout="paper",
        embed_dim=1408,
        depth=40,
        num_heads=16,
        ffn_dim=6144,
        patch_size=14,
        vl_expert_layers=3,
    ),
)
register(
    "beit3_base_paper_patch16_224",  # the paper's base-size ablation setting
    ModelConfig(layout="paper", embed_dim=768, depth=12, num_heads=12, ffn_dim=3072, vl_expert_layers=2),
)
# Tiny configs for tests and the CPU demo (64 px images, 4x4 patches).
register(
    "beit3_tiny_patch16_64",
    ModelConfig(embed_dim=64, depth=2, num_heads=2, ffn_dim=128, img_size=64, max_text_positions=66),
)
register(
    "beit3_tiny_paper_patch16_64",
    ModelConfig(
        layout="paper",
        embed_dim=64,
        depth=3,
        num_heads=2,
        ffn_dim=128,
        img_size=64,
        max_text_positions=66,
        vl_expert_layers=1,
    ),
)
register(
    "beit3_small_patch16_64",  # the README demo: small enough for a 2-core CPU, big enough to learn
    ModelConfig(embed_dim=192, depth=4, num_heads=3, ffn_dim=768, img_size=64, max_text_positions=130),
)
