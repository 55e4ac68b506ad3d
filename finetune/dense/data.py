"""Data of the dense tasks: images on disk with per-pixel or per-object targets, through the finetuning
pipeline (docs/finetune.md, "Dense tasks").

A dense task's spec declares ``load_data`` (its folder layout or annotation file -> a
:class:`~beit3.finetune.data.sources.TaskData`) and a ``collate`` hook. Its splits' images are a
:class:`DenseImages` (:class:`~beit3.finetune.data.sources.LazyImages`: paths, decoded when a batch reads
them, so in the loader's worker processes) that also carries the split's views (the task's transform) and
whether they are the random training ones. Its examples hold ``sample`` (the row of their image in that
:class:`DenseImages`; not ``image``, which the collator would decode as a square), ``image_id`` and their
targets (segmentation: ``label_path``). The collate hook decodes each image, draws its view with its targets
under the batch's seeded RNG (:func:`beit3.finetune.data.augment.seeded`), and stacks the batch.

Semantic segmentation (:func:`load_ade20k`): ADE20K's layout, ``<root>/images/<split>/<name>.jpg`` beside
``<root>/annotations/<split>/<name>.png`` (uint8 labels); ``<split>`` is ``data.train`` /
``data.eval`` (default ``training`` / ``validation``). With ``segmentation.reduce_zero_label`` (ADE20K's
convention) label 0 ("other") becomes 255 (ignored) and k becomes k - 1. Class names: ADE20K's
``objectInfo150.csv`` in the root, else a ``classes.json`` (a list of names) in the root or its parent,
else the numbers up to ``task.num_classes``, else up to the largest label of the train annotations (all of
them are read: set ``task.num_classes`` on a large dataset).

This module imports only the parts of ``beit3.finetune.data`` that do not import the task registry
(sources, augment): the task modules import it for their specs' hooks.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from beit3.finetune.data.augment import draw_seed, require, seeded
from beit3.finetune.data.sources import DataSourceError, LazyImages, Split, TaskData
from beit3.finetune.dense.seg_metrics import IGNORE_INDEX
from beit3.finetune.dense.transforms import SegmentationTransform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ADE20K_FOLDERS = ("training", "validation")  # data.train / data.eval when they are empty


class DenseImages(LazyImages):
    """A dense split's images on disk plus its views: ``views`` the task's transform settings (segmentation:
    :class:`SegmentationViews`), ``train`` True for the random training views (else evaluation's)."""

    def __init__(self, paths: list[str], size: int, views, train: bool) -> None:
        super().__init__(paths, size)
        self.views, self.train = views, bool(train)


@dataclass(frozen=True)
class SegmentationViews:
    """What a segmentation batch is built with: the image + label-map transform and how labels are read."""

    transform: SegmentationTransform
    num_classes: int
    reduce_zero_label: bool = True


def read_label_map(path: str | Path, reduce_zero_label: bool, num_classes: int = 0) -> torch.Tensor:
    """(H, W) int64 class indices of a label PNG, 255 ignored; with ``reduce_zero_label`` 0 -> 255 and
    k -> k - 1. ``num_classes`` > 0: a label beyond the classes is a :class:`DataSourceError`."""
    try:
        with Image.open(path) as img:
            labels = torch.from_numpy(np.array(img, dtype=np.int64))
    except OSError as e:
        raise DataSourceError(f"cannot read label map {path}: {e}") from e
    if labels.ndim != 2:
        raise DataSourceError(f"label map {path}: expected one channel of class indices, got {labels.shape}")
    if reduce_zero_label:
        labels = torch.where(labels == 0, IGNORE_INDEX + 1, labels) - 1
        labels[labels == IGNORE_INDEX - 1] = IGNORE_INDEX
    if num_classes:
        bad = (labels != IGNORE_INDEX) & (labels >= num_classes)
        if bad.any():
            raise DataSourceError(
                f"label map {path}: class {int(labels[bad].max())} beyond the {num_classes} classes (set "
                "task.num_classes, or check segmentation.reduce_zero_label)"
            )
    return labels


def _pairs(root: Path, folder: str) -> list[tuple[str, str]]:
    images_dir, labels_dir = root / "images" / folder, root / "annotations" / folder
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise DataSourceError(
                f"{d} is not a folder: data.root must be ADE20K's ADEChallengeData2016 folder "
                "(images/<split>/*.jpg, annotations/<split>/*.png) and data.train / data.eval its split names"
            )
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    pairs = [(str(p), str(labels_dir / f"{p.stem}.png")) for p in images]
    missing = [lab for _, lab in pairs if not Path(lab).is_file()]
    if not pairs or missing:
        raise DataSourceError(
            f"{images_dir}: no images" if not pairs
            else f"{labels_dir}: {len(missing)} of {len(pairs)} label maps missing, e.g. {missing[0]}"
        )  # fmt: skip
    return pairs


def _class_names(root: Path, num_classes: int) -> list[str]:
    info = root / "objectInfo150.csv"  # ADE20K's own: Idx, Ratio, Train, Val, Name ("wall", "floor;flooring")
    if info.is_file():
        with info.open(newline="") as f:
            return [row["Name"].split(";")[0] for row in csv.DictReader(f)]
    for path in (root / "classes.json", root.parent / "classes.json"):
        if path.is_file():
            names = json.loads(path.read_text())
            if not isinstance(names, list):
                raise DataSourceError(f"{path}: expected a JSON list of class names")
            return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def _split(pairs, size: int, views: SegmentationViews, train: bool, limit: int, seed: int) -> Split:
    if limit and len(pairs) > limit:
        pairs = sorted(random.Random(seed).sample(pairs, limit))
    examples = [{"sample": r, "image_id": r, "label_path": lab} for r, (_, lab) in enumerate(pairs)]
    return Split(examples, DenseImages([img for img, _ in pairs], size, views, train))


def load_ade20k(
    recipe, img_size: int, train_images: bool = True, classes: list[str] | None = None
) -> TaskData:
    """Semantic segmentation's ``load_data`` hook: the ADE20K-layout folder ``data.root`` (module docstring).
    ``classes`` (a run's ``classes.json``): the train split is not read."""
    d, s = recipe.data, recipe.segmentation
    require()  # torchvision (the augment extra) draws the views: missing, a configuration error now
    if not d.root:
        raise DataSourceError("data.root must name the ADE20K folder (ADEChallengeData2016)")
    root = Path(d.root)
    train_pairs = [] if classes is not None else _pairs(root, d.train or ADE20K_FOLDERS[0])
    names = list(classes) if classes is not None else _class_names(root, recipe.task.num_classes)
    num_classes = recipe.task.num_classes or len(names)
    if not num_classes:  # the largest label of the train annotations
        num_classes = 1 + max(
            int(lab[lab != IGNORE_INDEX].max(initial=-1))
            for lab in (read_label_map(p, s.reduce_zero_label).numpy() for _, p in train_pairs)
        )
        names = [str(i) for i in range(num_classes)]
    transform = SegmentationTransform(img_size, s.scale_min, s.scale_max, d.hflip, s.photometric)
    views = SegmentationViews(transform, num_classes, s.reduce_zero_label)
    train = _split(train_pairs, img_size, views, True, d.max_train, d.seed)
    evaluation = _split(_pairs(root, d.eval or ADE20K_FOLDERS[1]), img_size, views, False, d.max_eval, d.seed)
    return TaskData(train, evaluation, names)


def collate_segmentation(
    batch: dict, examples: list[dict], collator, generator: torch.Generator | None
) -> None:
    """Semantic segmentation's ``collate`` hook. Training: ``image`` (B, 3, S, S) random views and
    ``label_map`` (B, S, S) int64 (255 ignored). Evaluation: ``image`` (B, 3, H, W) the images with their
    shorter side at S, zero-padded to the batch's largest, ``image_size`` (B, 2) their (h, w), and
    ``label_map`` (B, H0, W0) the label maps at their own sizes (padded with 255), ``label_size`` (B, 2)."""
    images: DenseImages = collator.images
    views: SegmentationViews = images.views
    t = views.transform
    labels = [read_label_map(ex["label_path"], views.reduce_zero_label, views.num_classes) for ex in examples]
    if images.train:
        decoded = [images.decode(ex["sample"]) for ex in examples]
        for img, lab, ex in zip(decoded, labels, examples):
            if img.size != (lab.shape[1], lab.shape[0]):
                raise DataSourceError(f"{ex['label_path']}: {lab.shape[1]}x{lab.shape[0]} label map for a "
                                      f"{img.size[0]}x{img.size[1]} image")  # fmt: skip
        with seeded(draw_seed(generator)):
            pairs = [t.train(img, lab) for img, lab in zip(decoded, labels)]
        batch["image"] = torch.stack([img for img, _ in pairs])
        batch["label_map"] = torch.stack([lab for _, lab in pairs])
        return
    views_ = [t.eval(images.decode(ex["sample"])) for ex in examples]
    batch["image"], batch["image_size"] = padded(views_, 0.0)
    batch["label_map"], batch["label_size"] = padded(labels, IGNORE_INDEX)


def padded(tensors: list[torch.Tensor], fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors (..., h_i, w_i) stacked into (B, ..., max h, max w), padded at the bottom and right with
    ``fill``; and their (h_i, w_i) as (B, 2) int64."""
    sizes = torch.tensor([t.shape[-2:] for t in tensors], dtype=torch.long)
    h, w = (int(v) for v in sizes.max(0).values)
    out = torch.full((len(tensors), *tensors[0].shape[:-2], h, w), fill, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-2], : t.shape[-1]] = t
    return out, sizes
