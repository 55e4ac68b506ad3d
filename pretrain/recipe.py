"""The pretraining recipe: a TOML file read into typed sections, command-line overrides, one validation.

Sections: ``[model]``, ``[tokenizers]``, ``[data]`` (:class:`beit3.pretrain.data.PretrainDataConfig`),
``[batch]``, ``[objective]``, ``[train]``. Batch *sizes* live in the DeepSpeed JSON only; the recipe says how
a micro-batch is split between images, texts and pairs. Everything is checked in :func:`validate` against
the DeepSpeed config and world size, with messages that name the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from beit3.engine.config_io import ConfigError, apply_overrides, from_dict, read_toml
from beit3.pretrain.data import DataConfigError, PretrainDataConfig
from beit3.pretrain.objective import ObjectiveConfig


@dataclass
class ModelSection:
    """Which architecture, and what to change in its preset."""

    name: str = "beit3_giant_patch14_224"
    drop_path_rate: float = 0.1
    # Layers whose activations are recomputed in backward: "none", "all", or "every:N" (every N-th layer).
    grad_checkpointing: str = "none"
    overrides: dict = field(default_factory=dict)  # any other ModelConfig field, e.g. {init = "magneto"}


@dataclass
class TokenizerSection:
    """The frozen tokenizers: SentencePiece model file and VQ-KD visual tokenizer."""

    text: str = ""
    visual: str = "vqkd_encoder_base_decoder_3x768x12_clip"
    visual_checkpoint: str = ""  # empty: a seeded random tokenizer (smoke tests only; a warning is logged)


@dataclass
class BatchSection:
    """Composition of every micro-batch (paper: 2048 images + 2048 texts + 2048 pairs per global batch)."""

    images: int = 1
    texts: int = 1
    pairs: int = 1


@dataclass
class TrainSection:
    """Schedule, optimizer and intervals (paper recipe defaults, Table 11)."""

    total_steps: int = 1_000_000
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 10_000
    schedule: str = "cosine"
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    optimizer: str = "adamw"
    log_every: int = 50
    save_every: int = 2000
    keep_last: int = 3
    seed: int = 0
    max_nonfinite_in_row: int = 20
    tensorboard: bool = True


@dataclass
class PretrainRecipe:
    """The whole recipe."""

    model: ModelSection = field(default_factory=ModelSection)
    tokenizers: TokenizerSection = field(default_factory=TokenizerSection)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    batch: BatchSection = field(default_factory=BatchSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainSection = field(default_factory=TrainSection)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> PretrainRecipe:
    """Read a recipe file and apply ``section.key=value`` overrides; unknown keys raise ConfigError."""
    data = apply_overrides(read_toml(path), overrides or [])
    return from_dict(PretrainRecipe, data)


def micro_batch_split(recipe: PretrainRecipe, micro_batch_size: int) -> dict[str, int]:
    """Images, texts and pairs per micro-batch from the DeepSpeed micro-batch size and the recipe's mix."""
    mix = recipe.batch
    parts = {"images": mix.images, "texts": mix.texts, "pairs": mix.pairs}
    if any(v < 0 for v in parts.values()) or sum(parts.values()) == 0:
        raise ConfigError("[batch] images/texts/pairs must be non-negative and not all zero")
    unit = sum(parts.values())
    if micro_batch_size % unit:
        raise ConfigError(
            f"train_micro_batch_size_per_gpu={micro_batch_size} in the DeepSpeed config cannot be split "
            f"{mix.images}:{mix.texts}:{mix.pairs} between images, texts and pairs; use a multiple of {unit}"
        )
    return {k: v * micro_batch_size // unit for k, v in parts.items()}


def grad_checkpoint_layers(spec: str, depth: int) -> list[int] | None:
    """Parse ``[model] grad_checkpointing``: None (off) or the list of layer indices to recompute."""
    if spec == "none":
        return None
    if spec == "all":
        return list(range(depth))
    if spec.startswith("every:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if n > 0:
            return list(range(0, depth, n))
    raise ConfigError(f"[model] grad_checkpointing={spec!r}: use 'none', 'all' or 'every:N'")


def validate(recipe: PretrainRecipe, ds_config: dict) -> dict[str, int]:
    """Check the recipe against itself and the resolved DeepSpeed config; returns the micro-batch split."""
    from beit3.model import ModelConfigError, get_config

    try:
        model_cfg = get_config(recipe.model.name, **recipe.model.overrides)
    except ModelConfigError as e:
        raise ConfigError(f"[model] {e}") from e
    split = micro_batch_split(recipe, int(ds_config["train_micro_batch_size_per_gpu"]))
    if not recipe.tokenizers.text:
        raise ConfigError("[tokenizers] text is empty: give the SentencePiece model file (beit3-spm train)")
    if not Path(recipe.tokenizers.text).is_file():
        raise ConfigError(f"[tokenizers] text={recipe.tokenizers.text!r} does not exist")
    if recipe.tokenizers.visual_checkpoint and not Path(recipe.tokenizers.visual_checkpoint).is_file():
        raise ConfigError(
            f"[tokenizers] visual_checkpoint={recipe.tokenizers.visual_checkpoint!r} does not exist"
        )
    if recipe.data.img_size != model_cfg.img_size or recipe.data.patch_size != model_cfg.patch_size:
        raise ConfigError(
            f"[data] img_size/patch_size {recipe.data.img_size}/{recipe.data.patch_size} differ from the "
            f"model's {model_cfg.img_size}/{model_cfg.patch_size}"
        )
    for name, length in (
        ("text_max_len", recipe.data.text_max_len),
        ("pair_text_max_len", recipe.data.pair_text_max_len),
    ):
        if length > model_cfg.max_text_len:
            raise ConfigError(
                f"[data] {name}={length} exceeds the model's max_text_len {model_cfg.max_text_len}"
            )
    t = recipe.train
    if t.total_steps <= 0 or t.warmup_steps < 0 or t.warmup_steps > t.total_steps:
        raise ConfigError("[train] need total_steps > 0 and 0 <= warmup_steps <= total_steps")
    grad_checkpoint_layers(recipe.model.grad_checkpointing, model_cfg.depth)
    try:
        recipe.data.validate()
    except DataConfigError as e:
        raise ConfigError(f"[data] {e}") from e
    return split
