"""COCO instances in and COCO-style mAP out: the detection and instance-segmentation data and evaluation.

In: a COCO instances JSON (``images``, ``annotations``, ``categories``) and the folder its ``file_name`` s are
relative to (:func:`read_instances`). Each image becomes one example: ``sample`` (its row in the split's
images), ``image_id``, ``height`` and ``width``, its training targets (``boxes`` xyxy in pixels of the image
as stored, ``labels`` 0-based class indices, ``segmentations`` the annotations' polygons or RLE, decoded into
masks by :func:`decode_masks` where a batch needs them) and ``annotations``, the image's COCO annotations as
written, which the evaluation scores against. Crowd annotations (``iscrowd`` 1) are not training targets
(torchvision's and detectron2's COCO training drop them) and stay in the ground truth, where COCOeval
ignores the detections matched to them; boxes are clipped to the image and those left without area are
dropped from the targets, as torchvision's COCO reference does.

Batches: the detection task's spec reads its data through :func:`load_coco` and collates it with
:func:`collate_detection` (the views of :class:`DetectionViews`; the dense-task plumbing of
:mod:`beit3.finetune.dense.data`).

Out: per-image detections (boxes xyxy, scores, labels, optional masks) in the image's own pixels become COCO
results (:func:`image_results`: boxes xywh, category ids, masks as compressed RLE), those of the model's
input frame are first mapped back (:func:`to_original_frame`), and :func:`coco_metrics` scores the results
of all ranks (gathered by the evaluation loop) with pycocotools' COCOeval: AP, AP50, AP75 and AP
small/medium/large per IoU type, fractions in [0, 1] (-1 where no ground truth falls in a size range, as
COCOeval says). COCOeval's console output goes to the log at debug level.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from beit3.finetune.data.sources import DataSourceError

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats[0:6] of every IoU type, by the names the evaluation reports them under (eval/bbox_ap ...).
STAT_NAMES = ("ap", "ap50", "ap75", "aps", "apm", "apl")

log = logging.getLogger("beit3.finetune.dense.coco")


@dataclass
class Categories:
    """The category ids of an instances file and the contiguous 0-based class indices the model predicts
    (categories sorted by id, as torchvision's and detectron2's COCO readers number them)."""

    ids: list[int]
    names: list[str]

    def __post_init__(self) -> None:
        self._labels = {c: i for i, c in enumerate(self.ids)}

    @classmethod
    def from_coco(cls, categories: list[dict]) -> Categories:
        ordered = sorted(categories, key=lambda c: int(c["id"]))
        return cls([int(c["id"]) for c in ordered], [str(c.get("name", c["id"])) for c in ordered])

    def label_of(self, category_id: int) -> int:
        """The class index of a category id."""
        return self._labels[int(category_id)]

    def as_coco(self) -> list[dict]:
        """The ``categories`` table of a COCO file."""
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names)]


@dataclass
class Instances:
    """One instances file read: an example per image, the image paths (example ``sample`` indexes them) and
    the categories."""

    examples: list[dict]
    paths: list[str]
    categories: Categories


def _load_json(path: Path, annotated: bool = True) -> dict:
    """A COCO instances file; ``annotated=False`` also takes an image list without ``annotations`` (COCO's
    ``image_info_test-dev2017.json``: images and categories only), read as no annotation."""
    if not path.is_file():
        raise DataSourceError(f"COCO instances file {path} does not exist; set data.train / data.eval")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataSourceError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise DataSourceError(f"{path}: a COCO instances file is a JSON object, not {type(data).__name__}")
    if not annotated and "annotations" not in data:
        data["annotations"] = []
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataSourceError(f"{path}: a COCO instances file needs the lists images, annotations and "
                              f"categories: {missing} missing")  # fmt: skip
    return data


def _targets(anns: list[dict], height: int, width: int, categories: Categories, path: Path) -> dict:
    """The training targets of one image's annotations: non-crowd boxes clipped to the image, with area."""
    boxes, classes, segmentations = [], [], []
    for ann in anns:
        if ann.get("iscrowd", 0):
            continue
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            label = categories.label_of(ann["category_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataSourceError(f"{path}: annotation {ann.get('id')} needs a bbox [x, y, w, h] and a "
                                  f"category_id of the categories table ({e!r})") from None  # fmt: skip
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            continue
        boxes.append([x1, y1, x2, y2])
        classes.append(label)
        segmentations.append(ann.get("segmentation"))
    return {"boxes": boxes, "labels": classes, "segmentations": segmentations}


def read_instances(
    annotation_file: str | Path, image_root: str | Path, drop_empty: bool = False, limit: int = 0
) -> Instances:
    """The examples of a COCO instances file whose images are in ``image_root``; ``drop_empty``: leave out
    the images without a training target (training; COCO's evaluation keeps every image, and takes an
    image list without annotations, which can be predicted but not scored); ``limit``: the first so many
    images (0: all)."""
    path = Path(annotation_file)
    data = _load_json(path, annotated=drop_empty)
    categories = Categories.from_coco(data["categories"])
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    examples, paths = [], []
    for img in data["images"]:
        try:
            image_id, height, width = int(img["id"]), int(img["height"]), int(img["width"])
            file_name = str(img["file_name"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataSourceError(
                f"{path}: image entries need id, file_name, height and width ({e!r})"
            ) from None
        anns = by_image.get(image_id, [])
        ex = {"sample": len(paths), "image_id": image_id, "height": height, "width": width,
              **_targets(anns, height, width, categories, path), "annotations": anns}  # fmt: skip
        if drop_empty and not ex["boxes"]:
            continue
        examples.append(ex)
        paths.append(str(Path(image_root) / file_name))
        if limit and len(examples) == limit:
            break
    return Instances(examples, paths, categories)


def annotated(examples: list[dict]) -> bool:
    """Whether any of the examples has an annotation (an image list without any can be predicted, not
    scored)."""
    return any(ex["annotations"] for ex in examples)


def decode_masks(segmentations: list, height: int, width: int) -> torch.Tensor:
    """uint8 (K, height, width) masks of COCO segmentations: polygon lists, uncompressed RLE (``counts`` a
    list) or compressed RLE, through ``pycocotools.mask`` (a polygon's several parts merged into one mask)."""
    from pycocotools import mask as mask_utils

    out = torch.zeros((len(segmentations), height, width), dtype=torch.uint8)
    for i, seg in enumerate(segmentations):
        if not seg:
            continue
        if isinstance(seg, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        with warnings.catch_warnings():  # pycocotools 2.0.11's decode under numpy 2: a harmless copy warning
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            out[i] = torch.from_numpy(mask_utils.decode(rle))
    return out


def to_original_frame(
    output: dict, input_size: tuple[int, int], original_size: tuple[int, int], mask_threshold: float = 0.5
) -> dict:
    """A detection output in the model's input frame (``boxes`` xyxy, ``masks`` (N, 1, h, w) probabilities,
    as torchvision's detection models return them) mapped to the image as stored: ``input_size`` (h, w) is
    the part of the frame the image was resized to (any padding beyond it is cut off), ``original_size``
    (H, W) its size in the file; masks resized bilinearly and thresholded at ``mask_threshold``."""
    (h, w), (height, width) = input_size, original_size
    out = {k: v for k, v in output.items() if k not in ("boxes", "masks")}
    scale = torch.tensor([width / w, height / h, width / w, height / h], dtype=torch.float32)
    boxes = output["boxes"].float().cpu() * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    out["boxes"] = boxes
    if "masks" in output:
        masks = output["masks"].float().cpu()[:, :, :h, :w]
        if masks.shape[0]:
            masks = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)
        else:
            masks = masks.new_zeros((0, 1, height, width))
        out["masks"] = masks[:, 0] > mask_threshold
    return out


def image_results(image_id: int, output: dict, categories: Categories) -> list[dict]:
    """COCO results of one image's detections in its own pixels: ``boxes`` (N, 4) xyxy -> ``bbox`` xywh,
    ``labels`` class indices -> ``category_id``, ``scores``, and with ``masks`` (N, H, W) bool a compressed
    RLE ``segmentation`` (counts as text, so that the results are JSON)."""
    boxes = output["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].float().cpu().tolist()
    labels = output["labels"].cpu().tolist()
    rles = _encode(output["masks"]) if "masks" in output else None
    results = []
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        r = {"image_id": int(image_id), "category_id": categories.ids[int(label)], "bbox": box,
             "score": float(score)}  # fmt: skip
        if rles is not None:
            r["segmentation"] = rles[i]
        results.append(r)
    return results


def _encode(masks: torch.Tensor) -> list[dict]:
    from pycocotools import mask as mask_utils

    if masks.shape[0] == 0:
        return []
    array = np.asfortranarray(masks.cpu().numpy().astype(np.uint8).transpose(1, 2, 0))  # (H, W, N)
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def ground_truth(examples: list[dict], categories: Categories):
    """A pycocotools ``COCO`` of the examples' images and their annotations as written (crowds included)."""
    from pycocotools.coco import COCO

    images = [{"id": ex["image_id"], "height": ex["height"], "width": ex["width"]} for ex in examples]
    annotations = []
    for ex in examples:
        for ann in ex["annotations"]:
            ann = dict(ann)
            if "area" not in ann:  # COCOeval's size ranges read it; COCO files carry the mask area
                ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
            ann.setdefault("iscrowd", 0)  # COCOeval reads it; a file may leave it out (not a crowd)
            annotations.append(ann)
    # COCOeval records a match by the ground truth's id and counts id 0 as no match: ids 1..N, always (a
    # file's own ids may start at 0 or repeat; the results never refer to them).
    for i, ann in enumerate(annotations):
        ann["id"] = i + 1
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories.as_coco()}
    with _quiet():
        coco.createIndex()
    return coco


@contextlib.contextmanager
def _quiet():
    """pycocotools prints its progress: into the log at debug level instead."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        text = buffer.getvalue().strip()
        if text:
            log.debug("%s", text)


def coco_metrics(gt, results: list[dict], iou_types: tuple[str, ...] = IOU_TYPES) -> dict[str, float]:
    """``{"<iou type>_<stat>": value}`` (``bbox_ap``, ``bbox_ap50``, ... ``segm_apl``) of ``results`` against
    the ``COCO`` ground truth ``gt``, by pycocotools' COCOeval (its defaults: 10 IoU thresholds, 100
    detections per image). Each IoU type is scored on its own copy of the results holding only its field
    (``bbox`` or ``segmentation``), so that a mask's size range is the mask area, as torchvision's COCO
    evaluator does. No result at all: every AP is 0 (-1 in a size range without ground truth)."""
    from pycocotools.cocoeval import COCOeval

    out = {}
    for iou_type in iou_types:
        key = "bbox" if iou_type == "bbox" else "segmentation"
        mine = [{k: v for k, v in r.items() if k not in ("bbox", "segmentation") or k == key}
                for r in results if key in r]  # fmt: skip
        with _quiet():
            if mine:
                dt = gt.loadRes(copy.deepcopy(mine))
            else:  # loadRes refuses an empty list: the same result object, with no annotation
                dt = type(gt)()
                dt.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                              "categories": copy.deepcopy(gt.dataset["categories"])}  # fmt: skip
                dt.createIndex()
            evaluator = COCOeval(gt, dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(STAT_NAMES, evaluator.stats[: len(STAT_NAMES)]):
            out[f"{iou_type}_{name}"] = float(value)
    return out


# ----- the detection task's data: its spec's load_data and collate hooks ------------------------------------
@dataclass(frozen=True)
class DetectionViews:
    """How a detection split's batches are built (the ``views`` of its :class:`DenseImages`).

    Training: large-scale jitter (ViTDet's): the image rescaled by r x (the scale fitting it in
    ``size`` x ``size``), r uniform in [``scale_min``, ``scale_max``], a random ``size`` x ``size`` crop
    (zero-padded where the image is smaller), a horizontal flip with ``hflip``; boxes and masks move with the
    image, boxes left under a pixel are dropped. Evaluation: the longer side resized to ``size``, the
    aspect kept. Both normalised to [-1, 1]."""

    size: int
    categories: Categories
    masks: bool = True  # the targets carry instance masks (Mask R-CNN)
    scale_min: float = 0.1
    scale_max: float = 2.0
    hflip: bool = True


def load_coco(recipe, img_size: int, train_images: bool = True, classes: list[str] | None = None):
    """The detection task's ``load_data`` hook: ``data.train`` / ``data.eval`` the instances files and
    ``detection.train_images`` / ``detection.eval_images`` their image folders, each relative to
    ``data.root`` (or absolute). ``classes`` given (a run's ``classes.json``): the train file is not read,
    and the eval file's categories must be those."""
    from beit3.finetune.data.sources import Split, TaskData
    from beit3.finetune.dense.data import DenseImages

    d, s = recipe.data, recipe.detection
    root = Path(d.root)
    if classes is None and not d.train:
        raise DataSourceError("data.train must name a COCO instances file (relative to data.root)")

    def split(file: str, folder: str, train: bool, limit: int) -> tuple[Split, Categories]:
        inst = read_instances(root / file, root / folder, drop_empty=train, limit=limit)
        if s.detector == "mask_rcnn":  # instance masks are trained and scored: every object needs one
            anns = (a for ex in inst.examples for a in ex["annotations"])
            bare = [a.get("id") for a in anns if not a.get("segmentation")]
            if bare:
                raise DataSourceError(
                    f"{root / file}: {len(bare)} annotation(s) without a segmentation (ids {bare[:5]}); "
                    'Mask R-CNN trains and scores instance masks: set detection.detector = "faster_rcnn" '
                    "for boxes only"
                )
        views = DetectionViews(img_size, inst.categories, s.detector == "mask_rcnn", s.scale_min, s.scale_max,
                               d.hflip)  # fmt: skip
        return Split(inst.examples, DenseImages(inst.paths, img_size, views, train)), inst.categories

    train, categories = Split([]), None
    if classes is None:
        train, categories = split(d.train, s.train_images, True, d.max_train)
    evaluation = Split([])
    if d.eval:
        evaluation, eval_categories = split(d.eval, s.eval_images, False, d.max_eval)
        if classes is None and not annotated(evaluation.examples):
            raise DataSourceError(  # a training run scores it at every evaluation: refused before step 1
                f"{root / d.eval}: no annotations, so a training run cannot evaluate on it; name an "
                "annotated file, or predict its detections from a finetuned model.pth with "
                "--eval-only CHECKPOINT --predict OUT.json"
            )
        expected = categories.names if categories is not None else list(classes)
        if eval_categories.names != expected:
            raise DataSourceError(f"{root / d.eval}: its categories {eval_categories.names} are not the "
                                  f"training ones {expected}")  # fmt: skip
    return TaskData(train, evaluation, list(categories.names) if categories is not None else list(classes))


def collate_detection(batch: dict, examples: list[dict], collator, generator: torch.Generator | None) -> None:
    """The detection task's ``collate`` hook: ``image`` (B, 3, H, W) in [-1, 1], zero-padded to the batch's
    largest, ``image_size`` (B, 2) the (h, w) each fills; training: ``targets`` (boxes xyxy, labels, masks
    of each image's view); evaluation: ``image_id`` (B,) and ``original_size`` (B, 2), the (height, width)
    as stored, to which the detections are mapped back."""
    from beit3.finetune.data.augment import draw_seed, seeded
    from beit3.finetune.dense.data import padded

    images = collator.images
    views: DetectionViews = images.views
    decoded = [images.decode(ex["sample"]) for ex in examples]
    if images.train:
        with seeded(draw_seed(generator)):
            pairs = [_train_view(img, ex, views) for img, ex in zip(decoded, examples)]
        batch["image"], batch["image_size"] = padded([img for img, _ in pairs], 0.0)
        batch["targets"] = [target for _, target in pairs]
        return
    batch["image"], batch["image_size"] = padded([_eval_view(img, views.size) for img in decoded], 0.0)
    batch["image_id"] = torch.tensor([ex["image_id"] for ex in examples])
    batch["original_size"] = torch.tensor([[ex["height"], ex["width"]] for ex in examples])


def _v2():
    from beit3.finetune.data.augment import _import_torchvision

    _import_torchvision()
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    return v2, tv_tensors


def _normalise(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, h, w) -> float in [-1, 1] (the project's normalisation, mean 0.5 and std 0.5)."""
    return image.float() / 127.5 - 1.0


def _train_view(image, example: dict, views: DetectionViews) -> tuple[torch.Tensor, dict]:
    v2, tv = _v2()
    width, height = image.size
    if (height, width) != (example["height"], example["width"]):
        raise DataSourceError(f"image {example['image_id']}: {width}x{height} pixels, its instances file "
                              f"says {example['width']}x{example['height']}")  # fmt: skip
    sample = {
        "image": tv.Image(v2.functional.pil_to_tensor(image)),
        "boxes": tv.BoundingBoxes(
            torch.tensor(example["boxes"], dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=(height, width),
        ),  # fmt: skip
        "labels": torch.tensor(example["labels"], dtype=torch.long),
    }
    if views.masks:
        sample["masks"] = tv.Mask(decode_masks(example["segmentations"], height, width))
    steps = [v2.ScaleJitter((views.size, views.size), (views.scale_min, views.scale_max), antialias=True),
             v2.RandomCrop(views.size, pad_if_needed=True)]  # fmt: skip
    if views.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.SanitizeBoundingBoxes(min_size=1.0))  # drops the labels and masks of the boxes it drops
    out = v2.Compose(steps)(sample)
    target = {"boxes": out["boxes"].as_subclass(torch.Tensor).float(), "labels": out["labels"]}
    if views.masks:
        target["masks"] = out["masks"].as_subclass(torch.Tensor).to(torch.uint8)
    return _normalise(out["image"].as_subclass(torch.Tensor)), target


def _eval_view(image, size: int) -> torch.Tensor:
    v2, _ = _v2()
    width, height = image.size
    scale = size / max(height, width)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = v2.functional.resize(v2.functional.pil_to_tensor(image), [h, w], antialias=True)
    return _normalise(resized)
