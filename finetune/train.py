"""``beit3-finetune``: finetune a (pretrained) BEiT-3 on a task with DeepSpeed, then evaluate and export.

Runs under torchrun, the ``deepspeed`` launcher (``deepspeed --module beit3.finetune.train``), ``srun`` or
as a single process::

    beit3-finetune --task vqa --config finetune/recipes/easy_vqa_small.toml \\
        --ds-config ds_configs/zero0_fp32.json --output-dir runs/vqa --set model.pretrained=model.pth

The run directory holds config.json, tensorboard/, checkpoints/ (``--resume auto`` continues from the
latest; ``checkpoints/best.json`` names the best evaluated one, kept beside the last ``keep_last``), and
after a finished run ``eval.json`` (the task metric on the eval split; with ``train.ema_decay`` also that of
the EMA of the weights, as ``ema/<name>``), ``model.pth`` (the finetuned task model, released format),
``best_model.pth`` (the best evaluated checkpoint, same format) and, with an EMA, ``ema_model.pth``.
``--eval-only CHECKPOINT`` evaluates a saved ``model.pth``; with ``--predict OUT.json`` it writes the task's
official output for the eval split instead (VQA submission, COCO caption results, retrieval recalls).
Exit codes: 0 finished, 75 checkpointed after SIGTERM/SIGUSR1 (requeue), 2 bad configuration, 3 stopped after
too many non-finite losses in a row, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from beit3.engine.config_io import ConfigError, dotted_overrides
from beit3.engine.program import (
    Built,
    RunContext,
    TrainingRun,
    config_error,
    program_parser,
    recipe_record,
    run_training,
    setup_logging,
)
from beit3.engine.supervise import supervised
from beit3.engine.trainer_config import EMA_PREFIX
from beit3.finetune.builder import build_task, model_config
from beit3.finetune.data.augment import MixupSettings, TrainTransform, require
from beit3.finetune.data.batches import BatchLoader, Collator, tokenize_split
from beit3.finetune.data.build import load_task_data
from beit3.finetune.data.pair_stream import build_pair_stream
from beit3.finetune.data.sources import LazyImages
from beit3.finetune.decoding import BeamSearchConfig
from beit3.finetune.errors import FinetuneError
from beit3.finetune.evaluate import evaluate, final_report, predict, predicted_tasks
from beit3.finetune.outputs import write_json
from beit3.finetune.recipe import FinetuneRecipe, load_recipe, validate_run
from beit3.finetune.reload import trusted_checkpoints
from beit3.finetune.tasks import get_task
from beit3.model import ModelError
from beit3.tokenizers.errors import TokenizersError

log = logging.getLogger("beit3.finetune")

PROGRAM = "beit3-finetune"
CLASSES_FILE = "classes.json"  # in the run directory: the class / answer names the task was trained with
# The error bases that mean "this configuration cannot run" (exit 2), beside the engine's.
CONFIG_ERRORS = (FinetuneError, ModelError, TokenizersError)


def build_parser() -> argparse.ArgumentParser:
    p = program_parser(PROGRAM, __doc__, "recipe TOML (finetune/recipes/*.toml) or a recipe name")
    p.add_argument("--task", default=None, help="task name; overrides task.name of the recipe")
    p.add_argument("--eval-only", metavar="CHECKPOINT", default=None,
                   help="evaluate a finetuned model.pth (released format) instead of training")  # fmt: skip
    p.add_argument("--predict", metavar="OUT_JSON", default=None,
                   help="with --eval-only: write the official output of the eval split (VQA submission, "
                        "COCO caption results, retrieval recalls) to OUT_JSON")  # fmt: skip
    p.add_argument("--references", metavar="COCO_JSON", default=None,
                   help="with --predict for captioning: score against these COCO-format annotations "
                        "(images' captions) instead of the eval index's own captions")  # fmt: skip
    return p


def _decoding(recipe: FinetuneRecipe) -> BeamSearchConfig:
    c = recipe.captioning
    return BeamSearchConfig(num_beams=c.num_beams, max_len=c.max_len, length_penalty=c.length_penalty)


def build_run(recipe: FinetuneRecipe, train: bool = True, classes: list[str] | None = None):
    """Tokenizer, task data (tokenised) and the task module a recipe describes; ``train=False`` (evaluation,
    prediction) leaves the train split's images undecoded and its texts untokenised, and with ``classes``
    (a run's ``classes.json``) a released-format train index is not read at all."""
    tokenizer = None
    if recipe.data.tokenizer:
        from beit3.tokenizers.text import TextTokenizer

        tokenizer = TextTokenizer(recipe.data.tokenizer)
    data = load_task_data(
        recipe.data, recipe.task.name, _img_size(recipe), train_images=train, classes=classes, recipe=recipe
    )
    if tokenizer is not None:
        for split in (data.train, data.eval) if train else (data.eval,):
            tokenize_split(split, tokenizer, recipe.data.max_text_len)
    task, report = build_task(recipe, data.classes, tokenizer)
    if report is not None:
        log.info("loaded %s: %s", recipe.model.pretrained, report)
    return tokenizer, data, task


def _evaluate(recipe: FinetuneRecipe, task, data, tokenizer, batch_size: int, device) -> dict[str, float]:
    """The task metric on the eval split (every rank takes part)."""
    return evaluate(recipe.task.name, task, data.eval, batch_size, device, num_answers=len(data.classes),
                    tokenizer=tokenizer, decoding=_decoding(recipe),
                    workers=recipe.data.num_workers)  # fmt: skip


def augmentation(
    recipe: FinetuneRecipe, img_size: int, num_classes: int
) -> tuple[TrainTransform | None, MixupSettings | None]:
    """The recipe's training transform and Mixup/CutMix (None where off); timm and torchvision are
    imported (AugmentError naming the ``augment`` extra when they are missing) only when one is on."""
    d = recipe.data
    transform = mixup = None
    if d.crop_scale:
        transform = TrainTransform(img_size, d.crop_scale, d.hflip, d.randaug, d.color_jitter, d.reprob)
    if d.mixup or d.cutmix:
        mixup = MixupSettings(d.mixup, d.cutmix, d.mixup_prob, d.mixup_switch_prob, d.mixup_mode,
                              recipe.task.label_smoothing, num_classes)  # fmt: skip
    if transform is not None or mixup is not None or d.crop_pct:
        require()
    return transform, mixup


def _img_size(recipe: FinetuneRecipe) -> int:
    return recipe.model.img_size or _preset_img_size(recipe.model.name)


def _preset_img_size(name: str) -> int:
    from beit3.model import get_config

    return get_config(name).img_size


@supervised  # under beit3-launch: the exit code reaches the launcher (engine/supervise.py)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.eval_only:
        return evaluate_only(args)
    return run_training(PROGRAM, args, prepare, CONFIG_ERRORS)


def _recipe(args) -> FinetuneRecipe:
    overrides = list(args.set) + ([f"task.name={args.task}"] if args.task else [])
    return load_recipe(args.config, overrides)


def prepare(context: RunContext) -> TrainingRun:
    """Read and check the recipe (no data, no model yet); the run's ``build`` loads the tokenizer, the task
    data and the (pretrained) task model, and ``finish`` evaluates and exports after a finished run."""
    args, dist = context.args, context.dist
    recipe = _recipe(args)
    if args.predict or args.references:
        raise ConfigError("--predict and --references need --eval-only CHECKPOINT (a finetuned model.pth)")
    keep_best_default(recipe)
    ds_config = validate_run(recipe, context.ds_config, dist.world_size, context.trained_global_batch)
    micro = ds_config["train_micro_batch_size_per_gpu"]
    eval_batch = recipe.data.eval_batch_size or micro
    name = recipe.task.name
    spec = get_task(name)
    if not spec.pair_stream:  # the pair stream's views are the pretraining loader's own (no timm)
        augmentation(recipe, _img_size(recipe), 1)  # the augment extra is there before any data is read
    built: dict = {}

    def run_eval(step: int = 0) -> dict[str, float]:
        return _evaluate(recipe, built["task"], built["data"], built["tokenizer"], eval_batch, dist.device)

    def build() -> Built:
        with trusted_checkpoints(args.trust_checkpoint):  # model.pretrained: refused beyond the allowlist
            tokenizer, data, task = build_run(recipe)
        built.update(tokenizer=tokenizer, data=data, task=task)
        if dist.rank == 0:
            write_classes(Path(args.output_dir), name, data.classes)
        record = {"model": model_config(task, name).to_dict()}
        if spec.pair_stream:  # the pretraining pair shards, streamed (finetune/data/pair_stream.py)
            cfg = spec.backbone(task).cfg
            gas = ds_config["gradient_accumulation_steps"]  # a step's micro-batches: one group
            loader = build_pair_stream(recipe.data, tokenizer, cfg.img_size, cfg.patch_size, micro, gas,
                                       dist.rank, dist.world_size)  # fmt: skip
            return Built(task, loader, eval_fn=run_eval, record=record)
        transform, mixup = augmentation(
            recipe, _img_size(recipe), recipe.task.num_classes or len(data.classes)
        )
        collate = Collator(
            name,
            data.train.images,
            num_answers=len(data.classes),
            hflip=recipe.data.hflip,
            mask_prob=recipe.captioning.mask_prob,
            mask_id=tokenizer.mask_id if tokenizer else 0,
            transform=transform,
            mixup=mixup,
        )
        on_disk = isinstance(data.train.images, LazyImages)  # decoded in workers; in-memory banks need none
        loader = BatchLoader(
            data.train, collate, micro, dist.rank, dist.world_size, seed=recipe.data.seed,
            num_workers=recipe.data.num_workers if on_disk else 0, pin_memory=dist.device.type == "cuda",
            persistent_workers=recipe.data.persistent_workers,
            micro_batches_per_step=ds_config["gradient_accumulation_steps"] if spec.batch_step else 0,
        )  # fmt: skip
        return Built(task, loader, eval_fn=run_eval, record=record)

    def finish(trainer, result) -> int:
        tokenizer, data, task = built["tokenizer"], built["data"], built["task"]
        scores = run_eval()
        out = Path(args.output_dir)
        report = {"step": result.step, **scores}
        if trainer.ema is not None:  # train.ema_decay > 0: the same evaluation on the EMA of the weights
            with trainer.ema.swapped():
                report.update({f"{EMA_PREFIX}{k}": v for k, v in run_eval().items()})
        report.update(final_report(name, task, data.eval, tokenizer, _decoding(recipe)))  # e.g. samples
        if dist.rank == 0:
            (out / "eval.json").write_text(json.dumps(report, indent=1))
            log.info("eval: %s", {k: v for k, v in report.items() if k != "samples"})
        export_finetuned(out, dist.rank)
        export_finetuned(out, dist.rank, best=True)
        if trainer.ema is not None:
            export_finetuned(out, dist.rank, ema=True)
        return 0

    return TrainingRun(
        recipe.train, {"recipe": recipe_record(recipe)}, build, ds_config=ds_config, finish=finish,
        keep_process_group=True,  # the final evaluation gathers over every rank
    )  # fmt: skip


def evaluate_only(args) -> int:
    """``--eval-only CHECKPOINT``: the task metric of a finetuned ``model.pth`` on the recipe's eval split."""
    from beit3.engine.ds_config import load_ds_config
    from beit3.engine.errors import EngineError
    from beit3.engine.launch import init_distributed
    from beit3.finetune.reload import load_finetuned

    setup_logging()
    errors = (EngineError, *CONFIG_ERRORS)
    rank = 0
    try:
        dist = init_distributed(args.local_rank)
        rank = dist.rank
        recipe = _recipe(args)
        ds_config = load_ds_config(args.ds_config, dist.world_size, dotted_overrides(args.ds_set))
        ds_config = validate_run(recipe, ds_config, dist.world_size)
        if not Path(args.eval_only).is_file():
            raise ConfigError(f"--eval-only {args.eval_only} does not exist: give a finetuned model.pth")
        spec = get_task(recipe.task.name)
        if args.predict and spec.predict is None:
            raise ConfigError(f"--predict: task {recipe.task.name!r} has no official output file "
                              f"(tasks with one: {', '.join(predicted_tasks())})")  # fmt: skip
        if args.references and (not args.predict or not spec.references):
            raise ConfigError("--references scores caption predictions: use it with --predict (captioning)")
        references = read_coco_references(args.references) if args.references else None
        classes = run_classes(Path(args.eval_only).parent, recipe.task.name, rank)
        with trusted_checkpoints(args.trust_checkpoint):
            tokenizer, data, task = build_run(recipe, train=False, classes=classes)
        load_finetuned(task, args.eval_only, trusted=args.trust_checkpoint)
    except errors as e:
        return config_error(PROGRAM, e, rank)
    task.to(dist.device)
    micro = recipe.data.eval_batch_size or ds_config["train_micro_batch_size_per_gpu"]
    if args.predict:
        output, scores = predict(recipe.task.name, task, data.eval, micro, dist.device, data.classes,
                                 tokenizer, _decoding(recipe), references,
                                 recipe.data.num_workers)  # fmt: skip
        if dist.rank == 0:
            write_json(args.predict, output)
            log.info("wrote %s", args.predict)
    else:
        try:  # a split the task cannot score (detection: a test set without annotations) is refused by all
            scores = _evaluate(recipe, task, data, tokenizer, micro, dist.device)
        except errors as e:
            return config_error(PROGRAM, e, rank)
    if dist.rank == 0:
        print(json.dumps(scores, indent=1))
    return 0


def keep_best_default(recipe: FinetuneRecipe) -> None:
    """``train.best_metric`` left empty: the task's selection metric (its spec's ``selection``) when the
    recipe evaluates periodically; the run then keeps its best evaluated checkpoint."""
    train = recipe.train
    if not train.best_metric and train.eval_every:
        train.best_metric, train.best_mode = get_task(recipe.task.name).selection


def write_classes(run_dir: Path, task_name: str, classes: list[str]) -> Path:
    """``run_dir/classes.json``: ``{"task", "classes"}``, the class / answer names a run trains with (in
    label order), which ``--eval-only``, ``--predict`` and :mod:`beit3.finetune.inference` read back instead
    of the training data."""
    path = Path(run_dir) / CLASSES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"task": task_name, "classes": list(classes)}, indent=1))
    tmp.replace(path)
    return path


def read_classes(run_dir: Path, task_name: str | None = None) -> list[str] | None:
    """The class names ``run_dir/classes.json`` holds; None without one (a run from before it was written, a
    released checkpoint's folder) or, with ``task_name``, when it is another task's."""
    path = Path(run_dir) / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        classes = [str(c) for c in record["classes"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f'{path}: expected {{"task", "classes": [names]}} ({e}): remove it to read the '
                          "class names from the recipe's data.train") from e  # fmt: skip
    return None if task_name is not None and record.get("task") != task_name else classes


def run_classes(run_dir: Path, task_name: str, rank: int = 0) -> list[str] | None:
    """:func:`read_classes` of a finetuned model's run directory, saying (rank 0) where the names come from
    when it has none of ``task_name``: the recipe's training data, as before the file existed."""
    classes = read_classes(run_dir, task_name)
    if classes is None and rank == 0:
        log.warning(
            "%s has no %s of task %s (a run from before it was written, or not a run directory): the class "
            "names come from the recipe's data (data.train is read)", run_dir, CLASSES_FILE, task_name,
        )  # fmt: skip
    return classes


def read_coco_references(path: str | Path) -> dict[int, list[str]]:
    """Captions by image id from a COCO-format annotation file (``{"annotations": [{"image_id",
    "caption"}]}``, or the list of annotations alone)."""
    try:
        data = json.loads(Path(path).read_text())
        rows = data["annotations"] if isinstance(data, dict) else data
        refs: dict[int, list[str]] = {}
        for row in rows:
            refs.setdefault(int(row["image_id"]), []).append(str(row["caption"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--references {path}: expected COCO annotations "
                          f'{{"annotations": [{{"image_id", "caption"}}]}} ({e})') from e  # fmt: skip
    return refs


def export_finetuned(run_dir: Path, rank: int, best: bool = False, ema: bool = False) -> Path | None:
    """Consolidate the last checkpoint into ``run_dir/model.pth``: ``{"model": sd, "config": ...}``, released
    key names in "model" (all the released finetuning code reads) and, in "config", the backbone's model
    configuration that ``run_dir/config.json`` records (none for a run directory without one).

    ``best``: the best evaluated checkpoint (``checkpoints/best.json``) into ``run_dir/best_model.pth``
    instead; None when the run kept none. When the best was chosen by a metric of the EMA weights
    (``ema/...``), those are the weights exported. ``ema``: the EMA of the weights in the last checkpoint
    (``train.ema_decay`` > 0) into ``run_dir/ema_model.pth``."""
    from beit3.engine.checkpoint import checkpoint_root, read_best
    from beit3.engine.consolidate import consolidate_checkpoint, consolidate_ema
    from beit3.model import save_checkpoint

    if rank != 0:
        return None
    record = read_best(checkpoint_root(run_dir)) if best else None
    if best and record is None:
        return None
    if ema:
        state, file = consolidate_ema(run_dir), "ema_model.pth"
    elif best and record["metric"].startswith(EMA_PREFIX):  # the weights the metric was measured on
        state, file = consolidate_ema(run_dir, tag=record["tag"]), "best_model.pth"
    else:
        state = consolidate_checkpoint(run_dir, tag=record["tag"] if record else None)
        file = "best_model.pth" if best else "model.pth"
    recorded = json.loads((run_dir / "config.json").read_text()).get("model")
    return save_checkpoint(state, run_dir / file, config=recorded)


if __name__ == "__main__":
    sys.exit(main())
