"""Semantic segmentation's image + label-map transforms, by torchvision's ``transforms.v2`` (``tv_tensors``).

The label map travels as a :class:`torchvision.tv_tensors.Mask` beside the image (a ``tv_tensors.Image``),
so every geometric step moves both alike (a mask is resized with nearest-neighbour, never interpolated) and
the photometric steps touch the image only. The pipelines follow mmsegmentation's ADE20K recipe (the one
the BEiT papers used), with torchvision's operations:

* training (:func:`train_pipeline`): the shorter side resized to ``crop x r``, r uniform in
  ``[scale_min, scale_max]`` (mmseg: ``ratio_range`` (0.5, 2.0) of its ``img_scale``); a random crop of
  ``crop x crop`` padded where the image is smaller (image 0, label 255: ignored); a horizontal flip with
  probability 0.5; colour jitter (brightness, contrast, saturation, hue: mmseg's PhotoMetricDistortion
  ranges, in torchvision's ColorJitter); normalised to [-1, 1]. Not reproduced: mmseg's ``cat_max_ratio``
  (re-drawing a crop that one class fills beyond 75 %).
* evaluation (:func:`eval_pipeline`): the shorter side resized to ``crop`` (the longer one capped at
  4 x crop, mmseg's (2560, 640) scale for 640 px), normalised; the label map stays at its own size, where
  the metrics are computed (the logits are resized back to it).

torchvision is imported through :func:`beit3.finetune.data.augment.require` (the ``augment`` extra).
Random draws use torch's global generator, which the caller seeds per batch
(:func:`beit3.finetune.data.augment.seeded`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from PIL import Image

from beit3.finetune.data.augment import MEAN, STD, _import_torchvision
from beit3.finetune.dense.seg_metrics import IGNORE_INDEX

# mmseg's PhotoMetricDistortion: brightness delta 32 (of 255), contrast and saturation x[0.5, 1.5], hue
# delta 18 (of 180 in OpenCV's HSV): as ColorJitter factors.
PHOTOMETRIC = {"brightness": 32 / 255, "contrast": 0.5, "saturation": 0.5, "hue": 18 / 180}
LONG_SIDE_CAP = 4  # evaluation: the longer side at most this many crops (mmseg's 2560 for 640)


@dataclass(frozen=True)
class SegmentationTransform:
    """The settings of both pipelines (the recipe's ``[segmentation]`` table and the crop, the model's
    ``img_size``)."""

    crop: int
    scale_min: float = 0.5
    scale_max: float = 2.0
    hflip: bool = True
    photometric: bool = True

    def train(self, image: Image.Image, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A random view: (3, crop, crop) float in [-1, 1], (crop, crop) int64 labels (255 in padding)."""
        image, label = train_pipeline(self)(*_tv(image, label))
        return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor).long()

    def eval(self, image: Image.Image) -> torch.Tensor:
        """(3, h, w) float in [-1, 1]: the image with its shorter side at ``crop``."""
        v2, tv_tensors = _v2()
        view = eval_pipeline(self)(tv_tensors.Image(v2.functional.pil_to_tensor(image)))
        return view.as_subclass(torch.Tensor)


def _v2():
    """torchvision's ``transforms.v2`` and ``tv_tensors`` (imported on first use)."""
    _import_torchvision()
    import torchvision.transforms.v2 as v2
    from torchvision import tv_tensors

    return v2, tv_tensors


def _tv(image: Image.Image, label: torch.Tensor):
    v2, tv_tensors = _v2()
    return tv_tensors.Image(v2.functional.pil_to_tensor(image)), tv_tensors.Mask(label)


def _normalize(v2) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]


@functools.cache
def train_pipeline(t: SegmentationTransform):
    """The training pipeline of ``t`` (a ``transforms.v2.Compose`` over (Image, Mask))."""
    v2, tv_tensors = _v2()
    low, high = round(t.crop * t.scale_min), round(t.crop * t.scale_max)
    steps = [
        v2.RandomResize(low, high + 1),  # the shorter side to a size drawn in [low, high]
        v2.RandomCrop(t.crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
    ]
    if t.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if t.photometric:
        steps.append(v2.ColorJitter(**PHOTOMETRIC))
    return v2.Compose(steps + _normalize(v2))


@functools.cache
def eval_pipeline(t: SegmentationTransform):
    """The evaluation pipeline of ``t`` (over the image alone)."""
    v2, _ = _v2()
    return v2.Compose([v2.Resize(t.crop, max_size=LONG_SIDE_CAP * t.crop), *_normalize(v2)])
