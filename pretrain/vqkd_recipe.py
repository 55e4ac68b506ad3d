"""The VQ-KD tokenizer-training recipe: a TOML file read into typed sections, overrides, one validation.

Sections: ``[tokenizer]`` (which VQ-KD config, its overrides, autocast), ``[teacher]``, ``[data]``,
``[codebook]`` (k-means init, dead-code restarts) and ``[train]``, the engine's
:class:`~beit3.engine.trainer_config.TrainSettings` (steps, LR schedule, AdamW, intervals), the same table in
every recipe; the run directory and resume choice come from the command line. Batch sizes,
gradient clipping and precision live in the DeepSpeed JSON (``ds_configs/vqkd_fp32.json``). Checks that need
no file are in :func:`validate`; the teacher's width is checked once the teacher is built, still before any
training.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from beit3.engine.config_io import (
    ConfigError,
    bounded,
    section_problem,
)
from beit3.engine.ds_config import load_ds_config, precision_of
from beit3.engine.trainer_config import TrainSettings, read_recipe
from beit3.pretrain.vqkd_task import AUTOCAST

TEACHERS = ("mobilenet_v2", "clip")


@dataclass
class TokenizerSection:
    """Which VQ-KD config (``beit3-vqkd list``), what to change in it, and the ViTs' autocast."""

    name: str = "vqkd_tiny_patch16_64"
    overrides: dict = field(default_factory=dict)  # any VQKDConfig field, e.g. {codebook_size = 256}
    autocast: str = "none"  # "bf16": the encoder and decoder ViTs under bf16 autocast (task layers stay fp32)


@dataclass
class TeacherSection:
    """The frozen teacher whose patch features are reconstructed."""

    name: str = "mobilenet_v2"  # or "clip" (OpenAI CLIP ViT-B/16 visual tower, the BEiT v2 teacher)
    weights: str = ""  # clip: OpenAI's ViT-B-16.pt or a state dict with its key names


@dataclass
class DataSection:
    """Images and their views. Cached mode: fixed views, teacher features computed once (small sets);
    online mode: fresh crops decoded by DataLoader workers and the teacher on every batch (large sets)."""

    paths: list[str] = field(default_factory=list)  # image files or folders (searched recursively)
    online: bool = False
    views_per_image: int = bounded(4, "[1, inf)")  # cached mode: a centred view + random crops per image
    crop_scale: tuple[float, float] = bounded((0.08, 1.0), "(0, 1]")
    num_workers: int = bounded(4, "[0, inf)")  # online mode: decoding workers
    # Online mode: centred views of this many files (per rank) measure progress.
    eval_images: int = bounded(256, "[1, inf)")
    seed: int = bounded(0, "[0, inf)")


@dataclass
class CodebookSection:
    """Codebook care: spherical k-means init on the first batch, dead-code restarts."""

    kmeans_init: bool = True
    restart_every: int = bounded(20, "[0, inf)")  # optimizer steps between dead-code restarts (0: never)
    # A code is dead below this fraction of the mean EMA usage per code.
    dead_fraction: float = bounded(0.03, "[0, 1)")


@dataclass
class VQKDRecipe:
    """The whole recipe."""

    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: DataSection = field(default_factory=DataSection)
    codebook: CodebookSection = field(default_factory=CodebookSection)
    train: TrainSettings = field(default_factory=TrainSettings)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> VQKDRecipe:
    """Read a recipe file and apply ``section.key=value`` overrides; unknown keys raise ConfigError."""
    return read_recipe(VQKDRecipe, path, overrides)


def validate(recipe: VQKDRecipe, ds_config: dict, world_size: int = 1) -> dict:
    """Check the recipe against itself, the tokenizer registry and the DeepSpeed config, without reading a
    file; returns the resolved DeepSpeed config. Raises ConfigError (or the engine's EngineConfigError) with
    one line naming the setting and the fix."""
    from beit3.tokenizers.vqkd import VQKDConfigError, get_vqkd_config

    problem = recipe.train.problem("train") or section_problem(recipe)
    if problem:
        raise ConfigError(problem)
    tok, data = recipe.tokenizer, recipe.data
    try:
        get_vqkd_config(tok.name, **tok.overrides)
    except VQKDConfigError as e:
        raise ConfigError(f"[tokenizer] {e}: fix tokenizer.name or tokenizer.overrides") from e
    if tok.autocast not in AUTOCAST:
        raise ConfigError(f"tokenizer.autocast={tok.autocast!r} is unknown: use one of {', '.join(AUTOCAST)}")
    if recipe.teacher.name not in TEACHERS:
        raise ConfigError(
            f"teacher.name={recipe.teacher.name!r} is unknown: use one of {', '.join(TEACHERS)}"
        )
    if recipe.teacher.name == "clip" and not recipe.teacher.weights:
        raise ConfigError(
            "teacher.weights is empty: the clip teacher needs OpenAI's ViT-B-16.pt (or its state dict)"
        )
    if not data.paths:
        raise ConfigError(
            "data.paths is empty: give image files or folders, e.g. --set 'data.paths=[\"photos/\"]'"
        )
    low, high = data.crop_scale
    if low > high:
        raise ConfigError(f"data.crop_scale={[low, high]} is reversed: give [min, max]")
    ds_config = load_ds_config(ds_config, world_size)
    precision = precision_of(ds_config)
    if precision != "fp32":
        raise ConfigError(
            f"{precision}.enabled=true in the DeepSpeed config, but VQ-KD keeps its EMA codebook and usage "
            "counts in fp32: use an fp32 config (ds_configs/vqkd_fp32.json) and set tokenizer.autocast = "
            '"bf16" to run the ViTs in bf16'
        )
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage > 2:
        raise ConfigError(
            f"zero_optimization.stage={stage}: ZeRO-3 partitions the codebook, which the EMA updates in "
            "place; use stage 0-2 (ds_configs/vqkd_fp32.json, or --ds-set zero_optimization.stage=1)"
        )
    return ds_config


def train_settings(recipe: VQKDRecipe) -> TrainSettings:
    """The recipe's [train] table with evaluation at the end at least (``eval_every = 0`` becomes
    ``total_steps``): the summary compares the tokenizer before and after training."""
    train = recipe.train
    return replace(train, eval_every=train.eval_every or train.total_steps)
