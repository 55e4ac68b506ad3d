"""``beit3-pretrain``: masked data modeling on images, texts and image-text pairs with DeepSpeed.

Runs under torchrun, the ``deepspeed`` launcher (``deepspeed --module beit3.pretrain.train``), ``srun``
(rendezvous from Slurm's variables) or as a single process::

    beit3-pretrain --config pretrain/recipes/demo.toml --ds-config ds_configs/zero3_fp32.json \\
        --output-dir runs/demo --set train.total_steps=100

Exit codes: 0 finished, 75 checkpointed after SIGTERM/SIGUSR1 (requeue), 2 bad configuration, 3 stopped after
too many non-finite losses in a row, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from beit3.engine.config_io import ConfigError
from beit3.engine.program import Built, RunContext, TrainingRun, program_parser, recipe_record, run_training
from beit3.engine.supervise import supervised
from beit3.model import ModelError
from beit3.pretrain.errors import PretrainError
from beit3.pretrain.evaluation import eval_hook, train_settings
from beit3.pretrain.recipe import (
    PretrainRecipe,
    check_text_tokenizer,
    check_visual_tokenizer,
    grad_checkpoint_layers,
    grad_checkpoint_part,
    load_recipe,
    validate,
)
from beit3.pretrain.warm_start import apply_warm_start, warm_start_weights, write_report
from beit3.tokenizers.errors import TokenizersError

log = logging.getLogger("beit3.pretrain")

PROGRAM = "beit3-pretrain"
# The error bases that mean "this configuration cannot run" (exit 2), beside the engine's.
CONFIG_ERRORS = (PretrainError, ModelError, TokenizersError)


def build_parser() -> argparse.ArgumentParser:
    p = program_parser(PROGRAM, __doc__, "recipe TOML (pretrain/recipes/*.toml)")
    p.add_argument("--export", metavar="PATH", default=None,
                   help="after a finished run, write the verified released-format checkpoint")  # fmt: skip
    return p


def build_task(
    recipe: PretrainRecipe, device, visual_checkpoint: dict | None = None, warm_start: dict | None = None
):
    """The model, frozen tokenizers and task module described by the recipe, and the warm start's report
    (None without one).

    The tokenizers are loaded and checked against the model's preset before the model is built, so a
    mismatch costs seconds, not the construction of a 1.9B-parameter model. ``warm_start``: the weights of
    ``[model] warm_start`` (beit3.pretrain.warm_start), loaded as soon as the model is built.
    """
    from beit3.model import build_model, get_config
    from beit3.pretrain.objective import MaskedDataModeling
    from beit3.tokenizers.text import TextTokenizer
    from beit3.tokenizers.vqkd import VQKDConfigError, build_visual_tokenizer

    overrides = model_overrides(recipe)
    model_cfg = get_config(recipe.model.name, **overrides)
    text_tok = TextTokenizer(recipe.tokenizers.text)
    check_text_tokenizer(text_tok.vocab_size, model_cfg)
    try:
        visual = build_visual_tokenizer(
            recipe.tokenizers.visual,
            visual_checkpoint,
            device=device,
            input_size=recipe.data.tokenizer_img_size,
        )
    except VQKDConfigError as e:
        raise ConfigError(
            f"[tokenizers] visual_checkpoint={recipe.tokenizers.visual_checkpoint!r} does not fit "
            f"visual={recipe.tokenizers.visual!r} ({' '.join(str(e).split())[:200]}): give the checkpoint "
            "of that tokenizer, or set visual to the name it was trained as (beit3-vqkd list)"
        ) from e
    check_visual_tokenizer(recipe, visual.codebook_size, visual.model.cfg.patch_size, model_cfg)
    model = build_model(recipe.model.name, **overrides)
    report = None
    if warm_start is not None:
        report = apply_warm_start(model, warm_start, recipe.model.warm_start)
    layers = grad_checkpoint_layers(recipe.model.grad_checkpointing, model.cfg.depth)
    if layers:
        model.set_grad_checkpointing(True, layers, grad_checkpoint_part(recipe.model.grad_checkpointing_part))
    if recipe.model.compile == "layers":
        model.compile_layers(recipe.model.compile_backend, recipe.model.compile_mode or None)
    task = MaskedDataModeling(model, visual, recipe.objective, weight_decay=recipe.train.weight_decay)
    return task, text_tok, report


def model_overrides(recipe: PretrainRecipe) -> dict:
    """The preset overrides of the recipe's [model] section (drop_path_rate, then ``overrides``)."""
    return {"drop_path_rate": recipe.model.drop_path_rate, **recipe.model.overrides}


@supervised  # under beit3-launch: the exit code reaches the launcher (engine/supervise.py)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_training(PROGRAM, args, prepare, CONFIG_ERRORS)


def prepare(context: RunContext) -> TrainingRun:
    """Read and check the recipe against the DeepSpeed config and world size (no model yet); the model,
    tokenizers and loader are built by the returned run's ``build``."""
    from beit3.model import get_config
    from beit3.pretrain.data import build_pretrain_loader

    args, dist = context.args, context.dist
    recipe = load_recipe(args.config, args.set)
    check_export_path(args.export)  # a two-week run must not end on a path it cannot write
    split, visual_checkpoint = validate(
        recipe, context.ds_config, dist.world_size, context.trained_global_batch
    )
    model_cfg = get_config(recipe.model.name, **model_overrides(recipe))
    model = model_cfg.to_dict()
    # Read and checked now, on every rank (each loads it into its model before ZeRO-3 partitions it); None
    # without [model] warm_start or when the run resumes (beit3.pretrain.warm_start).
    warm_weights = warm_start_weights(
        recipe, args.resume, args.output_dir, model_cfg, args.trust_checkpoint, dist.rank == 0
    )

    def build() -> Built:
        nonlocal warm_weights
        task, text_tok, warm = build_task(recipe, dist.device, visual_checkpoint, warm_weights)
        warm_weights = None  # the model holds them now
        if warm is not None and dist.rank == 0:
            log.info("warm start from %s: %s", recipe.model.warm_start, warm)
            write_report(args.output_dir, recipe.model.warm_start, warm)
        loader = build_pretrain_loader(
            recipe.data, text_tok, split["images"], split["texts"], split["pairs"],
            rank=dist.rank, world_size=dist.world_size,
        )  # fmt: skip
        evaluate = eval_hook(recipe.eval, recipe.data, text_tok, split, task, dist)  # None: no [eval]
        return Built(task, loader, eval_fn=evaluate)

    def finish(trainer, result) -> int:
        if recipe.model.compile != "none":
            stats = trainer.task.model.compile_stats()
            log.info("compiled layers (%s): %s", recipe.model.compile_backend, stats)
            if dist.rank == 0:
                (Path(args.output_dir) / "compile.json").write_text(json.dumps(stats) + "\n")
        if args.export and dist.rank == 0:
            from beit3.pretrain.export import export_run

            export_run(Path(args.output_dir), Path(args.export))
        return 0

    settings = train_settings(recipe.train, recipe.eval)  # held-out shards: evaluated at the end at least
    return TrainingRun(settings, {"recipe": recipe_record(recipe), "model": model}, build, finish=finish)


def check_export_path(path: str | None) -> None:
    """``--export`` must name a file that can be written once the run has finished."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--export {path} is a directory: give a file path (.pth, or .safetensors)")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--export {path}: {existing} is not a writable directory: give another path")


if __name__ == "__main__":
    sys.exit(main())
