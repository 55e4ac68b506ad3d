"""Offline dense-prediction data with exact labels: Tux Paint stamps pasted onto scikit-image photos, and
easy-VQA's shapes (reference offline-data.md; nothing is downloaded).

Three sets, each in its own folder under the output directory (``beit3-dense-data OUT --sets ...``):

* ``coco/``: COCO instances, ``annotations/instances_{train,val}.json`` + ``{train,val}/<id:012d>.jpg``. Each
  image is a random crop of a scikit-image photo, resized to ``size``, with 1 to ``max_stamps`` Tux Paint
  stamps (cut-out objects with an alpha channel) alpha-composited at a random scale and position. An
  instance's mask is its stamp's ``alpha > 0.5`` less what later stamps cover (placements that would leave
  an earlier stamp less than half visible are redrawn); its box is the visible mask's; its segmentation is
  an RLE (pycocotools). Each annotation also records ``stamp`` (the PNG, relative to the stamps folder) and
  ``paste_box`` ([x, y, w, h] of the resized stamp) so the masks can be checked against the files.
* ``ade/ADEChallengeData2016/``: the same composites in the ADE20K layout, ``images/{training,validation}/
  ADE_{train,val}_<id:08d>.jpg`` + ``annotations/.../*.png`` (uint8: 0 = background, ignored by "reduce
  zero label"; class ``k`` = category id ``k`` of the COCO set; image ``<id>`` is COCO image ``<id>``).
* ``shapes/ADEChallengeData2016/``: easy-VQA's 64x64 images (pip ``easy-vqa==1.0``), the shape per pixel
  (1 circle, 2 rectangle, 3 triangle; 0 background): a pixel is the shape's where it is nearer the shape's
  colour than the background's (its anti-aliased coverage above one half). Train from easy-VQA's train
  images, validation from its test images.

Classes (``label``): ``category``, the stamps' top-level folders (``categories``), with every fifth stamp of
each category held out for validation (unseen objects of known classes); or ``stamp``, each stamp its own
class (``stamps_per_category`` of each category, spread over its sorted list), the same stamps in both
splits. Photos are always held out: :data:`TRAIN_PHOTOS` for training, :data:`VAL_PHOTOS` for validation.
``background_class``: the ADE sets label the background 1 (a class scored like the others), objects from 2.
Every image is drawn from its own generator seeded by (seed, split, index): the same seed writes the same
bytes. Each set writes ``classes.json`` (its class names, label 1 first) and ``dense_data.json`` (its
settings).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from beit3.finetune.data.sources import TUXPAINT_DIR, DataSourceError
from beit3.finetune.errors import FinetuneError

# Photos that ship inside the scikit-image wheel (others would download at run time); the validation
# photos are never used for training.
TRAIN_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "clock", "coins", "gravel", "hubble_deep_field",
    "immunohistochemistry", "moon", "retina", "stereo_motorcycle",
)  # fmt: skip
VAL_PHOTOS = ("chelsea", "coffee", "grass", "rocket")
DEFAULT_CATEGORIES = ("animals", "food", "plants", "vehicles", "household", "town")
SHAPES = ("circle", "rectangle", "triangle")
SPLITS = {"train": ("train", "training"), "val": ("val", "validation")}  # COCO, ADE20K folder names


class DenseDataError(FinetuneError, ValueError):
    """A dense-data setting that cannot be used; the message names it and its allowed values."""


@dataclass
class DenseDataConfig:
    """What :func:`write_sets` writes; the defaults are the benchmark's (bench/dense_small.py)."""

    size: int = 128
    train: int = 200
    val: int = 50
    seed: int = 0
    categories: tuple[str, ...] = DEFAULT_CATEGORIES
    label: str = "category"  # or "stamp"
    stamps_per_category: int = 0  # label = "stamp": stamps per category (0: every stamp)
    max_stamps: int = 4
    scale: tuple[float, float] = (0.25, 0.6)  # a stamp's longer side, as a fraction of the image side
    background_class: bool = False
    quality: int = 95  # JPEG
    sets: tuple[str, ...] = field(default=("coco", "ade"))

    def check(self) -> None:
        """Raise :class:`DenseDataError` naming the setting that cannot be used."""
        if not 16 <= self.size <= 1024:
            raise DenseDataError(f"size {self.size}: use 16 to 1024 pixels")
        if self.train < 1 or self.val < 1:
            raise DenseDataError(f"train {self.train} / val {self.val}: each split needs at least one image")
        if self.label not in ("category", "stamp"):
            raise DenseDataError(f"label {self.label!r}: use 'category' or 'stamp'")
        if not 1 <= self.max_stamps <= 16:
            raise DenseDataError(f"max_stamps {self.max_stamps}: use 1 to 16")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise DenseDataError(f"scale {self.scale}: use 0 < low <= high <= 1")
        unknown = sorted(set(self.sets) - {"coco", "ade", "shapes"})
        if unknown or not self.sets:
            raise DenseDataError(f"sets {list(self.sets)}: choose from coco, ade, shapes")


@dataclass(frozen=True)
class Stamp:
    """One Tux Paint stamp: its PNG, its class name and the class's label (1 first)."""

    path: Path
    name: str
    label: int


def find_stamps(cfg: DenseDataConfig, root: Path = TUXPAINT_DIR) -> tuple[dict[str, list[Stamp]], list[str]]:
    """The stamps of each split and the class names, by :class:`DenseDataConfig` ``label``."""
    if not root.is_dir():
        raise DataSourceError(
            f"no Tux Paint stamps in {root}: "
            "`apt-get install -y --no-install-recommends tuxpaint-stamps-default`"
        )
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    missing = [c for c in cfg.categories if c not in available]
    if missing:
        raise DataSourceError(f"stamp categories {missing} not in {root}; there are: {', '.join(available)}")
    splits: dict[str, list[Stamp]] = {"train": [], "val": []}
    classes: list[str] = []
    for category in cfg.categories:
        pngs = sorted((root / category).rglob("*.png"), key=lambda p: str(p.relative_to(root)))
        if cfg.label == "category":
            classes.append(category)
            for i, png in enumerate(pngs):
                splits["val" if i % 5 == 0 else "train"].append(Stamp(png, category, len(classes)))
            continue
        n = cfg.stamps_per_category or len(pngs)
        for png in [pngs[round(j * len(pngs) / n)] for j in range(min(n, len(pngs)))]:
            classes.append(str(png.relative_to(root).with_suffix("")))
            stamp = Stamp(png, classes[-1], len(classes))
            splits["train"].append(stamp)
            splits["val"].append(stamp)
    return splits, classes


def load_photos(names: tuple[str, ...]) -> list[np.ndarray]:
    """The named ``skimage.data`` photos as uint8 (H, W, 3)."""
    try:
        import skimage.data
    except ImportError as e:
        raise DataSourceError("the dense data's photos need scikit-image: `pip install scikit-image`") from e
    photos = []
    for name in names:
        try:
            arr = getattr(skimage.data, name)()
        except Exception as e:  # a photo that is not in this scikit-image wheel
            raise DataSourceError(
                f"skimage.data.{name}() failed ({e}): `pip install scikit-image>=0.26`"
            ) from e
        arr = np.asarray(arr[0] if isinstance(arr, tuple) else arr)  # stereo pairs: the left image
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        photos.append(np.ascontiguousarray(arr[:, :, :3].astype(np.uint8)))
    return photos


class StampImages:
    """Stamps as RGBA images cropped to their alpha's box, decoded once and kept at most ``2 * size``."""

    def __init__(self, size: int) -> None:
        self.size, self._cache = size, {}

    def __getitem__(self, path: Path) -> Image.Image:
        if path not in self._cache:
            with Image.open(path) as f:
                rgba = f.convert("RGBA")
            box = rgba.getchannel("A").point(lambda a: 255 if a >= 128 else 0).getbbox()
            if box is None:
                raise DataSourceError(f"stamp {path} has no opaque pixel")
            rgba = rgba.crop(box)
            rgba.thumbnail((2 * self.size, 2 * self.size), Image.Resampling.LANCZOS)
            self._cache[path] = rgba
        return self._cache[path]


def resized_stamp(stamp: Image.Image, longer_side: int) -> tuple[np.ndarray, np.ndarray]:
    """The stamp with its longer side ``longer_side``: RGB float (h, w, 3) and alpha in [0, 1] (h, w)."""
    scale = longer_side / max(stamp.size)
    w, h = (max(2, round(s * scale)) for s in stamp.size)
    arr = np.asarray(stamp.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    return arr[:, :, :3], arr[:, :, 3] / 255.0


def photo_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of 40-100 % of the photo's shorter side, resized to (size, size, 3) float."""
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.4, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(crop, dtype=np.float32)


def composite(
    photo: np.ndarray,
    stamps: list[Stamp],
    images: StampImages,
    cfg: DenseDataConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One image: uint8 (S, S, 3), its instance map (S, S) int (0 none, k the k-th instance) and per instance
    ``{"stamp", "label", "paste_box"}``. Each stamp's class is drawn evenly, then one of the class's stamps;
    they are pasted in order, a later one hiding what it covers."""
    size = cfg.size
    canvas = photo_crop(photo, size, rng)
    inst = np.zeros((size, size), np.int32)
    full_areas: list[int] = []
    instances: list[dict] = []
    for _ in range(int(rng.integers(1, cfg.max_stamps + 1))):
        label = int(rng.integers(1, max(s.label for s in stamps) + 1))  # classes drawn evenly
        of_label = [s for s in stamps if s.label == label]
        stamp = of_label[int(rng.integers(len(of_label)))]
        rgb, alpha = resized_stamp(images[stamp.path], round(rng.uniform(*cfg.scale) * size))
        h, w = alpha.shape
        opaque = alpha > 0.5
        for _try in range(10):  # a position that leaves every earlier stamp at least half visible
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            trial = inst.copy()
            trial[y : y + h, x : x + w][opaque] = len(instances) + 1
            if all((trial == k + 1).sum() * 2 >= a for k, a in enumerate(full_areas)):
                break
        else:
            continue
        region = canvas[y : y + h, x : x + w]
        region[...] = alpha[:, :, None] * rgb + (1.0 - alpha[:, :, None]) * region
        inst = trial
        full_areas.append(int(opaque.sum()))
        rel = stamp.path.relative_to(TUXPAINT_DIR) if stamp.path.is_relative_to(TUXPAINT_DIR) else stamp.path
        instances.append({"stamp": str(rel), "label": stamp.label, "paste_box": [x, y, w, h]})
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), inst, instances


def jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet or None, file=sys.stderr)


def write_composites(out: Path, cfg: DenseDataConfig, quiet: bool = False) -> list[str]:
    """The ``coco`` and/or ``ade`` sets of ``cfg.sets`` under ``out``; returns the class names."""
    from pycocotools import mask as mask_utils

    splits, classes = find_stamps(cfg)
    images = StampImages(cfg.size)
    offset = 1 if cfg.background_class else 0
    ade = out / "ade" / "ADEChallengeData2016"
    for split, photo_names in (("train", TRAIN_PHOTOS), ("val", VAL_PHOTOS)):
        coco_dir, ade_dir = SPLITS[split]
        photos = load_photos(photo_names)
        count = cfg.train if split == "train" else cfg.val
        record = {"images": [], "annotations": [], "categories": []}
        record["categories"] = [{"id": k + 1, "name": n, "supercategory": n.split("/")[0]}
                                for k, n in enumerate(classes)]  # fmt: skip
        folders = {"coco": [out / "coco" / coco_dir, out / "coco" / "annotations"],
                   "ade": [ade / "images" / ade_dir, ade / "annotations" / ade_dir]}  # fmt: skip
        for name in cfg.sets:
            for folder in folders.get(name, []):
                folder.mkdir(parents=True, exist_ok=True)
        with _progress(count, f"composites {split}", quiet) as bar:
            for i in range(count):
                rng = np.random.default_rng([cfg.seed, list(SPLITS).index(split), i])
                photo = photos[int(rng.integers(len(photos)))]
                image, inst, instances = composite(photo, splits[split], images, cfg, rng)
                image_id, data = i + 1, jpeg_bytes(image, cfg.quality)
                semantic = np.full(inst.shape, offset, np.uint8)
                for k, ann in enumerate(instances):
                    visible = inst == k + 1
                    semantic[visible] = ann["label"] + offset
                    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
                    bbox = [float(v) for v in mask_utils.toBbox(rle)]
                    rle["counts"] = rle["counts"].decode("ascii")
                    record["annotations"].append({
                        "id": len(record["annotations"]) + 1, "image_id": image_id,
                        "category_id": ann["label"], "segmentation": rle,
                        "area": float(mask_utils.area(rle)), "bbox": bbox, "iscrowd": 0,
                        "stamp": ann["stamp"], "paste_box": ann["paste_box"],
                    })  # fmt: skip
                name = f"{image_id:012d}.jpg"
                record["images"].append(
                    {"id": image_id, "file_name": name, "width": cfg.size, "height": cfg.size}
                )
                if "coco" in cfg.sets:
                    (out / "coco" / coco_dir / name).write_bytes(data)
                if "ade" in cfg.sets:
                    stem = f"ADE_{split}_{image_id:08d}"
                    (ade / "images" / ade_dir / f"{stem}.jpg").write_bytes(data)
                    (ade / "annotations" / ade_dir / f"{stem}.png").write_bytes(png_bytes(semantic))
                bar.update()
        if "coco" in cfg.sets:
            (out / "coco" / "annotations" / f"instances_{split}.json").write_text(json.dumps(record))
    names = (["background"] if cfg.background_class else []) + classes
    for name in ("coco", "ade"):
        if name in cfg.sets:
            _describe(out / name, cfg, classes if name == "coco" else names)
    return classes


def shape_labels(image: np.ndarray, shape: int) -> np.ndarray:
    """easy-VQA image (64, 64, 3) uint8 -> uint8 labels: ``shape`` where a pixel is nearer the shape's colour
    (the pixel farthest from the background) than the background's (the border's median colour), else 0."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    to_background = np.linalg.norm(pixels - background, axis=-1)
    colour = pixels.reshape(-1, 3)[int(to_background.argmax())]
    to_shape = np.linalg.norm(pixels - colour, axis=-1)
    return np.where(to_shape < to_background, shape, 0).astype(np.uint8)


def write_shapes(out: Path, cfg: DenseDataConfig, quiet: bool = False) -> list[str]:
    """The ``shapes`` set: easy-VQA images labelled by their shape (resized to ``size``: labels nearest)."""
    try:
        import easy_vqa
    except ImportError as e:
        raise DataSourceError("the shapes set needs easy-VQA: `pip install easy-vqa==1.0`") from e
    root = out / "shapes" / "ADEChallengeData2016"
    offset = 1 if cfg.background_class else 0
    sources = {"train": (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
               "val": (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())}  # fmt: skip
    for split, ((_, answers, image_ids), paths) in sources.items():
        shape_of = {i: SHAPES.index(a) + 1 for a, i in zip(answers, image_ids) if a in SHAPES}
        chosen = sorted(shape_of)[: cfg.train if split == "train" else cfg.val]
        ade_dir = SPLITS[split][1]
        for kind in ("images", "annotations"):
            (root / kind / ade_dir).mkdir(parents=True, exist_ok=True)
        with _progress(len(chosen), f"shapes {split}", quiet) as bar:
            for image_id in chosen:
                with Image.open(paths[image_id]) as f:
                    image = np.asarray(f.convert("RGB"))
                labels = shape_labels(image, shape_of[image_id])
                labels = np.where(labels > 0, labels + offset, offset).astype(np.uint8)
                if cfg.size != image.shape[0]:
                    image = np.asarray(Image.fromarray(image).resize((cfg.size, cfg.size), Image.BILINEAR))
                    labels = np.asarray(Image.fromarray(labels).resize((cfg.size, cfg.size), Image.NEAREST))
                stem = f"ADE_{split}_{image_id + 1:08d}"
                (root / "images" / ade_dir / f"{stem}.jpg").write_bytes(jpeg_bytes(image, cfg.quality))
                (root / "annotations" / ade_dir / f"{stem}.png").write_bytes(png_bytes(labels))
                bar.update()
    names = (["background"] if cfg.background_class else []) + list(SHAPES)
    _describe(out / "shapes", cfg, names)
    return list(SHAPES)


def _describe(folder: Path, cfg: DenseDataConfig, names: list[str]) -> None:
    (folder / "classes.json").write_text(json.dumps(names, indent=1) + "\n")
    settings = {**asdict(cfg), "train_photos": TRAIN_PHOTOS, "val_photos": VAL_PHOTOS}
    (folder / "dense_data.json").write_text(json.dumps(settings, indent=1) + "\n")


def write_sets(out: Path, cfg: DenseDataConfig, quiet: bool = False) -> None:
    """Every set of ``cfg.sets`` under ``out`` (see the module's docstring)."""
    cfg.check()
    if {"coco", "ade"} & set(cfg.sets):
        write_composites(out, cfg, quiet)
    if "shapes" in cfg.sets:
        write_shapes(out, cfg, quiet)


def main(argv: list[str] | None = None) -> int:
    """``beit3-dense-data OUT``: write the offline dense-prediction sets (see the module's docstring)."""
    d = DenseDataConfig()
    p = argparse.ArgumentParser(prog="beit3-dense-data", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder (coco/, ade/, shapes/ are written under it)")
    p.add_argument("--sets", default=",".join(d.sets), help="comma-separated: coco, ade, shapes")
    p.add_argument("--train", type=int, default=d.train, help="training images per set")
    p.add_argument("--val", type=int, default=d.val, help="validation images per set")
    p.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--categories", default=",".join(d.categories), help="Tux Paint stamp categories")
    p.add_argument("--label", choices=["category", "stamp"], default=d.label,
                   help="classes: stamp categories (stamps held out for val) or single stamps")  # fmt: skip
    p.add_argument("--stamps-per-category", type=int, default=0, help="--label stamp: stamps per category")
    p.add_argument("--max-stamps", type=int, default=d.max_stamps, help="stamps per image: 1 to this")
    p.add_argument("--scale", type=float, nargs=2, default=d.scale, metavar=("LOW", "HIGH"),
                   help="a stamp's longer side as a fraction of the image side")  # fmt: skip
    p.add_argument("--background-class", action="store_true", help="ADE sets: background is class 1")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    cfg = DenseDataConfig(
        size=args.size, train=args.train, val=args.val, seed=args.seed,
        categories=tuple(c for c in args.categories.split(",") if c), label=args.label,
        stamps_per_category=args.stamps_per_category, max_stamps=args.max_stamps, scale=tuple(args.scale),
        background_class=args.background_class, sets=tuple(s for s in args.sets.split(",") if s),
    )  # fmt: skip
    try:
        write_sets(args.out, cfg, args.quiet)
    except DataSourceError as e:
        print(f"beit3-dense-data: error: {e}", file=sys.stderr)
        return 2
    except DenseDataError as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
