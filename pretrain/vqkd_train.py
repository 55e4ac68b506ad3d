"""``beit3-vqkd train``: train a VQ-KD visual tokenizer against a frozen teacher, as a task on the engine.

DeepSpeed (ZeRO 0-2, fp32 with optional bf16 autocast of the ViTs), exact resume, preemption by signal, the
run directory of every training program (``config.json``, ``checkpoints/``, ``tensorboard/``). At the end
rank 0 writes the frozen tokenizer file ``tokenizer.pth`` (``{"model": weights, "step", "overrides"}``, the
released layout ``beit3.tokenizers.vqkd.build_visual_tokenizer`` loads) and ``summary.json`` (evaluation
before and after). Runs as ``beit3-vqkd train``, or under torchrun / srun as
``-m beit3.pretrain.vqkd_train``::

    beit3-vqkd train --config pretrain/recipes/vqkd/tiny.toml --ds-config ds_configs/vqkd_fp32.json \\
        --output-dir runs/vqkd_tiny --set 'data.paths=["photos/"]'
    torchrun --nproc_per_node 8 -m beit3.pretrain.vqkd_train --config pretrain/recipes/vqkd/base_clip.toml \\
        --ds-config ds_configs/vqkd_fp32.json --output-dir runs/vqkd_base

Exit codes: 0 finished, 75 checkpointed after SIGTERM/SIGUSR1 (requeue), 2 bad configuration, 3 stopped after
too many non-finite losses in a row, 1 anything else. ``beit3-vqkd list`` and ``beit3-vqkd codes`` are the
tokenizer's own commands (``beit3.tokenizers.vqkd_cli``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from beit3.engine.checkpoint import atomic_write_bytes
from beit3.engine.config_io import ConfigError
from beit3.engine.program import Built, RunContext, TrainingRun, program_parser, recipe_record, run_training
from beit3.engine.supervise import supervised
from beit3.pretrain.errors import PretrainError
from beit3.pretrain.vqkd_recipe import VQKDRecipe, load_recipe, train_settings, validate
from beit3.tokenizers.errors import TokenizersError

log = logging.getLogger("beit3.vqkd")

PROGRAM = "beit3-vqkd train"
TOKENIZER_FILE = "tokenizer.pth"
SUMMARY_FILE = "summary.json"
# The error bases that mean "this configuration cannot run" (exit 2), beside the engine's.
CONFIG_ERRORS = (PretrainError, TokenizersError)


def build_parser() -> argparse.ArgumentParser:
    return program_parser(PROGRAM, __doc__, "recipe TOML (pretrain/recipes/vqkd/*.toml)")


def build_run(recipe: VQKDRecipe, ds_config: dict, dist, seed: int):
    """The task (tokenizer + frozen teacher on the device), this rank's data stream and evaluation views.

    The teacher's width is checked against the tokenizer config before any image is read.
    """
    from beit3.pretrain.vqkd_task import CachedViews, OnlineCrops, VQKDTask, teacher_features
    from beit3.tokenizers.images import find_images, fixed_views
    from beit3.tokenizers.teachers import build_teacher
    from beit3.tokenizers.vqkd import build_vqkd

    tok, data = recipe.tokenizer, recipe.data
    teacher = build_teacher(recipe.teacher.name, recipe.teacher.weights or None).to(dist.device)
    vqkd = build_vqkd(tok.name, seed=seed, **tok.overrides)
    if teacher.dim != vqkd.cfg.teacher_dim:
        raise ConfigError(
            f"teacher {recipe.teacher.name} gives {teacher.dim}-d features but tokenizer {tok.name} "
            f"reconstructs {vqkd.cfg.teacher_dim}: set tokenizer.overrides.teacher_dim={teacher.dim}"
        )
    micro = int(ds_config["train_micro_batch_size_per_gpu"])
    gas = int(ds_config["gradient_accumulation_steps"])
    size, rank, world = vqkd.cfg.img_size, dist.rank, dist.world_size
    paths = find_images(data.paths)
    if data.online:
        shard = paths[rank::world]
        if not shard:
            raise ConfigError(f"data.paths: {world} ranks but only {len(paths)} images: add images")
        eval_views = fixed_views(shard[: data.eval_images], size, 1, data.seed)
        stream = OnlineCrops(shard, size, data.crop_scale, micro, data.num_workers, data.seed + 1000 * rank)
        eval_targets = teacher_features(teacher, eval_views, dist.device)
    else:
        views = fixed_views(paths, size, data.views_per_image, data.seed, data.crop_scale)[rank::world]
        if len(views) == 0:
            raise ConfigError(
                f"data.paths: {world} ranks but only {len(paths)} images: add images or data.views_per_image"
            )
        eval_views, eval_targets = views, teacher_features(teacher, views, dist.device)
        stream = CachedViews(views, eval_targets, micro, data.seed + 1000 * rank)
    task = VQKDTask(
        vqkd,
        None if not data.online else teacher,
        weight_decay=recipe.train.weight_decay,
        kmeans_init=recipe.codebook.kmeans_init,
        restart_every=recipe.codebook.restart_every,
        dead_fraction=recipe.codebook.dead_fraction,
        autocast=tok.autocast,
        gas=gas,
        seed=seed,
    )
    return task, stream, (eval_views, eval_targets)


@supervised  # under beit3-launch: the exit code reaches the launcher (engine/supervise.py)
def train_main(argv: list[str] | None = None) -> int:
    """The training program; returns the exit status."""
    return run_training(PROGRAM, build_parser().parse_args(argv), prepare, CONFIG_ERRORS)


def prepare(context: RunContext) -> TrainingRun:
    """Check the recipe against the tokenizer registry and the DeepSpeed config (no image read yet); the
    run's ``build`` makes the tokenizer, teacher and data, ``start`` measures the untrained tokenizer on a
    fresh run, ``finish`` writes the tokenizer file and the summary."""
    from beit3.tokenizers.vqkd import get_vqkd_config

    args, dist = context.args, context.dist
    recipe = load_recipe(args.config, args.set)
    ds_config = validate(recipe, context.ds_config, dist.world_size)
    record = recipe_record(recipe)
    model = dataclasses.asdict(get_vqkd_config(recipe.tokenizer.name, **recipe.tokenizer.overrides))
    settings = train_settings(recipe)
    out, state = Path(args.output_dir), {}

    def build() -> Built:
        task, stream, (views, targets) = build_run(recipe, ds_config, dist, settings.seed)
        state.update(task=task, views=views, targets=targets, last_eval={})
        return Built(task, stream, eval_fn=_eval_fn(task, views, targets, state["last_eval"]))

    def start(trainer) -> None:
        if trainer.step == 0:  # a fresh run: the untrained tokenizer (random codebook, before k-means)
            from beit3.pretrain.vqkd_task import evaluate

            before = evaluate(state["task"].vqkd, state["views"], state["targets"])
            if dist.is_main:
                _write_json(out / SUMMARY_FILE, {"before": before, "world_size": dist.world_size})
        state["start"] = time.perf_counter()

    def finish(trainer, result) -> int:
        if dist.is_main:
            vqkd, overrides = state["task"].vqkd, recipe.tokenizer.overrides
            export_tokenizer(vqkd, out / TOKENIZER_FILE, result.step, overrides)
            if state["last_eval"]:  # evaluated at this invocation's last step (not a resumed finished run)
                _write_summary(out, record, dist.world_size, result.step, state)
        return 0

    return TrainingRun(settings, {"recipe": record, "model": model}, build, ds_config, start, finish)


def _write_summary(out: Path, record: dict, world_size: int, step: int, state: dict) -> None:
    """summary.json: evaluation before and after training; one console line with the change."""
    last_eval = state["last_eval"]
    summary = _read_json(out / SUMMARY_FILE)
    summary.update(
        recipe=record,
        world_size=world_size,
        step=step,
        after=last_eval["after"],
        codebook_rank_max_diff=last_eval["codebook_rank_max_diff"],
        train_seconds=time.perf_counter() - state["start"],
    )
    _write_json(out / SUMMARY_FILE, summary)
    before, after = summary.get("before"), summary["after"]
    if before:
        print(
            f"rec loss {before['loss_rec']:.4f} -> {after['loss_rec']:.4f}; used codes "
            f"{before['used_codes']:.0f} -> {after['used_codes']:.0f}; perplexity "
            f"{before['perplexity']:.1f} -> {after['perplexity']:.1f}; wrote {out / TOKENIZER_FILE}",
            flush=True,
        )


def _eval_fn(task, eval_views, eval_targets, last_eval: dict):
    """The engine's evaluation hook: reconstruction and code usage on the fixed views (all ranks), and
    whether the ranks' codebooks still agree (they must: the EMA is all-reduced, restarts broadcast)."""
    from beit3.pretrain.vqkd_task import evaluate, ranks_agree

    def eval_fn(step: int) -> dict[str, float]:
        after = evaluate(task.vqkd, eval_views, eval_targets)
        diff = ranks_agree(task.vqkd.quantize.embedding.weight)
        last_eval.update(after=after, codebook_rank_max_diff=diff)
        return {**{f"eval/{k}": v for k, v in after.items()}, "eval/codebook_rank_max_diff": diff}

    return eval_fn


def export_tokenizer(vqkd, path: Path, step: int, overrides: dict) -> None:
    """The frozen tokenizer file (``save_vqkd_checkpoint``'s format), written to a temp file then renamed."""
    from beit3.tokenizers.vqkd import save_vqkd_checkpoint

    tmp = path.with_name(path.name + ".tmp")
    save_vqkd_checkpoint(vqkd, tmp, step=step, overrides=dict(overrides))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(data, indent=2).encode())


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``beit3-vqkd``: ``train`` runs here, ``list`` and ``codes`` in the tokenizer's CLI."""
    argv = sys.argv[1:] if argv is None else list(argv)
    positional = [i for i, a in enumerate(argv) if not a.startswith("-")]
    if positional and argv[positional[0]] == "train":
        return train_main(argv[: positional[0]] + argv[positional[0] + 1 :])
    from beit3.tokenizers.vqkd_cli import main as tokenizer_main

    return tokenizer_main(argv)


if __name__ == "__main__":
    sys.exit(train_main())
