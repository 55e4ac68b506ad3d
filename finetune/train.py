"""``beit3-finetune``: finetune a (pretrained) BEiT-3 on a task with DeepSpeed, then evaluate and export.

Runs under torchrun, the ``deepspeed`` launcher (``deepspeed --module beit3.finetune.train``), ``srun`` or
as a single process::

    beit3-finetune --task vqa --config finetune/recipes/easy_vqa_small.toml \\
        --ds-config ds_configs/zero0_fp32.json --output-dir runs/vqa --set model.pretrained=model.pth

The run directory holds config.json, tensorboard/, checkpoints/ (``--resume auto`` continues from the
latest), and after a finished run ``eval.json`` (the task metric on the eval split) and ``model.pth``
(the finetuned task model, released format). ``--eval-only CHECKPOINT`` evaluates a saved ``model.pth``.
Exit codes: 0 finished, 75 checkpointed after SIGTERM/SIGUSR1 (requeue), 2 bad configuration, 3 stopped after
too many non-finite losses in a row, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch.distributed as torch_dist

from beit3.engine.checkpoint import CheckpointError as ResumeError
from beit3.engine.checkpoint import resolve_resume
from beit3.engine.config_io import ConfigError, dotted_overrides, to_dict
from beit3.engine.ds_config import EngineConfigError, load_ds_config, trained_global_batch
from beit3.engine.launch import LaunchError, add_run_args, init_distributed, shutdown_distributed
from beit3.engine.optim import OptimizerConfigError
from beit3.engine.supervise import supervised
from beit3.engine.trainer_config import check_output_dir, preflight
from beit3.finetune.builder import build_task, model_config
from beit3.finetune.data.batches import BatchLoader, Collator, tokenize_split
from beit3.finetune.data.build import load_task_data
from beit3.finetune.data.sources import DataSourceError
from beit3.finetune.decoding import BeamSearchConfig
from beit3.finetune.evaluate import evaluate, sample_captions
from beit3.finetune.recipe import FinetuneRecipe, load_recipe, validate_run
from beit3.finetune.reload import trusted_checkpoints
from beit3.model import ModelConfigError, WeightsFileError
from beit3.tokenizers.text import TokenizerError

log = logging.getLogger("beit3.finetune")

EXIT_CONFIG = 2
# Every exception type that means "the configuration is wrong": exit 2 with its one-line message.
CONFIG_ERRORS = (
    ConfigError,
    EngineConfigError,
    ResumeError,
    DataSourceError,
    WeightsFileError,
    ModelConfigError,
    TokenizerError,
    OptimizerConfigError,
    LaunchError,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="beit3-finetune",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_run_args(p, config_help="recipe TOML (finetune/recipes/*.toml) or a recipe name")
    p.add_argument("--task", default=None, help="task name; overrides task.name of the recipe")
    p.add_argument("--eval-only", metavar="CHECKPOINT", default=None,
                   help="evaluate a finetuned model.pth (released format) instead of training")  # fmt: skip
    return p


def _decoding(recipe: FinetuneRecipe) -> BeamSearchConfig:
    c = recipe.captioning
    return BeamSearchConfig(num_beams=c.num_beams, max_len=c.max_len, length_penalty=c.length_penalty)


def trainer_config(recipe: FinetuneRecipe, args, ds_config: dict, model: dict | None = None):
    """The engine's TrainerConfig from the recipe's [train] section (layer decay and head scale stay here).

    ``run_info`` (config.json): the recipe, the command and ``model``, the resolved model configuration of
    the task's backbone (builder.model_config); the engine records the DeepSpeed config itself.
    """
    from beit3.engine.trainer import TrainerConfig

    run_info = {"recipe": to_dict(recipe), "command": sys.argv, "model": model}
    return TrainerConfig.from_section(
        recipe.train, output_dir=args.output_dir, resume=args.resume, run_info=run_info,
        shutdown_at_end=False,  # the final evaluation and the export still need the process group
    )  # fmt: skip


def prepare(recipe: FinetuneRecipe):
    """Tokenizer, task data (tokenised) and the task module a recipe describes."""
    tokenizer = None
    if recipe.data.tokenizer:
        from beit3.tokenizers.text import TextTokenizer

        tokenizer = TextTokenizer(recipe.data.tokenizer)
    img_size = recipe.model.img_size or _preset_img_size(recipe.model.name)
    data = load_task_data(recipe.data, recipe.task.name, img_size)
    if tokenizer is not None:
        for split in (data.train, data.eval):
            tokenize_split(split, tokenizer, recipe.data.max_text_len)
    task, report = build_task(recipe, data.classes, tokenizer)
    if report is not None:
        log.info("loaded %s: %s", recipe.model.pretrained, report)
    return tokenizer, data, task


def _preset_img_size(name: str) -> int:
    from beit3.model import get_config

    return get_config(name).img_size


@supervised  # under beit3-launch: the exit code reaches the launcher (engine/supervise.py)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    owns_process_group = not torch_dist.is_initialized()  # an embedding caller keeps its own group
    try:
        dist = init_distributed(args.local_rank)
    except LaunchError as e:
        return config_error(e, rank=0)
    try:
        # Every check that needs neither data nor a model runs first: a mistake costs seconds.
        overrides = list(args.set) + ([f"task.name={args.task}"] if args.task else [])
        recipe = load_recipe(args.config, overrides)
        ds_config = load_ds_config(args.ds_config, dist.world_size, dotted_overrides(args.ds_set))
        trained = None
        if not args.eval_only:
            check_output_dir(args.output_dir)
            trained = trained_global_batch(resolve_resume(args.resume, args.output_dir))
        validate_run(recipe, ds_config, dist.world_size, trained)
        if args.eval_only:
            if not Path(args.eval_only).is_file():
                raise ConfigError(f"--eval-only {args.eval_only} does not exist: give a finetuned model.pth")
        else:
            preflight(trainer_config(recipe, args, ds_config), ds_config, dist.world_size)
        with trusted_checkpoints(args.trust_checkpoint):  # model.pretrained: refused beyond the allowlist
            tokenizer, data, task = prepare(recipe)
    except CONFIG_ERRORS as e:
        return config_error(e, dist.rank)
    micro = ds_config["train_micro_batch_size_per_gpu"]
    name = recipe.task.name

    def run_eval(step: int = 0) -> dict[str, float]:
        return evaluate(name, task, data.eval, micro, dist.device, num_answers=len(data.classes),
                        tokenizer=tokenizer, decoding=_decoding(recipe))  # fmt: skip

    if args.eval_only:
        from beit3.finetune.reload import load_finetuned

        try:
            load_finetuned(task, args.eval_only, trusted=args.trust_checkpoint)
        except WeightsFileError as e:
            print(f"beit3-finetune: error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        task.to(dist.device)
        scores = run_eval()
        if dist.rank == 0:
            print(json.dumps(scores, indent=1))
        return 0
    from beit3.engine.trainer import Trainer

    collate = Collator(
        name,
        data.train.images,
        num_answers=len(data.classes),
        hflip=recipe.data.hflip,
        mask_prob=recipe.captioning.mask_prob,
        mask_id=tokenizer.mask_id if tokenizer else 0,
    )
    loader = BatchLoader(data.train, collate, micro, dist.rank, dist.world_size, seed=recipe.data.seed)
    try:
        with trusted_checkpoints(args.trust_checkpoint):  # resume from a checkpoint of another origin
            cfg = trainer_config(recipe, args, ds_config, model_config(task).to_dict())
            trainer = Trainer(task, loader, ds_config, cfg, dist, eval_fn=run_eval)
    except CONFIG_ERRORS as e:
        return config_error(e, dist.rank)
    result = trainer.fit()
    if result.exit_reason != "finished":
        _shutdown(owns_process_group)
        return result.exit_code
    scores = run_eval()
    out = Path(args.output_dir)
    report = {"step": result.step, **scores}
    if name == "captioning" and data.eval.examples:
        report["samples"] = sample_captions(task, data.eval, tokenizer, 4, _decoding(recipe))
    if dist.rank == 0:
        (out / "eval.json").write_text(json.dumps(report, indent=1))
        log.info("eval: %s", scores)
    export_finetuned(out, dist.rank)
    _shutdown(owns_process_group)
    return 0


def config_error(error: Exception, rank: int) -> int:
    """Print the one-line message of a configuration error (rank 0) and return exit code 2."""
    if rank == 0:
        message = " ".join(str(error).split())
        print(f"beit3-finetune: error: {message[:600]}", file=sys.stderr)
    return EXIT_CONFIG


def _shutdown(owns_process_group: bool) -> None:
    if owns_process_group:
        shutdown_distributed()
    elif torch_dist.is_initialized():
        torch_dist.barrier()  # ranks leave together; the caller destroys the group


def export_finetuned(run_dir: Path, rank: int) -> Path | None:
    """Consolidate the last checkpoint into ``run_dir/model.pth``: ``{"model": sd, "config": ...}``, released
    key names in "model" (all the released finetuning code reads) and, in "config", the backbone's model
    configuration that ``run_dir/config.json`` records (none for a run directory without one)."""
    from beit3.engine.consolidate import consolidate_checkpoint
    from beit3.model import save_checkpoint

    if rank != 0:
        return None
    state = consolidate_checkpoint(run_dir)
    recorded = json.loads((run_dir / "config.json").read_text()).get("model")
    return save_checkpoint(state, run_dir / "model.pth", config=recorded)


if __name__ == "__main__":
    sys.exit(main())
