"""The pretraining recipe: a TOML file read into typed sections, command-line overrides, one validation.

Sections: ``[model]``, ``[tokenizers]``, ``[data]`` (:class:`beit3.pretrain.data.PretrainDataConfig`),
``[batch]``, ``[objective]``, ``[train]`` (the engine's :class:`~beit3.engine.trainer_config.TrainSettings`,
the same table in every recipe), ``[eval]`` (held-out shards: :class:`beit3.pretrain.evaluation.EvalConfig`).
Batch *sizes* live in the DeepSpeed JSON only; the recipe says how a
micro-batch is split between images, texts and pairs. Every numeric setting declares its range beside it
(``bounded``). :func:`validate_run` checks a recipe against itself, the model preset, the visual tokenizer
and the DeepSpeed config without reading a file; :func:`validate` adds the files it names; the tokenizers'
sizes are checked again once they are loaded (:func:`check_text_tokenizer`, :func:`check_visual_tokenizer`).
Messages name the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from beit3.engine.config_io import (
    ConfigError,
    bounded,
    section_problem,
)
from beit3.engine.ds_config import global_batch_problem, load_ds_config
from beit3.engine.trainer_config import TrainSettings, read_recipe
from beit3.model.beit3 import checkpointed_layers, checkpointed_part
from beit3.pretrain.data import DataConfigError, PretrainDataConfig
from beit3.pretrain.evaluation import EvalConfig
from beit3.pretrain.objective import ObjectiveConfig

MOVED = {"batch.global_batch_size": "train.global_batch_size"}  # keys of earlier recipe layouts
COMPILE_CHOICES = ("none", "layers")
# torch.compile modes without CUDA graphs: a graph replays fixed addresses, but ZeRO-3 re-gathers the
# parameters and every micro-batch brings new input tensors.
COMPILE_MODES = ("", "default", "max-autotune-no-cudagraphs")


@dataclass
class ModelSection:
    """Which architecture, and what to change in its preset."""

    name: str = "beit3_giant_patch14_224"
    drop_path_rate: float = bounded(0.1, "[0, 1)")
    # Layers whose activations are recomputed in backward: "none", "all", or "every:N" (every N-th layer).
    grad_checkpointing: str = "none"
    # What is recomputed of each of those layers: "layer" (all of it), "attention" (its attention branch:
    # pre-LN, q/k/v, attention, output projection) or "ffn" (its final LN and FFN experts).
    grad_checkpointing_part: str = "layer"
    # torch.compile in training: "none", or "layers" (each layer's packed path, BEiT3Model.compile_layers;
    # texts must have fixed lengths, data.pad_text_to_max_len); see docs/performance.md, "Compiled step".
    compile: str = "none"
    compile_backend: str = "inductor"
    compile_mode: str = ""  # torch.compile's mode: "" (its default) or one of COMPILE_MODES
    overrides: dict = field(default_factory=dict)  # any other ModelConfig field, e.g. {init = "magneto"}
    # Continued pretraining: the initial weights from this released-format or beit3-export checkpoint of the
    # same architecture (fresh optimizer and schedule; a resume wins over it): beit3/pretrain/warm_start.py.
    warm_start: str = ""


@dataclass
class TokenizerSection:
    """The frozen tokenizers: SentencePiece model file and VQ-KD visual tokenizer."""

    text: str = ""
    visual: str = "vqkd_encoder_base_decoder_3x768x12_clip"
    visual_checkpoint: str = ""  # empty: a seeded random tokenizer (smoke tests only; a warning is logged)


@dataclass
class BatchSection:
    """Composition of every micro-batch (paper: 2048 images + 2048 texts + 2048 pairs per global batch)."""

    images: int = bounded(1, "[0, inf)")
    texts: int = bounded(1, "[0, inf)")
    pairs: int = bounded(1, "[0, inf)")


@dataclass
class PretrainRecipe:
    """The whole recipe."""

    model: ModelSection = field(default_factory=ModelSection)
    tokenizers: TokenizerSection = field(default_factory=TokenizerSection)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    batch: BatchSection = field(default_factory=BatchSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out shards (none: no evaluation)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> PretrainRecipe:
    """Read a recipe file and apply ``section.key=value`` overrides; unknown keys raise ConfigError."""
    return read_recipe(PretrainRecipe, path, overrides, MOVED)


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
    """Parse ``[model] grad_checkpointing``: None (off) or the list of layer indices to recompute
    (``beit3.model.beit3.checkpointed_layers``'s grammar)."""
    try:
        return checkpointed_layers(spec, depth)
    except ValueError as e:
        raise ConfigError(f"[model] {e}") from None


def grad_checkpoint_part(part: str) -> str:
    """Check ``[model] grad_checkpointing_part``: what is recomputed of each checkpointed layer."""
    try:
        return checkpointed_part(part)
    except ValueError as e:
        raise ConfigError(f"[model] {e}") from None


def _check_values(recipe: PretrainRecipe) -> None:
    """Every setting's own range and the orderings within a section (no files, no other sections)."""
    problem = recipe.train.problem("train") or section_problem(recipe) or recipe.data.problem("data")
    if problem:
        raise ConfigError(problem)
    if not any(recipe.objective.loss_weights().values()):
        raise ConfigError("objective: every loss weight is 0, so nothing is learned: set one of them > 0")


def validate_run(
    recipe: PretrainRecipe,
    ds_config: dict,
    world_size: int,
    visual_overrides: dict | None = None,
    trained_global_batch: int | None = None,
) -> dict[str, int]:
    """Check a recipe against itself, the model preset, the visual tokenizer's registry entry and the
    DeepSpeed config on ``world_size`` ranks, without reading any file; returns the micro-batch split.
    ``visual_overrides``: the tokenizer config changes its checkpoint records (e.g. ``codebook_size``);
    ``trained_global_batch``: that of the checkpoint being resumed (a resume on other ranks keeps it).

    Pure: it neither reads data, tokenizer or checkpoint files nor starts DeepSpeed, so every shipped
    recipe and DeepSpeed config can be checked against each other in a test. Raises ConfigError or
    EngineConfigError with one line naming the setting and the fix.
    """
    from beit3.model import ModelConfigError, get_config
    from beit3.tokenizers.vqkd import VQKDConfigError, get_vqkd_config

    _check_values(recipe)
    overrides = {"drop_path_rate": recipe.model.drop_path_rate, **recipe.model.overrides}
    try:
        model_cfg = get_config(recipe.model.name, **overrides)
    except ZeroDivisionError as e:
        raise ConfigError(
            f"[model] overrides={recipe.model.overrides}: a size is 0: give positive sizes"
        ) from e
    except (ModelConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"[model] {e}") from e
    ds_config = load_ds_config(ds_config, world_size)
    split = micro_batch_split(recipe, int(ds_config["train_micro_batch_size_per_gpu"]))
    problem = recipe.eval.problem(split, recipe.train.eval_every)
    if problem:
        raise ConfigError(problem)
    b, expected = recipe.batch, recipe.train.global_batch_size
    unit = b.images + b.texts + b.pairs
    problem = global_batch_problem(ds_config, expected, world_size, unit, trained_global_batch)
    if problem:
        raise ConfigError(f"train.global_batch_size={expected}: {problem}")
    d = recipe.data
    if d.img_size != model_cfg.img_size or d.patch_size != model_cfg.patch_size:
        raise ConfigError(
            f"[data] img_size/patch_size {d.img_size}/{d.patch_size} differ from the "
            f"model's {model_cfg.img_size}/{model_cfg.patch_size}"
        )
    for name, length in (("text_max_len", d.text_max_len), ("pair_text_max_len", d.pair_text_max_len)):
        if length > model_cfg.max_text_len:
            raise ConfigError(
                f"[data] {name}={length} exceeds the model's max_text_len {model_cfg.max_text_len}"
            )
    try:
        visual = get_vqkd_config(recipe.tokenizers.visual, **(visual_overrides or {}))
    except VQKDConfigError as e:
        raise ConfigError(f"[tokenizers] visual: {e}") from e
    check_visual_tokenizer(recipe, visual.codebook_size, visual.patch_size, model_cfg)
    grad_checkpoint_layers(recipe.model.grad_checkpointing, model_cfg.depth)
    grad_checkpoint_part(recipe.model.grad_checkpointing_part)
    check_compile(recipe)
    return split


def check_compile(recipe: PretrainRecipe) -> None:
    """``[model] compile``, its backend and mode, and the fixed text lengths a compiled step needs."""
    m = recipe.model
    if m.compile not in COMPILE_CHOICES:
        raise ConfigError(f"[model] compile={m.compile!r}: use one of {', '.join(COMPILE_CHOICES)}")
    if m.compile == "none":
        return
    if m.compile_mode not in COMPILE_MODES:
        raise ConfigError(
            f"[model] compile_mode={m.compile_mode!r}: use one of {COMPILE_MODES} (modes with CUDA graphs "
            "replay fixed addresses, which ZeRO-3's gathered parameters and new batches do not keep)"
        )
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if m.compile_backend not in backends:
        raise ConfigError(
            f"[model] compile_backend={m.compile_backend!r} is not a torch.compile backend here: use one of "
            f"{', '.join(sorted(backends))}"
        )
    if not recipe.data.pad_text_to_max_len:
        raise ConfigError(
            "[model] compile='layers' needs fixed text lengths (each new length compiles again): set "
            "[data] pad_text_to_max_len = true"
        )


def check_visual_tokenizer(recipe: PretrainRecipe, codebook_size: int, patch_size: int, model_cfg) -> None:
    """The visual tokenizer's codes must be what the model's MIM head predicts, on the model's patch grid."""
    name, size = recipe.tokenizers.visual, recipe.data.tokenizer_img_size
    if codebook_size != model_cfg.visual_vocab_size:
        raise ConfigError(
            f"visual tokenizer {name} has {codebook_size} codes but the model's MIM head predicts "
            f"{model_cfg.visual_vocab_size}: set [model.overrides] visual_vocab_size = {codebook_size}"
        )
    if size % patch_size or size // patch_size != model_cfg.grid_size:
        raise ConfigError(
            f"[data] tokenizer_img_size={size} gives the patch-{patch_size} visual tokenizer {name} a "
            f"{size / patch_size:g}x{size / patch_size:g} grid but the model's patch grid is "
            f"{model_cfg.grid_size}x{model_cfg.grid_size}: set tokenizer_img_size = "
            f"{model_cfg.grid_size * patch_size}"
        )


def check_text_tokenizer(vocab_size: int, model_cfg) -> None:
    """The text tokenizer's ids must all have a row in the model's text embedding."""
    if vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"the text tokenizer has {vocab_size} ids but the model's text embedding only "
            f"{model_cfg.vocab_size} rows: set [model.overrides] vocab_size >= {vocab_size}"
        )


def validate(
    recipe: PretrainRecipe, ds_config: dict, world_size: int = 1, trained_global_batch: int | None = None
) -> tuple[dict[str, int], dict | None]:
    """:func:`validate_run` plus the files the recipe names (tokenizers, shards).

    Returns the micro-batch split and the visual tokenizer's checkpoint, read once here (None: random
    tokenizer), whose recorded config overrides (``beit3-vqkd train``) take part in the size checks.
    """
    _check_values(recipe)
    tok = recipe.tokenizers
    if not tok.text:
        raise ConfigError("[tokenizers] text is empty: give the SentencePiece model file (beit3-spm train)")
    if not Path(tok.text).is_file():
        raise ConfigError(f"[tokenizers] text={tok.text!r} does not exist")
    visual_checkpoint = read_visual_checkpoint(tok.visual_checkpoint) if tok.visual_checkpoint else None
    overrides = (visual_checkpoint or {}).get("overrides", {})
    split = validate_run(recipe, ds_config, world_size, overrides, trained_global_batch)
    try:
        recipe.data.validate()
    except DataConfigError as e:
        raise ConfigError(f"[data] {e}") from e
    recipe.eval.check_shards(recipe.data)
    return split, visual_checkpoint


def read_visual_checkpoint(path: str) -> dict:
    """The visual tokenizer checkpoint at ``path`` ({"model": weights, ...}), read with torch's safe loader;
    anything else (a text file, a tensor, a dict without tensors) is a ConfigError naming the setting."""
    import torch

    where = f"[tokenizers] visual_checkpoint={path!r}"
    fix = "give a VQ-KD checkpoint (written by `beit3-vqkd train`, or the released BEiT v2 tokenizer)"
    if not Path(path).is_file():
        raise ConfigError(f"{where} does not exist: {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises many types for a file that is not a checkpoint
        raise ConfigError(f"{where} is not a torch checkpoint ({_load_failure(e)}): {fix}") from e
    weights = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not any(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ConfigError(f"{where} holds no tokenizer weights (a {type(state).__name__}): {fix}")
    if not isinstance(state.get("overrides", {}), dict):
        raise ConfigError(f"{where} has a malformed 'overrides' entry: {fix}")
    return state


def _load_failure(error: Exception) -> str:
    """What torch.load's error says, in a few words (its safe-loader message is a page of advice)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation")[0].split(". Please use")[0]
    return f"{type(error).__name__}: {' '.join(text.split())[:160]}"
