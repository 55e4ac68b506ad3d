"""The contrastive stage's data: the pretraining pair shards streamed, and a held-out pair set for evaluation.

``data.source = "pretrain_pairs"`` (tasks whose spec has ``pair_stream``: ``contrastive``):

- **training**: ``data.train`` names pair shards as a pretraining recipe's ``pair_shards`` does
  (``beit3-shards pairs`` output, img2dataset shards; directories, globs, brace ranges, ``::`` lists,
  remote URLs). They are read by the pretraining loader itself (:mod:`beit3.pretrain.data`: its pair stream
  alone, masking off), so the stage streams them as pretraining does: nothing is indexed or held in memory,
  each rank and worker reads its own disjoint share, bad samples are skipped and counted (``data/skipped/*``),
  remote shards are retried, and a resume continues at the exact sample (the loader's state). Its batches
  become the dual encoder's (``image``, ``text``, ``text_padding_mask``); with gradient accumulation each
  optimizer step's micro-batches form one group that each of them carries (:class:`PairStream`, for the
  task's gradient cache: :mod:`beit3.finetune.tasks.contrastive`).
- **evaluation**: ``data.eval`` names a held-out pair set, local shards of the same format (read as
  ``data.source = "wds"`` reads a split: each image once, its caption its text) or a released-format JSONL
  index (``*.jsonl``, paths relative to ``data.root``); zero-shot retrieval recalls over it
  (``eval/tr_r1`` ... ``eval/average``).

The image transform is the pretraining loader's, set from ``[data]``: ``crop_scale`` > 0 a random resized
crop of area (crop_scale, 1) at aspect 3/4-4/3, 0 the centred square crop; ``hflip`` flips half of the images;
``color_jitter`` < 1. timm's RandAugment, RandomErasing and Mixup are not in it (refused).

This module is the one place in ``beit3.finetune`` that uses ``beit3.pretrain`` (its data package, imported
where the loader is built): the pair stream is written once, there.
"""

from __future__ import annotations

from collections.abc import Iterator

from beit3.finetune.data.sources import DataSourceError, Split, TaskData, load_jsonl_split, load_wds_split
from beit3.finetune.tasks import get_task, task_names
from beit3.finetune.tasks.contrastive import GROUP, INPUTS, MICRO

SOURCE = "pretrain_pairs"
UNSUPPORTED = ("randaug", "reprob", "mixup", "cutmix")  # [data] keys of timm's pipeline, not the stream's


def recipe_checks(recipe) -> list[tuple[bool, str]]:
    """(holds, message naming the fix) for ``data.source = "pretrain_pairs"`` and the tasks that need it;
    no file is read."""
    d, name = recipe.data, recipe.task.name
    streaming = d.source == SOURCE
    needs = get_task(name).pair_stream
    users = ", ".join(repr(n) for n in task_names() if get_task(n).pair_stream)
    unsupported = [k for k in UNSUPPORTED if getattr(d, k)] if streaming else []
    return [
        (not needs or streaming,
         f"task {name!r} trains on the pretraining pair shards, streamed: set data.source = {SOURCE!r} and "
         "data.train to pair shards (beit3-shards pairs output)"),
        (not streaming or needs,
         f"data.source = {SOURCE!r} streams the pretraining pairs for the contrastive stage: task.name must "
         f"be one of {users}, not {name!r}"),
        (not streaming or bool(d.train),
         f"data.source = {SOURCE!r} needs data.train: pair shards, e.g. 'data/pairs' (a directory of "
         "beit3-shards pairs output) or 'pairs-{000000..000099}.tar'"),
        (not unsupported,
         f"data.{', data.'.join(unsupported)}: the pair stream's transform is the pretraining loader's "
         f"(crop, flip, colour jitter); set them to 0 / '' with data.source = {SOURCE!r}"),
        (not streaming or d.color_jitter < 1,
         f"data.color_jitter={d.color_jitter} must be < 1 with data.source = {SOURCE!r} (factors from "
         "[1 - j, 1 + j])"),
    ]  # fmt: skip


def held_out_pairs(data_cfg, img_size: int) -> TaskData:
    """The eval split of ``data.source = "pretrain_pairs"`` (``data.eval``: shards or a ``.jsonl`` index;
    empty without one); the training pairs are streamed (:func:`build_pair_stream`), so the train split is
    empty and there are no classes."""
    d = data_cfg
    eval_ = Split([])
    if d.eval:
        if d.eval.endswith(".jsonl"):
            eval_ = load_jsonl_split(d.eval, d.root, img_size, d.max_eval, d.seed, crop_pct=d.crop_pct)
        else:
            eval_ = load_wds_split(d.eval, img_size, d.max_eval, d.seed, crop_pct=d.crop_pct)
    return TaskData(Split([]), eval_, [])


def pretrain_data_config(data_cfg, img_size: int, patch_size: int):
    """The pretraining loader's ``[data]`` table for the pair stream of a finetuning ``[data]`` section."""
    from beit3.pretrain.data import PretrainDataConfig

    d = data_cfg
    crop = (d.crop_scale, 1.0) if d.crop_scale else (1.0, 1.0)
    return PretrainDataConfig(
        pair_shards=[d.train],
        img_size=img_size,
        patch_size=patch_size,
        tokenizer_img_size=1,  # the visual tokenizer's view is not used: the smallest there is
        crop_scale=crop,
        crop_ratio=(0.75, 4 / 3) if d.crop_scale else (1.0, 1.0),  # 0: the centred square crop
        hflip=0.5 if d.hflip else 0.0,
        color_jitter=d.color_jitter,
        pair_text_max_len=d.max_text_len,
        pair_text_mask_ratio=0.0,  # no masking: the contrastive loss sees whole pairs
        pair_image_mask_ratio=0.0,
        image_mask_ratio=0.0,  # (the image and text streams are not read)
        text_mask_ratio=0.0,
        num_workers=d.num_workers,
        seed=d.seed,
    )


def build_pair_stream(
    data_cfg,
    tokenizer,
    img_size: int,
    patch_size: int,
    micro_batch: int,
    micro_batches_per_step: int,
    rank: int,
    world_size: int,
) -> PairStream:
    """One rank's :class:`PairStream` over ``data.train``'s pair shards (DataSourceError naming the
    setting when they cannot be read)."""
    from beit3.pretrain.data import DataConfigError, DataStreamError, build_pretrain_loader

    try:
        cfg = pretrain_data_config(data_cfg, img_size, patch_size)
        loader = build_pretrain_loader(cfg, tokenizer, 0, 0, micro_batch, rank, world_size)
    except (DataConfigError, DataStreamError) as e:
        raise DataSourceError(f"data.train={data_cfg.train!r} (data.source = {SOURCE!r}): {e}") from e
    return PairStream(loader, micro_batches_per_step)


class PairStream:
    """Engine data source (:mod:`beit3.engine.data_source`): the pretraining loader's pair sub-batches as
    dual-encoder batches; with ``micro_batches_per_step`` k > 1, each optimizer step's k micro-batches as
    one group, which each of them carries (``GROUP``, its position ``MICRO``).

    The state is the loader's (exact resume, its counters). A group is read from the loader before its
    first micro-batch is handed out, so between steps the counters include the rest of the current group;
    at the step boundaries where the engine saves they are exact, and a state taken inside a group
    re-reads the group and continues at the same micro-batch.
    """

    def __init__(self, loader, micro_batches_per_step: int = 1) -> None:
        self.loader = loader
        self.k = max(1, int(micro_batches_per_step))
        self.counter_names = tuple(loader.counter_names)
        self._group_start: dict | None = None  # the loader's state before the group being handed out
        self._handed = 0  # micro-batches of that group handed out
        self._skip = 0  # micro-batches of the first group to skip (a state taken inside a group)

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.loader)
        while True:
            start = self.loader.state_dict() if self.k > 1 else None
            group = [_dual_encoder_batch(next(batches)) for _ in range(self.k)]
            if self.k == 1:
                yield group[0]
                continue
            self._group_start, self._handed = start, 0
            skip, self._skip = self._skip, 0
            for j in range(self.k):
                self._handed = j + 1
                if j >= skip:
                    yield {**group[j], MICRO: j, GROUP: group}

    def state_dict(self) -> dict:
        """The loader's state after the micro-batches handed out (inside a group: before the group, and
        how many of it were handed out)."""
        if self._group_start is not None and 0 < self._handed < self.k:
            return {"loader": self._group_start, "in_group": self._handed}
        return {"loader": self.loader.state_dict(), "in_group": 0}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self._skip, self._group_start, self._handed = int(state["in_group"]), None, 0

    def start_at(self, micro_batches: int) -> None:
        """On another world size: the loader re-seeded at the position (a step boundary: a whole group)."""
        self.loader.start_at(micro_batches)
        self._skip, self._group_start, self._handed = 0, None, 0

    def counters(self) -> dict[str, float]:
        return self.loader.counters()

    def close(self) -> None:
        """Stop the loader's worker processes."""
        self.loader.close()


def _dual_encoder_batch(batch: dict) -> dict:
    """The pretraining loader's pair sub-batch as the dual encoder reads it (no masks, no tokenizer view)."""
    pairs = batch["pair"]
    return {key: pairs[key] for key in INPUTS}
