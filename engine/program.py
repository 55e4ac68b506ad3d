"""One skeleton for every training program (``beit3-pretrain``, ``beit3-finetune``, ``beit3-vqkd train``).

A program parses its arguments (:func:`~beit3.engine.launch.add_run_args` plus its own) and hands
:func:`run_training` a *prepare* callback. The skeleton owns what every program does alike, in this order,
so that a mistake costs seconds on every rank before any model exists:

1. logging, the process group (:func:`~beit3.engine.launch.init_distributed`);
2. the DeepSpeed JSON with its ``--ds-set`` overrides, the run directory, the ``--resume`` choice and the
   global batch a resumed checkpoint was trained with;
3. ``prepare(context)``: the program reads and validates its recipe and returns a :class:`TrainingRun`
   (its ``[train]`` table, what ``config.json`` records, and a ``build`` callback);
4. :func:`~beit3.engine.trainer_config.preflight` (settings, DeepSpeed's own parser, precision, resume);
5. seeding, then ``build()`` (tokenizers, model, data), then the :class:`~beit3.engine.trainer.Trainer`;
6. ``fit``, then the program's ``finish`` after a finished run, then leaving the process group.

Any error of the engine or of the packages the program names in ``errors`` (their bases: docs/architecture.md,
"Errors") raised during steps 1-5 is a configuration error: one line on stderr from rank 0 and exit code 2.
Errors during training keep their own codes (engine/supervise.py has the contract).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist

from beit3.engine.errors import EngineError
from beit3.engine.supervise import EXIT_CONFIG
from beit3.engine.trainer_config import TrainerConfig, TrainResult, TrainSettings

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
MAX_MESSAGE = 600  # characters of a configuration error printed (a DeepSpeed message can be a page)


@dataclass
class RunContext:
    """What the skeleton knows before the program's recipe is read."""

    args: argparse.Namespace
    dist: Any  # beit3.engine.launch.DistInfo
    ds_config: dict  # the DeepSpeed JSON with --ds-set applied, resolved for this world size
    trained_global_batch: int | None  # that of the checkpoint being resumed (None: a fresh run)


@dataclass
class Built:
    """What a program's ``build`` returns: the task module, its data source and evaluation hook."""

    task: torch.nn.Module
    data: Any  # beit3.engine.data_source.DataSource
    eval_fn: Callable[[int], dict[str, float]] | None = None
    record: dict = field(default_factory=dict)  # more for config.json, known once built (e.g. "model")


@dataclass
class TrainingRun:
    """A program's answer to ``prepare``: the run, described before anything large is built.

    ``settings`` is the recipe's ``[train]`` table; ``record`` what ``config.json`` keeps beside the
    engine's own entries (the recipe, the resolved model configuration); ``ds_config`` replaces the
    context's when the program resolved it further. ``start`` runs after the trainer exists (it knows the
    resumed step) and before ``fit``; ``finish`` runs after a finished ``fit`` and returns the exit code.
    ``keep_process_group``: ``finish`` needs collectives (an evaluation over every rank), so the group is
    left only after it.
    """

    settings: TrainSettings
    record: dict
    build: Callable[[], Built]
    ds_config: dict | None = None
    start: Callable[[Any], None] | None = None
    finish: Callable[[Any, TrainResult], int] | None = None
    keep_process_group: bool = False


def program_parser(program: str, doc: str, config_help: str) -> argparse.ArgumentParser:
    """A training program's parser: its name, the module docstring ``doc`` as description (first paragraph)
    and epilog, and the options of every training program (:func:`~beit3.engine.launch.add_run_args`)."""
    from beit3.engine.launch import add_run_args

    parser = argparse.ArgumentParser(
        prog=program,
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc,
    )
    return add_run_args(parser, config_help=config_help)


def recipe_record(recipe: Any) -> dict:
    """A recipe as ``config.json`` records it: every table but ``[train]``, which the engine records (as
    run) under ``engine.trainer``, so that each setting is written once."""
    from beit3.engine.config_io import to_dict

    return {name: table for name, table in to_dict(recipe).items() if name != "train"}


def setup_logging() -> None:
    """The console log format of every program: time, logger, level, message."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def config_error(program: str, error: BaseException, rank: int) -> int:
    """Print the one-line message of a configuration error (rank 0 only) and return exit code 2."""
    if rank == 0:
        message = " ".join(str(error).split())
        print(f"{program}: error: {message[:MAX_MESSAGE]}", file=sys.stderr)
    return EXIT_CONFIG


def run_training(
    program: str,
    args: argparse.Namespace,
    prepare: Callable[[RunContext], TrainingRun],
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Run a training program (see the module docstring); returns its exit code.

    ``args`` must carry the options of :func:`~beit3.engine.launch.add_run_args`; ``errors`` are the
    exception bases (beside the engine's) that mean "this configuration cannot run".
    """
    from beit3.engine.checkpoint import resolve_resume, trained_global_batch
    from beit3.engine.config_io import dotted_overrides
    from beit3.engine.ds_config import load_ds_config
    from beit3.engine.launch import init_distributed
    from beit3.engine.safe_load import trusted_files
    from beit3.engine.trainer import Trainer, seed_everything
    from beit3.engine.trainer_config import check_output_dir, preflight

    setup_logging()
    config_errors = (EngineError, *errors)
    owns_process_group = not torch_dist.is_initialized()  # an embedding caller keeps its own group
    try:
        dist = init_distributed(args.local_rank)
    except config_errors as e:
        return config_error(program, e, rank=0)
    try:
        ds_config = load_ds_config(args.ds_config, dist.world_size, dotted_overrides(args.ds_set))
        check_output_dir(args.output_dir)
        resume_from = resolve_resume(args.resume, args.output_dir)  # a --resume that cannot be honoured
        context = RunContext(args, dist, ds_config, trained_global_batch(resume_from))
        run = prepare(context)
        ds_config = run.ds_config if run.ds_config is not None else ds_config
        record = {**run.record, "command": sys.argv}
        cfg = TrainerConfig.for_run(
            run.settings, args.output_dir, resume=args.resume, run_info=record,
            shutdown_at_end=not run.keep_process_group,
        )  # fmt: skip
        preflight(cfg, ds_config, dist.world_size)
        seed_everything(cfg.seed)  # the same initial weights on every rank and every run
        with trusted_files(args.trust_checkpoint):  # files of another origin, when the user says so
            built = run.build()
            cfg.run_info = {**record, **built.record}
            trainer = Trainer(built.task, built.data, ds_config, cfg, dist, eval_fn=built.eval_fn)
    except config_errors as e:
        return config_error(program, e, dist.rank)
    if run.start is not None:
        run.start(trainer)
    result = trainer.fit()
    code = result.exit_code
    if result.exit_reason == "finished" and run.finish is not None:
        code = run.finish(trainer, result)
    if run.keep_process_group:
        leave_process_group(owns_process_group)
    return code


def leave_process_group(owns_process_group: bool) -> None:
    """Destroy the process group this program created; in an embedding caller's group, only wait for the
    other ranks (the caller destroys it)."""
    from beit3.engine.launch import shutdown_distributed

    if owns_process_group:
        shutdown_distributed()
    elif torch_dist.is_initialized():
        torch_dist.barrier()
