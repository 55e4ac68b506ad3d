"""Build a task module from a recipe: its task's configuration and heads (the task's spec,
:mod:`beit3.finetune.tasks`), optimizer settings, pretrained weights."""

from __future__ import annotations

from beit3.engine.config_io import ConfigError
from beit3.finetune.configurations import build_encoder, full_model_keys
from beit3.finetune.recipe import FinetuneRecipe, checkpointing
from beit3.finetune.reload import ReloadReport, check_architecture, checkpoint_overrides, load_pretrained
from beit3.finetune.tasks import get_task
from beit3.finetune.tasks.base import FinetuneTask, OptimSettings
from beit3.finetune.tasks.spec import BuildInputs
from beit3.model import ModelConfig, get_config


def model_overrides(recipe: FinetuneRecipe) -> dict:
    """Preset overrides: recipe values, then the shapes a pretrained checkpoint imposes (vocab, positions)."""
    m = recipe.model
    overrides = {"drop_path_rate": m.drop_path_rate, **m.overrides}
    if m.img_size:
        overrides["img_size"] = m.img_size
    if m.pretrained:
        shapes = checkpoint_overrides(m.pretrained)
        overrides.update({k: v for k, v in shapes.items() if k in ("vocab_size", "max_text_positions")})
    return overrides


def model_config(task, task_name: str) -> ModelConfig:
    """The resolved model configuration of a task module's backbone (recorded in config.json, model.pth)."""
    return get_task(task_name).backbone(task).cfg


def build_task(
    recipe: FinetuneRecipe, classes: list[str], tokenizer=None
) -> tuple[FinetuneTask, ReloadReport | None]:
    """The task module for ``recipe`` (loaded from ``model.pretrained`` when set) and the load report."""
    spec = get_task(recipe.task.name)
    overrides = model_overrides(recipe)
    if recipe.model.pretrained:  # a file that records its model configuration must fit the recipe's model
        cfg = get_config(recipe.model.name, **overrides)
        check_architecture(cfg, recipe.model.pretrained, f"model.name={recipe.model.name}")
    encoder = build_encoder(
        recipe.model.name, spec.configuration, normalize_output=spec.final_norm, **overrides
    )
    layers, part = checkpointing(recipe, encoder.cfg.depth)
    if layers:
        encoder.set_grad_checkpointing(True, layers, part=part)
    if tokenizer is not None and tokenizer.vocab_size > encoder.cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the text embedding "
            f"{encoder.cfg.vocab_size} rows: "
            f"set model.overrides.vocab_size >= {tokenizer.vocab_size}"
        )
    groups = recipe.param_groups
    optim = OptimSettings(recipe.train.weight_decay, groups.layer_decay, groups.head_lr_scale)
    task = spec.build(BuildInputs(encoder, recipe, list(classes), tokenizer, optim))
    report = None
    if recipe.model.pretrained:
        keys = full_model_keys(recipe.model.name, **overrides)
        report = load_pretrained(spec.backbone(task), recipe.model.pretrained, keys)
    return task, report
