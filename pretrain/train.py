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
import logging
import os
import sys
from pathlib import Path

from beit3.engine.checkpoint import CheckpointError, resolve_resume
from beit3.engine.config_io import ConfigError, dotted_overrides, to_dict
from beit3.engine.ds_config import EngineConfigError, load_ds_config, trained_global_batch
from beit3.engine.launch import LaunchError, add_run_args, init_distributed
from beit3.engine.optim import OptimizerConfigError
from beit3.engine.safe_load import trusted_files
from beit3.engine.supervise import supervised
from beit3.engine.trainer import Trainer, TrainerConfig, seed_everything
from beit3.engine.trainer_config import check_output_dir, preflight
from beit3.model import ModelConfigError
from beit3.pretrain.data import DataConfigError, build_pretrain_loader
from beit3.pretrain.recipe import (
    PretrainRecipe,
    check_text_tokenizer,
    check_visual_tokenizer,
    grad_checkpoint_layers,
    load_recipe,
    validate,
)
from beit3.tokenizers.masking import MaskingError
from beit3.tokenizers.text import TokenizerError
from beit3.tokenizers.vqkd import VQKDConfigError

log = logging.getLogger("beit3.pretrain")

EXIT_CONFIG = 2
# Every exception type that means "the configuration is wrong": exit 2 with its one-line message.
CONFIG_ERRORS = (
    ConfigError,
    EngineConfigError,
    CheckpointError,
    DataConfigError,
    TokenizerError,
    VQKDConfigError,
    MaskingError,
    ModelConfigError,
    OptimizerConfigError,
    LaunchError,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="beit3-pretrain",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_run_args(p, config_help="recipe TOML (pretrain/recipes/*.toml)")
    p.add_argument("--export", metavar="PATH", default=None,
                   help="after a finished run, write the verified released-format checkpoint")  # fmt: skip
    return p


def build_task(recipe: PretrainRecipe, device, visual_checkpoint: dict | None = None):
    """The model, frozen tokenizers and task module described by the recipe.

    The tokenizers are loaded and checked against the model's preset before the model is built, so a
    mismatch costs seconds, not the construction of a 1.9B-parameter model.
    """
    from beit3.model import build_model, get_config
    from beit3.pretrain.objective import MaskedDataModeling
    from beit3.tokenizers.text import TextTokenizer
    from beit3.tokenizers.vqkd import build_visual_tokenizer

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
    layers = grad_checkpoint_layers(recipe.model.grad_checkpointing, model.cfg.depth)
    if layers:
        model.set_grad_checkpointing(True, layers)
    task = MaskedDataModeling(model, visual, recipe.objective, weight_decay=recipe.train.weight_decay)
    return task, text_tok


def model_overrides(recipe: PretrainRecipe) -> dict:
    """The preset overrides of the recipe's [model] section (drop_path_rate, then ``overrides``)."""
    return {"drop_path_rate": recipe.model.drop_path_rate, **recipe.model.overrides}


def trainer_config(recipe: PretrainRecipe, args, ds_config: dict) -> TrainerConfig:
    """The engine's settings: the recipe's [train] section plus the run directory and what to record.

    ``run_info`` (config.json): the recipe, the command and the resolved model configuration; the engine
    records the DeepSpeed config itself.
    """
    from beit3.model import get_config

    model = get_config(recipe.model.name, **model_overrides(recipe)).to_dict()
    run_info = {"recipe": to_dict(recipe), "command": sys.argv, "model": model}
    return TrainerConfig.from_section(
        recipe.train, output_dir=args.output_dir, resume=args.resume, run_info=run_info
    )


@supervised  # under beit3-launch: the exit code reaches the launcher (engine/supervise.py)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        dist = init_distributed(args.local_rank)
    except LaunchError as e:
        return config_error(e, rank=0)
    try:
        # Every check that needs no model runs first: a mistake costs seconds, on every rank alike.
        recipe = load_recipe(args.config, args.set)
        ds_config = load_ds_config(args.ds_config, dist.world_size, dotted_overrides(args.ds_set))
        check_output_dir(args.output_dir)
        check_export_path(args.export)  # a two-week run must not end on a path it cannot write
        resume_from = resolve_resume(args.resume, args.output_dir)  # a --resume that cannot be honoured
        trained = trained_global_batch(resume_from)  # a resume on other ranks keeps its global batch
        split, visual_checkpoint = validate(recipe, ds_config, dist.world_size, trained)
        cfg = trainer_config(recipe, args, ds_config)
        preflight(cfg, ds_config, dist.world_size)
        seed_everything(recipe.train.seed)  # the same initial weights on every rank and every run
        task, text_tok = build_task(recipe, dist.device, visual_checkpoint)
        loader = build_pretrain_loader(
            recipe.data, text_tok, split["images"], split["texts"], split["pairs"],
            rank=dist.rank, world_size=dist.world_size,
        )  # fmt: skip
        with trusted_files(args.trust_checkpoint):  # resume from a checkpoint of another origin
            trainer = Trainer(task, loader, ds_config, cfg, dist)
    except CONFIG_ERRORS as e:
        return config_error(e, dist.rank)
    result = trainer.fit()
    if result.exit_reason != "finished":
        return result.exit_code
    if args.export and dist.rank == 0:
        from beit3.pretrain.export import export_run

        export_run(Path(args.output_dir), Path(args.export))
    return 0


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


def config_error(error: Exception, rank: int) -> int:
    """Print the one-line message of a configuration error (rank 0) and return exit code 2."""
    if rank == 0:
        message = " ".join(str(error).split())
        print(f"beit3-pretrain: error: {message[:600]}", file=sys.stderr)
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
