"""The finetuning recipe: a TOML file (``finetune/recipes/*.toml``) read into typed sections, plus overrides.

Sections: ``[task]``, ``[model]``, ``[data]``, ``[train]`` (the engine's
:class:`~beit3.engine.trainer_config.TrainSettings`, the same table in every recipe), ``[param_groups]``
(layer decay, head learning-rate scale), ``[captioning]``, ``[segmentation]`` and ``[detection]`` (its
dataclass in :mod:`beit3.finetune.tasks.detection`). Unknown keys are rejected by
:func:`beit3.engine.config_io.from_dict`; every numeric setting declares its range beside it (``bounded``);
:func:`validate` checks the values that depend on each other, with messages that name the fix. Batch sizes
live in the DeepSpeed JSON only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from beit3.engine.config_io import (
    ConfigError,
    bounded,
    section_problem,
)
from beit3.engine.ds_config import global_batch_problem, load_ds_config
from beit3.engine.trainer_config import TrainSettings, read_recipe
from beit3.finetune.data.pair_stream import recipe_checks as pair_stream_checks
from beit3.finetune.dense.backbone import BackboneSettings
from beit3.finetune.tasks import get_task, task_names
from beit3.finetune.tasks.base import POOLINGS
from beit3.finetune.tasks.detection import DetectionSection

MIXUP_MODES = ("batch", "pair", "elem")
# timm's RandAugment grammar: "rand" and "-"-separated sections m (magnitude), n (ops per image), mstd
# (magnitude noise), mmax, inc (increasing ops), p (op probability).
RANDAUG = re.compile(r"rand(-(m\d+|n\d+|mstd\d+(\.\d+)?|mmax\d+|inc[01]|p\d*(\.\d+)?))*")
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
MOVED = {
    f"train.{k}": f"param_groups.{k}" for k in ("layer_decay", "head_lr_scale")
}  # keys of earlier recipes


@dataclass
class TaskSection:
    """Which task, and its label space (0: taken from the data)."""

    name: str = "image_classification"
    num_classes: int = bounded(0, "[0, inf)")
    label_smoothing: float = bounded(0.0, "[0, 1)")
    prompt: str = "a picture of {}."  # prompt_classification: class-name template
    # What a pooled head reads (the tasks whose spec says pooling: vqa, retrieval, contrastive,
    # text_classification): "cls", the first token's output, as released; "mean", the mean of the output
    # tokens, padding left out (docs/finetune.md, "Pooling").
    pooling: str = "cls"


@dataclass
class ModelSection:
    """Architecture preset, the checkpoint to start from, and preset overrides."""

    name: str = "beit3_base_patch16_224"
    pretrained: str = ""  # released-format checkpoint; empty: from scratch
    img_size: int = bounded(0, "[0, inf)")  # 0: the preset's; positions are interpolated on load
    drop_path_rate: float = bounded(0.1, "[0, 1)")
    # Activation checkpointing, as in pretraining recipes: "none", "all" or "every:N" layers, each recomputed
    # whole ("layer") or only its "attention" or "ffn" branch (the released large/giant VQA and retrieval
    # recipes need it at their resolutions).
    grad_checkpointing: str = "none"
    grad_checkpointing_part: str = "layer"
    overrides: dict = field(default_factory=dict)  # any other ModelConfig field


@dataclass
class DataSection:
    """Where examples come from (:mod:`beit3.finetune.data.sources`) and how they are tokenised."""

    source: str = "jsonl"  # jsonl | wds | pretrain_pairs | easy_vqa | tuxpaint | digits | wordnet | shapes
    train: str = ""  # jsonl: train index file; wds: local shard files (glob or {000..099}); others: unused
    eval: str = ""  # jsonl: eval index file; wds: its shards
    root: str = ""  # jsonl: folder image paths are relative to
    tokenizer: str = ""  # SentencePiece model file (XLM-R ids via beit3.tokenizers.text)
    max_text_len: int = bounded(64, "[3, inf)")
    max_train: int = bounded(0, "[0, inf)")  # cap on training examples (0: all)
    max_eval: int = bounded(0, "[0, inf)")  # cap on evaluation examples (0: all)
    hflip: bool = False  # random horizontal flips while training
    # Training augmentation, timm's (the `augment` extra; docs/finetune.md "Augmentation"). crop_scale > 0
    # turns on timm's training transform: RandomResizedCrop (bicubic) of area scale (crop_scale, 1)
    # (released: 0.5 vision-language, 0.08 ImageNet), the flip, RandAugment (a timm string, e.g.
    # "rand-m9-mstd0.5-inc1"), colour jitter (timm applies it only without RandAugment) and RandomErasing
    # with probability reprob. 0: images resized to the square (and flipped with hflip).
    crop_scale: float = bounded(0.0, "[0, 1]")
    randaug: str = ""
    color_jitter: float = bounded(0.0, "[0, inf)")
    reprob: float = bounded(0.0, "[0, 1]")
    # Evaluation view: 0, the square resize; else Resize(size / crop_pct) of the shorter side + CenterCrop.
    crop_pct: float = bounded(0.0, "[0, 1]")
    # Mixup/CutMix (image classification; timm's): Beta alphas (0: off), the probability a batch is mixed,
    # that of CutMix when both are on, and per "batch", "pair" or "elem"; task.label_smoothing smooths the
    # mixed targets.
    mixup: float = bounded(0.0, "[0, inf)")
    cutmix: float = bounded(0.0, "[0, inf)")
    mixup_prob: float = bounded(1.0, "[0, 1]")
    mixup_switch_prob: float = bounded(0.5, "[0, 1]")
    mixup_mode: str = "batch"
    eval_batch_size: int = bounded(0, "[0, inf)")  # evaluation batch per rank; 0: the training micro-batch
    # DataLoader worker processes that read and decode a released-format index's training images (the
    # offline sources' images are in memory and need none); pinned memory on a GPU.
    num_workers: int = bounded(4, "[0, inf)")
    # true: the workers start once and serve every epoch (torch's persistent_workers); false: new ones each
    # epoch (the default until persistent workers have run the whole test suite with no lingering worker).
    persistent_workers: bool = False
    seed: int = bounded(0, "[0, inf)")


@dataclass
class ParamGroupSection:
    """How finetuning scales the learning rate per parameter (``beit3.model.build_param_groups``): layer-wise
    decay from the heads down (BEiT), and a factor for the task head (the released VQA recipe uses 20)."""

    layer_decay: float = bounded(0.65, "(0, 1]")
    head_lr_scale: float = bounded(1.0, "(0, inf)")


@dataclass
class CaptioningSection:
    """Masked finetuning and decoding (released: mask_prob 0.6 (docs 0.7), 3 beams, length penalty 0.6)."""

    mask_prob: float = bounded(0.6, "(0, 1)")
    num_beams: int = bounded(3, "[1, inf)")
    max_len: int = bounded(32, "[3, inf)")
    length_penalty: float = bounded(0.6, "(-inf, inf)")
    # "Drop worst" (released: 0.2 after step 12000): from optimizer step drop_worst_after on, the loss keeps
    # only the lowest (1 - drop_worst_ratio) fraction of the masked tokens' losses (0: all kept).
    drop_worst_ratio: float = bounded(0.0, "[0, 1)")
    drop_worst_after: int = bounded(0, "[0, inf)")


@dataclass
class SegmentationSection:
    """Semantic segmentation's views (beit3.finetune.dense.transforms; the crop: model.img_size), head."""

    # Training: the shorter side rescaled to crop x r, r uniform in [scale_min, scale_max] (mmseg's
    # ratio_range), then the crop; photometric: colour jitter of the image (mmseg's PhotoMetricDistortion).
    scale_min: float = bounded(0.5, "(0, inf)")
    scale_max: float = bounded(2.0, "(0, inf)")
    photometric: bool = True
    reduce_zero_label: bool = True  # ADE20K: label 0 ("other") ignored, 1..150 -> classes 0..149
    eval_stride: int = bounded(0, "[0, inf)")  # sliding-window stride in pixels; 0: 2/3 of the crop
    head_channels: int = bounded(256, "[1, inf)")  # the feature pyramid's and the head's width
    # [segmentation.backbone]: window attention, out_layers, CLS token (the dense tasks' shared keys).
    backbone: BackboneSettings = field(default_factory=BackboneSettings)


@dataclass
class FinetuneRecipe:
    """Everything a finetuning run needs besides the DeepSpeed JSON."""

    task: TaskSection = field(default_factory=TaskSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSettings = field(default_factory=TrainSettings)
    param_groups: ParamGroupSection = field(default_factory=ParamGroupSection)
    captioning: CaptioningSection = field(default_factory=CaptioningSection)
    segmentation: SegmentationSection = field(default_factory=SegmentationSection)
    detection: DetectionSection = field(default_factory=DetectionSection)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> FinetuneRecipe:
    """Read ``path`` (a file or a name in finetune/recipes/), apply ``section.key=value`` overrides."""
    path = Path(path)
    if not path.is_file() and (RECIPE_DIR / f"{path}.toml").is_file():
        path = RECIPE_DIR / f"{path}.toml"
    recipe = read_recipe(FinetuneRecipe, path, overrides, MOVED)
    validate(recipe)
    return recipe


def validate(recipe: FinetuneRecipe) -> None:
    """Raise ConfigError naming the key to fix: every value's range, then values that depend on each other."""
    problem = recipe.train.problem("train") or section_problem(recipe)
    if problem:
        raise ConfigError(f"finetune recipe: {problem}")
    t = recipe.task
    if t.name not in task_names():
        raise ConfigError(f"finetune recipe: task.name must be one of {task_names()}, got {t.name!r}")
    spec = get_task(t.name)
    pooled = ", ".join(name for name in task_names() if get_task(name).pooling)
    checks = [
        (t.pooling in POOLINGS, f"task.pooling must be one of {POOLINGS}, got {t.pooling!r}"),
        (t.pooling == "cls" or spec.pooling,
         f"task.pooling applies to the tasks with a pooled head read from the first token ({pooled}), "
         f"not to {t.name!r} (leave it 'cls')"),
        (bool(recipe.data.tokenizer) or not spec.needs_tokenizer,
         "data.tokenizer must name a SentencePiece model file for tasks with text"),
        (recipe.data.source not in ("jsonl", "wds") or bool(recipe.data.train),
         f"data.train must name {'shard files' if recipe.data.source == 'wds' else 'a JSONL index file'} "
         f"when data.source = {recipe.data.source!r}"),
    ]  # fmt: skip
    for ok, message in checks + augmentation_checks(recipe) + pair_stream_checks(recipe):
        if not ok:
            raise ConfigError(f"finetune recipe: {message}")


def augmentation_checks(recipe: FinetuneRecipe) -> list[tuple[bool, str]]:
    """(holds, message naming the fix) for the ``[data]`` augmentation settings (what the task's spec
    allows) and the task-specific tables (``[captioning]``: the tasks whose spec reads it)."""
    d, task = recipe.data, recipe.task.name
    spec = get_task(task)
    mixing = ", ".join(name for name in task_names() if get_task(name).mixup)
    in_transform = [k for k in ("randaug", "color_jitter", "reprob") if getattr(d, k)]
    image_keys = [k for k in ("crop_scale", "crop_pct", *in_transform, "mixup", "cutmix") if getattr(d, k)]
    return [
        (not image_keys or spec.images,
         f"data.{', data.'.join(image_keys)}: task {task!r} has no images to augment (leave them 0)"),
        (not in_transform or d.crop_scale > 0 or spec.pair_stream,
         f"data.{', data.'.join(in_transform)} run in timm's training transform, which starts with "
         "RandomResizedCrop: set data.crop_scale > 0 (released: 0.5 vision-language, 0.08 ImageNet)"),
        (not d.randaug or RANDAUG.fullmatch(d.randaug) is not None,
         "data.randaug must be a timm RandAugment string such as 'rand-m9-mstd0.5-inc1' (sections m, n, "
         f"mstd, mmax, inc, p) or empty, got {d.randaug!r}"),
        (not (d.mixup or d.cutmix) or spec.mixup,
         f"data.mixup and data.cutmix mix images and their class labels: {mixing} only, not {task!r} "
         "(set them to 0)"),
        (d.mixup_mode in MIXUP_MODES, f"data.mixup_mode must be one of {MIXUP_MODES}, got {d.mixup_mode!r}"),
        (not recipe.captioning.drop_worst_ratio or "captioning" in spec.sections,
         f"captioning.drop_worst_ratio applies to the captioning loss, not to task {task!r} (set it to 0)"),
        (recipe.segmentation.scale_min <= recipe.segmentation.scale_max,
         "segmentation.scale_min must not exceed segmentation.scale_max"),
    ]  # fmt: skip


def checkpointing(recipe: FinetuneRecipe, depth: int) -> tuple[list[int] | None, str]:
    """``model.grad_checkpointing`` and ``model.grad_checkpointing_part``: the layers recomputed (None: none)
    and what of each (ConfigError naming the setting for a bad value)."""
    from beit3.model.beit3 import checkpointed_layers, checkpointed_part

    m = recipe.model
    try:
        return checkpointed_layers(m.grad_checkpointing, depth), checkpointed_part(m.grad_checkpointing_part)
    except ValueError as e:
        raise ConfigError(f"finetune recipe: model.{e}") from None


def validate_run(
    recipe: FinetuneRecipe, ds_config: dict, world_size: int, trained_global_batch: int | None = None
) -> dict:
    """Check a recipe against itself, its model preset and the DeepSpeed config on ``world_size`` ranks,
    without reading any file or starting DeepSpeed; returns the resolved DeepSpeed config.

    Raises ConfigError or EngineConfigError with one line naming the setting and the fix. Shapes a
    pretrained checkpoint imposes (vocabulary, text positions) are checked when it is loaded.
    ``trained_global_batch``: that of the checkpoint being resumed (a resume on other ranks keeps it).
    """
    from beit3.model import ModelConfigError, get_config

    validate(recipe)
    m = recipe.model
    overrides = {"drop_path_rate": m.drop_path_rate, **m.overrides}
    if m.img_size:
        overrides["img_size"] = m.img_size
    try:
        preset = get_config(m.name)
    except ModelConfigError as e:
        raise ConfigError(f"finetune recipe: model.name: {e}") from e
    patch = m.overrides.get("patch_size", preset.patch_size)
    if m.img_size and isinstance(patch, int) and patch > 0 and m.img_size % patch:
        raise ConfigError(
            f"finetune recipe: model.img_size={m.img_size} is not a multiple of the patch size {patch}: "
            f"give a multiple of {patch} (0: the preset's {preset.img_size})"
        )
    try:
        model_cfg = get_config(m.name, **overrides)
    except (ModelConfigError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"finetune recipe: model.overrides: {e}") from e
    checkpointing(recipe, model_cfg.depth)
    spec = get_task(recipe.task.name)
    problem = spec.recipe_problem(recipe, model_cfg) if spec.recipe_problem is not None else None
    if problem:
        raise ConfigError(f"finetune recipe: {problem}")
    lengths = [("data.max_text_len", recipe.data.max_text_len)]
    if "captioning" in get_task(recipe.task.name).sections:  # the decoded captions' length
        lengths.append(("captioning.max_len", recipe.captioning.max_len))
    for name, length in lengths:
        if length > model_cfg.max_text_len:
            raise ConfigError(
                f"finetune recipe: {name}={length} exceeds the model's max_text_len "
                f"{model_cfg.max_text_len}: lower it or raise model.overrides.max_text_positions"
            )
    ds_config = load_ds_config(ds_config, world_size)
    micro = ds_config["train_micro_batch_size_per_gpu"]
    if (recipe.data.mixup or recipe.data.cutmix) and micro % 2:
        raise ConfigError(
            "finetune recipe: data.mixup/data.cutmix pair each image with another of its micro-batch "
            f"(timm's Mixup): train_micro_batch_size_per_gpu={micro} must be even (set an even one, with "
            "gradient_accumulation_steps to keep the global batch) or set data.mixup = data.cutmix = 0"
        )
    expected = recipe.train.global_batch_size
    problem = global_batch_problem(ds_config, expected, world_size, trained=trained_global_batch)
    if problem:
        raise ConfigError(
            f"finetune recipe: train.global_batch_size={recipe.train.global_batch_size}: {problem}"
        )
    return ds_config
