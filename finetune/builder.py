"""Build a task module from a recipe: configuration, heads, optimizer settings, pretrained weights."""

from __future__ import annotations

from beit3.engine.config_io import ConfigError
from beit3.finetune.configurations import build_encoder, full_model_keys
from beit3.finetune.recipe import FinetuneRecipe, checkpointing
from beit3.finetune.reload import ReloadReport, check_architecture, checkpoint_overrides, load_pretrained
from beit3.finetune.tasks.base import FinetuneTask, OptimSettings
from beit3.finetune.tasks.captioning import Captioning
from beit3.finetune.tasks.classification import ImageClassification, PromptClassification, TextClassification
from beit3.finetune.tasks.retrieval import Retrieval
from beit3.finetune.tasks.vqa import NLVR2, VQA
from beit3.model import ModelConfig, get_config

# Task -> (configuration, final LayerNorm kept), as in the released finetuning models.
TASK_CONFIGURATIONS = {
    "image_classification": ("vision", False),
    "text_classification": ("language", False),
    "prompt_classification": ("dual", True),
    "vqa": ("fusion", False),
    "nlvr2": ("fusion", True),
    "retrieval": ("dual", True),
    "captioning": ("seq2seq", True),
}


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


def model_config(task) -> ModelConfig:
    """The resolved model configuration of a task module's backbone (recorded in config.json, model.pth)."""
    return task.retrieval.cfg if isinstance(task, PromptClassification) else task.cfg


def build_task(
    recipe: FinetuneRecipe, classes: list[str], tokenizer=None
) -> tuple[FinetuneTask, ReloadReport | None]:
    """The task module for ``recipe`` (loaded from ``model.pretrained`` when set) and the load report."""
    name = recipe.task.name
    configuration, normalize_output = TASK_CONFIGURATIONS[name]
    overrides = model_overrides(recipe)
    if recipe.model.pretrained:  # a file that records its model configuration must fit the recipe's model
        cfg = get_config(recipe.model.name, **overrides)
        check_architecture(cfg, recipe.model.pretrained, f"model.name={recipe.model.name}")
    encoder = build_encoder(recipe.model.name, configuration, normalize_output=normalize_output, **overrides)
    layers, part = checkpointing(recipe, encoder.cfg.depth)
    if layers:
        encoder.set_grad_checkpointing(True, layers, part=part)
    if tokenizer is not None and tokenizer.vocab_size > encoder.cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the text embedding "
            f"{encoder.cfg.vocab_size} rows: "
            f"set model.overrides.vocab_size >= {tokenizer.vocab_size}"
        )
    t, groups = recipe.task, recipe.param_groups
    optim = OptimSettings(recipe.train.weight_decay, groups.layer_decay, groups.head_lr_scale)
    num_classes = t.num_classes or len(classes)
    if name == "image_classification":
        task = ImageClassification(encoder, num_classes, t.label_smoothing, optim)
    elif name == "text_classification":
        task = TextClassification(encoder, num_classes, t.label_smoothing, optim)
    elif name == "vqa":
        task = VQA(encoder, num_classes, optim)
    elif name == "nlvr2":
        task = NLVR2(encoder, optim)
    elif name == "retrieval":
        task = Retrieval(encoder, optim)
    elif name == "captioning":
        task = Captioning(encoder, t.label_smoothing, optim)
    else:  # prompt_classification
        if tokenizer is None:
            raise ConfigError("prompt_classification needs data.tokenizer to encode the class prompts")
        prompts = [t.prompt.format(c.replace("_", " ")) for c in classes]
        ids, pad = tokenizer.encode_batch(prompts, recipe.data.max_text_len)
        task = PromptClassification(Retrieval(encoder, optim), ids, pad)
    report = None
    if recipe.model.pretrained:
        target = task.retrieval if isinstance(task, PromptClassification) else task
        keys = full_model_keys(recipe.model.name, **overrides)
        report = load_pretrained(target, recipe.model.pretrained, keys)
    return task, report
