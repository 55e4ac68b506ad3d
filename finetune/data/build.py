"""Choose a data source from the recipe, and the generated ``shapes`` source used by tests.

``shapes`` needs nothing installed: each image is one coloured square or disc on white at a random place.
Its examples carry a colour label, a caption ("a red disc.") and, for VQA, one of two questions
("what color is the shape?" / "what shape is it?") with its answer; it is easy enough that a tiny model
learns it in a few dozen steps, which is what an end-to-end test needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from beit3.finetune.data.sources import (
    DataSourceError,
    Split,
    TaskData,
    load_digits_data,
    load_easy_vqa,
    load_jsonl_split,
    load_tuxpaint,
    load_wds_split,
    load_wordnet,
)
from beit3.finetune.tasks import get_task

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("square", "disc")
QUESTIONS = ("what color is the shape?", "what shape is it?")
SOURCES = ("jsonl", "wds", "pretrain_pairs", "easy_vqa", "tuxpaint", "digits", "wordnet", "shapes")


def _shape_image(color: tuple[int, int, int], shape: str, size: int, g: torch.Generator) -> torch.Tensor:
    img = torch.full((3, size, size), 255, dtype=torch.uint8)
    side = size // 2
    top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    if shape == "square":
        inside = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)
    else:
        c, r = side / 2 - 0.5, side / 2
        inside = (ys - top - c) ** 2 + (xs - left - c) ** 2 <= r**2
    for ch in range(3):
        img[ch][inside] = color[ch]
    return img


def make_shapes_split(num_images: int, size: int, seed: int) -> Split:
    """``num_images`` shape images; two VQA-style examples per image (colour and shape questions)."""
    g = torch.Generator().manual_seed(seed)
    names = list(COLORS)
    answers = names + list(SHAPES)
    images, examples = [], []
    for i in range(num_images):
        color = names[int(torch.randint(len(names), (1,), generator=g))]
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))]
        images.append(_shape_image(COLORS[color], shape, size, g))
        caption = f"a {color} {shape}."
        for q, a in zip(QUESTIONS, (color, shape)):
            examples.append({"image": i, "image_id": i, "label": names.index(color), "caption": caption,
                             "question": q, "scores": {answers.index(a): 1.0}})  # fmt: skip
    return Split(examples, torch.stack(images))


def _nlvr2_pairs(split: Split) -> Split:
    """NLVR2-style examples: image i and image i+1 with "the two shapes have the same color." (true/false)."""
    colors = [ex["label"] for ex in split.examples[::2]]
    n = len(colors)
    text = "the two shapes have the same color."
    examples = [{"image": i, "image2": (i + 1) % n, "image_id": i, "text": text,
                 "label": int(colors[i] == colors[(i + 1) % n])} for i in range(n)]  # fmt: skip
    return Split(examples, split.images)


def shapes_data(size: int, task: str, num_train: int = 64, num_eval: int = 32, seed: int = 0) -> TaskData:
    """The shapes source arranged for ``task`` as its spec's ``shapes_layout`` says: "questions" (VQA: every
    question, answers as classes), "pairs" (NLVR2: :func:`_nlvr2_pairs`) or "captions" (one captioned
    example per image, its colour as the class)."""
    layout = get_task(task).shapes_layout
    splits = []
    for n, s in ((num_train, seed), (num_eval, seed + 1)):
        split = make_shapes_split(n, size, s)
        if layout == "pairs":
            splits.append(_nlvr2_pairs(split))
            continue
        questions = layout == "questions"
        keep = split.examples if questions else split.examples[::2]  # one example per image
        for ex in keep:
            ex["text"] = ex.pop("question") if questions else ex.pop("caption")
        splits.append(Split(keep, split.images))
    classes = {"questions": list(COLORS) + list(SHAPES), "pairs": ["false", "true"]}.get(layout, list(COLORS))
    return TaskData(splits[0], splits[1], classes)


def _answer_names(data_cfg) -> list[str]:
    """The label names of a released-format index: ``answer2label.txt`` (JSON lines ``{"answer", "label"}``)
    in ``data.root`` or beside ``data.train``, ordered by label; empty when there is none."""
    folders = [Path(data_cfg.root)] if data_cfg.root else []
    for path in (folder / "answer2label.txt" for folder in [*folders, Path(data_cfg.train).parent]):
        if path.is_file():
            try:
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                return [row["answer"] for row in sorted(rows, key=lambda row: int(row["label"]))]
            except (ValueError, KeyError, TypeError) as e:
                raise DataSourceError(f'{path}: expected JSON lines {{"answer", "label"}} ({e})') from e
    return []


def load_task_data(
    data_cfg,
    task: str,
    img_size: int,
    train_images: bool = True,
    classes: list[str] | None = None,
    recipe=None,
) -> TaskData:
    """The :class:`TaskData` a recipe's ``[data]`` section describes. ``train_images=False`` (evaluation,
    prediction): a released-format train index is read for its labels only, its images not decoded; with
    ``classes`` (a run's ``classes.json``) it is not read at all (the train split is empty) and the names are
    those, or the index's answer vocabulary file where the task's spec reads one. The eval split's images are
    in the ``data.crop_pct`` evaluation view (:func:`~beit3.finetune.data.augment.eval_view`; an in-memory
    bank is cropped from its resized images). A task whose spec has a ``load_data`` hook (the dense tasks)
    reads its own data from the whole ``recipe`` (its task tables too)."""
    spec = get_task(task)
    if spec.load_data is not None:
        if recipe is None:
            raise TypeError(f"load_task_data: task {task!r} reads its data from the recipe: pass recipe=")
        return spec.load_data(recipe, img_size, train_images, None if train_images else classes)
    data = _task_data(data_cfg, task, img_size, train_images, None if train_images else classes)
    crop_pct = getattr(data_cfg, "crop_pct", 0.0)
    if crop_pct and isinstance(data.eval.images, torch.Tensor):
        from beit3.finetune.data.augment import eval_bank

        data.eval = Split(data.eval.examples, eval_bank(data.eval.images, crop_pct))
    return data


def _task_data(data_cfg, task: str, img_size: int, train_images: bool, classes: list[str] | None) -> TaskData:
    d = data_cfg
    if d.source in ("jsonl", "wds"):  # a released-format index, or webdataset shards of the same rows
        crop_pct = getattr(d, "crop_pct", 0.0)

        def split(where: str, limit: int, **kwargs) -> Split:
            if d.source == "wds":
                return load_wds_split(where, img_size, limit, d.seed, **kwargs)
            return load_jsonl_split(where, d.root, img_size, limit, d.seed, **kwargs)

        train = Split([])  # with the class names known, the train index is not needed
        if classes is None:
            train = split(d.train, d.max_train, decode_images=train_images)
        eval_ = Split([])
        if d.eval:
            eval_ = split(d.eval, d.max_eval, crop_pct=crop_pct)
        names = _answer_names(d) if get_task(task).answer_vocabulary else []
        if classes is not None:
            return TaskData(train, eval_, names or list(classes))
        num = 1 + max((ex.get("label", max(ex.get("scores", {0: 0}))) for ex in train.examples), default=0)
        return TaskData(train, eval_, names or [str(i) for i in range(num)])
    if d.source == "pretrain_pairs":  # training pairs streamed (pair_stream.py); eval: held-out pairs
        from beit3.finetune.data.pair_stream import held_out_pairs

        return held_out_pairs(d, img_size)
    if d.source == "easy_vqa":
        return load_easy_vqa(img_size, d.max_train, d.max_eval, d.seed)
    if d.source == "tuxpaint":
        return load_tuxpaint(img_size, d.max_train, d.max_eval, d.seed)
    if d.source == "digits":
        return load_digits_data(img_size, d.max_train, d.max_eval, d.seed)
    if d.source == "wordnet":
        return load_wordnet(d.max_train, d.max_eval, d.seed)
    if d.source == "shapes":
        return shapes_data(img_size, task, d.max_train or 64, d.max_eval or 32, d.seed)
    raise DataSourceError(f"data.source must be one of {SOURCES}, got {d.source!r}")
