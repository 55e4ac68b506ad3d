"""The released finetuning recipes' image augmentation, by timm and torchvision (the ``augment`` extra).

* :class:`TrainTransform`: timm's ImageNet training transform (``timm.data.create_transform``):
  RandomResizedCrop (bicubic, area scale ``(crop_scale, 1)``), horizontal flip, RandAugment, colour jitter
  (timm applies it only without RandAugment, as the released ImageNet recipe ran), normalisation to
  [-1, 1] and RandomErasing (per-pixel noise). Applied per image where it is decoded.
* :func:`eval_view`: the evaluation view, Resize(floor(size / crop_pct), bicubic) of the shorter side +
  CenterCrop(size) (torchvision's), as the released ImageNet evaluation; ``crop_pct`` 0 is the square resize.
* :class:`MixupSettings`: timm's Mixup/CutMix with label smoothing over a collated classification batch.
* :func:`seeded`: python ``random``, numpy and torch's CPU generator seeded for one batch's transforms and
  restored after, so augmentation is a function of the batch key and the training's RNG is not disturbed.

Nothing here imports timm or torchvision until augmentation is configured (:func:`require`).
"""

from __future__ import annotations

import math
import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from beit3.finetune.errors import FinetuneError

EXTRA = "augment"  # setup.py extras_require: timm==1.0.31, torchvision==0.28.0
MEAN = STD = (0.5, 0.5, 0.5)  # [-1, 1], what the models expect (released vision-language normalisation)
_SCHEMAS = None  # see _import_torchvision


class AugmentError(FinetuneError, RuntimeError):
    """Augmentation configured without the libraries that implement it."""


def _import_torchvision():
    """torchvision, also where its compiled ops cannot load: PyPI's torchvision 0.28.0 is the CUDA build, and
    with the CPU build of torch 2.13 (development and CI machines) its import fails registering the meta
    kernel of ``torchvision::nms`` / ``qnms`` while the ops library failed to load. Declaring those two
    schemas lets the pure-Python parts (transforms, all this project uses) import; detection ops stay
    unavailable there, as torchvision reports."""
    global _SCHEMAS
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e) or _SCHEMAS is not None:
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _SCHEMAS = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    return torchvision


def require() -> None:
    """Import timm and torchvision, or raise :class:`AugmentError` saying how to install them."""
    try:
        _import_torchvision()
        import timm.data  # noqa: F401
    except ImportError as e:
        raise AugmentError(
            f"image augmentation (data.crop_scale, data.randaug, data.reprob, data.crop_pct, data.mixup, "
            f"data.cutmix) needs timm and torchvision: pip install -e '.[{EXTRA}]' "
            f"(timm==1.0.31, torchvision==0.28.0; scripts/install.sh --tests installs them) ({e})"
        ) from e
    _posterize_keeps_zero_bits()


def posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """RandAugment's posterize for every bit count its magnitudes give. timm 1.0.31's increasing posterize
    (``rand-...-inc1``, the ImageNet recipe's) keeps ``4 - int(level / 10 * 4)`` bits: 0 at magnitude 10,
    which m9 with mstd 0.5 reaches. Pillow up to 12 kept no bit (a black image); Pillow 13 refuses 0 and the
    loader died within a few dozen batches. 0 bits is the black image again here, 8 or more the image."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, int(bits_to_keep))


def _posterize_keeps_zero_bits() -> None:
    """Have timm's RandAugment ops use :func:`posterize` (its ops table is read when a pipeline is built)."""
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = posterize


@contextmanager
def seeded(seed: int):
    """Run the block with python ``random``, numpy's global RNG and torch's CPU generator seeded from
    ``seed`` (the libraries' transforms draw from those); their states are restored after."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def draw_seed(generator: torch.Generator) -> int:
    """A seed for :func:`seeded` from a batch's generator."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 (3, H, W) -> an RGB PIL image."""
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB")


def from_pil(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


@dataclass(frozen=True)
class TrainTransform:
    """Settings of timm's training transform (``[data]`` crop_scale, hflip, randaug, color_jitter, reprob);
    calling it maps one PIL image to a normalised float (3, size, size). The timm pipeline is built in the
    process that first calls it (a DataLoader worker or the trainer's)."""

    size: int
    crop_scale: float
    hflip: bool = False
    randaug: str = ""
    color_jitter: float = 0.0
    reprob: float = 0.0

    def pipeline(self):
        built = self.__dict__.get("_pipeline")
        if built is None:
            require()
            from timm.data import create_transform

            built = create_transform(
                self.size, is_training=True, scale=(self.crop_scale, 1.0), hflip=0.5 if self.hflip else 0.0,
                color_jitter=self.color_jitter or None, auto_augment=self.randaug or None,
                interpolation="bicubic", mean=MEAN, std=STD, re_prob=self.reprob, re_mode="pixel", re_count=1,
            )  # fmt: skip
            object.__setattr__(self, "_pipeline", built)
        return built

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline()(image)

    def __getstate__(self) -> dict:  # the built pipeline is not sent to worker processes
        return {k: v for k, v in self.__dict__.items() if k != "_pipeline"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def eval_view(image: Image.Image, size: int, crop_pct: float = 0.0) -> Image.Image:
    """The evaluation view of an RGB image: ``crop_pct`` 0, the (size, size) bicubic resize; else
    torchvision's Resize(floor(size / crop_pct), bicubic) of the shorter side and CenterCrop(size)."""
    if not crop_pct:
        return image.resize((size, size), Image.BICUBIC)
    require()
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    scaled = Resize(math.floor(size / crop_pct), interpolation=InterpolationMode.BICUBIC)(image)
    return CenterCrop(size)(scaled)


def eval_bank(bank: torch.Tensor, crop_pct: float) -> torch.Tensor:
    """An in-memory uint8 bank (N, 3, S, S) in its ``crop_pct`` evaluation view (0: unchanged)."""
    if not crop_pct or len(bank) == 0:
        return bank
    size = bank.shape[-1]
    return torch.stack([from_pil(eval_view(to_pil(image), size, crop_pct)) for image in bank])


@dataclass(frozen=True)
class MixupSettings:
    """timm's Mixup/CutMix (``[data]`` mixup, cutmix, mixup_prob, mixup_switch_prob, mixup_mode) with label
    smoothing: :meth:`apply` mixes a collated batch's images and gives soft targets (B, num_classes)."""

    mixup: float
    cutmix: float
    prob: float
    switch_prob: float
    mode: str
    label_smoothing: float
    num_classes: int

    def apply(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixer = self.__dict__.get("_mixer")
        if mixer is None:
            require()
            from timm.data import Mixup

            mixer = Mixup(
                mixup_alpha=self.mixup, cutmix_alpha=self.cutmix, prob=self.prob,
                switch_prob=self.switch_prob, mode=self.mode, label_smoothing=self.label_smoothing,
                num_classes=self.num_classes,
            )  # fmt: skip
            object.__setattr__(self, "_mixer", mixer)
        return mixer(images, labels)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_mixer"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
