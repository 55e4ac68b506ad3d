"""Detection and instance segmentation: COCO instances in, COCO-style mAP out, and the Mask R-CNN task.

The evaluation's reference is pycocotools' COCOeval run directly on files (the ground truth as written, the
results as the COCO results format says), the way COCO's own evaluation scripts use it.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from beit3.finetune.dense import coco

CATEGORIES = [{"id": 7, "name": "square"}, {"id": 3, "name": "disc"}]  # not sorted, not contiguous


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _block(height: int, width: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    m = np.zeros((height, width), dtype=np.uint8)
    m[y : y + h, x : x + w] = 1
    return m


def _ann(ann_id, image_id, category_id, box, mask=None, iscrowd=0, polygon=None):
    x, y, w, h = box
    seg = polygon if polygon is not None else (_rle(mask) if mask is not None else [])
    area = float(mask.sum()) if mask is not None else float(w * h)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(box),
            "area": area, "iscrowd": iscrowd, "segmentation": seg}  # fmt: skip


@pytest.fixture
def fixture_set(tmp_path):
    """Three images (two small, one large enough for a 'large' object), hand-made ground truth with a crowd
    region, and detections in the model's input frame: image 1 at half its size (boxes and masks scaled by
    2 back), images 2 and 3 at their own size (image 3 inside a padded frame)."""
    images = [
        {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
        {"id": 2, "file_name": "b.png", "height": 50, "width": 50},
        {"id": 3, "file_name": "c.png", "height": 200, "width": 160},
    ]
    gt_blocks = {  # ann id: (image, category, x, y, w, h)
        1: (1, 7, 4, 4, 20, 12),
        2: (1, 3, 30, 10, 16, 20),
        3: (2, 7, 10, 10, 24, 24),
        4: (2, 3, 2, 36, 10, 10),
        5: (3, 3, 20, 30, 110, 120),
        6: (3, 7, 100, 160, 50, 30),  # medium
    }
    sizes = {im["id"]: (im["height"], im["width"]) for im in images}
    anns = []
    for ann_id, (img, cat, x, y, w, h) in gt_blocks.items():
        anns.append(_ann(ann_id, img, cat, (x, y, w, h), _block(*sizes[img], x, y, w, h)))
    anns.append(_ann(7, 2, 7, (36, 2, 12, 12), _block(50, 50, 36, 2, 12, 12), iscrowd=1))  # a crowd
    gt = {"images": images, "annotations": anns, "categories": CATEGORIES}
    gt_file = tmp_path / "instances.json"
    gt_file.write_text(json.dumps(gt))

    # Detections (image, class index, score, x, y, w, h in the image's own pixels); class 0 = id 3 (disc).
    dets = [
        (1, 1, 0.9, 4, 4, 20, 12),  # exact
        (1, 0, 0.8, 30, 12, 16, 18),  # good overlap
        (1, 0, 0.3, 0, 20, 10, 10),  # false positive
        (2, 1, 0.95, 12, 10, 22, 24),
        (2, 1, 0.6, 36, 2, 12, 12),  # on the crowd: ignored
        (2, 0, 0.7, 20, 30, 10, 10),  # misses the disc
        (3, 0, 0.85, 22, 30, 108, 116),
        (3, 1, 0.5, 100, 162, 50, 28),
        (3, 1, 0.4, 60, 60, 30, 30),
    ]
    frames = {1: ((20, 30), (24, 32)), 2: ((50, 50), (50, 50)), 3: ((200, 160), (208, 176))}  # input, frame
    outputs, reference = {}, {"bbox": [], "segm": []}
    for img, label, score, x, y, w, h in dets:
        (height, width), ((ih, iw), (fh, fw)) = sizes[img], frames[img]
        sy, sx = ih / height, iw / width
        prob = np.full((fh, fw), 0.1, dtype=np.float32)  # a soft mask: 0.9 inside, 0.1 outside
        prob[int(y * sy) : int((y + h) * sy), int(x * sx) : int((x + w) * sx)] = 0.9
        out = outputs.setdefault(img, {"boxes": [], "scores": [], "labels": [], "masks": []})
        out["boxes"].append([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
        out["scores"].append(score)
        out["labels"].append(label)
        out["masks"].append(prob[None])
        category = CATEGORIES[1 - label]["id"]  # class indices follow sorted ids: 0 -> 3, 1 -> 7
        reference["bbox"].append({"image_id": img, "category_id": category, "bbox": [x, y, w, h],
                                  "score": score})  # fmt: skip
        reference["segm"].append({"image_id": img, "category_id": category, "score": score,
                                  "segmentation": _rle(_block(height, width, x, y, w, h))})  # fmt: skip
    for img, out in outputs.items():
        outputs[img] = {"boxes": torch.tensor(out["boxes"]), "scores": torch.tensor(out["scores"]),
                        "labels": torch.tensor(out["labels"]),
                        "masks": torch.from_numpy(np.stack(out["masks"]))}  # fmt: skip
    result_files = {}
    for iou_type, results in reference.items():
        result_files[iou_type] = tmp_path / f"results_{iou_type}.json"
        result_files[iou_type].write_text(json.dumps(results))
    return gt_file, outputs, frames, result_files


def _cocoeval_directly(gt_file, results_file, iou_type) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        evaluator = COCOeval(gt, gt.loadRes(str(results_file)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats[:6]]


def test_evaluation_from_model_outputs_equals_pycocotools_cocoeval(fixture_set, tmp_path):
    gt_file, outputs, frames, result_files = fixture_set
    instances = coco.read_instances(gt_file, tmp_path)
    results = []
    for ex in instances.examples:
        input_size, _ = frames[ex["image_id"]]
        original = coco.to_original_frame(outputs[ex["image_id"]], input_size, (ex["height"], ex["width"]))
        results += coco.image_results(ex["image_id"], original, instances.categories)
    metrics = coco.coco_metrics(coco.ground_truth(instances.examples, instances.categories), results)
    for iou_type in ("bbox", "segm"):
        expected = _cocoeval_directly(gt_file, result_files[iou_type], iou_type)
        got = [metrics[f"{iou_type}_{name}"] for name in coco.STAT_NAMES]
        assert got == pytest.approx(expected, abs=1e-12), iou_type
    # The fixture is not trivial: neither perfect nor empty, and a 'large' object is scored.
    assert 0.2 < metrics["bbox_ap"] < 0.95 and metrics["bbox_apl"] > 0


def test_no_detection_scores_zero_where_there_is_ground_truth(fixture_set, tmp_path):
    gt_file, *_ = fixture_set
    instances = coco.read_instances(gt_file, tmp_path)
    metrics = coco.coco_metrics(coco.ground_truth(instances.examples, instances.categories), [])
    assert metrics["bbox_ap"] == 0.0 and metrics["segm_ap50"] == 0.0
    assert metrics["bbox_apm"] == 0.0  # the fixture has medium objects


def test_instances_become_targets_crowds_and_empty_boxes_left_out(tmp_path):
    polygon = [[2.0, 2.0, 10.0, 2.0, 10.0, 8.0, 2.0, 8.0]]  # an 8 x 6 rectangle
    uncompressed = {"size": [20, 30], "counts": _uncompressed_counts(_block(20, 30, 12, 4, 5, 7))}
    anns = [
        _ann(1, 5, 7, (2, 2, 8, 6), polygon=polygon),
        _ann(2, 5, 3, (12, 4, 5, 7), mask=None) | {"segmentation": uncompressed},
        _ann(3, 5, 3, (20, 10, 4, 4), _block(20, 30, 20, 10, 4, 4), iscrowd=1),
        _ann(4, 5, 7, (25, 15, 10, 10), _block(20, 30, 25, 15, 5, 5)),  # runs off the image: clipped
        _ann(5, 5, 7, (31, 2, 3, 3)),  # outside the image: no area left
    ]
    gt = {"images": [{"id": 5, "file_name": "x.png", "height": 20, "width": 30},
                     {"id": 6, "file_name": "y.png", "height": 20, "width": 30}],
          "annotations": anns, "categories": CATEGORIES}  # fmt: skip
    (tmp_path / "i.json").write_text(json.dumps(gt))
    instances = coco.read_instances(tmp_path / "i.json", tmp_path)
    assert instances.categories.ids == [3, 7] and instances.categories.names == ["disc", "square"]
    first, second = instances.examples
    assert first["boxes"] == [[2, 2, 10, 8], [12, 4, 17, 11], [25, 15, 30, 20]]
    assert first["labels"] == [1, 0, 1]
    assert len(first["annotations"]) == 5  # the ground truth keeps the crowd as written
    assert second["boxes"] == [] and instances.paths[1] == str(tmp_path / "y.png")
    masks = coco.decode_masks(first["segmentations"], 20, 30)
    assert masks.shape == (3, 20, 30) and masks.dtype == torch.uint8
    assert torch.equal(masks[1], torch.from_numpy(_block(20, 30, 12, 4, 5, 7)))
    assert torch.equal(masks[2], torch.from_numpy(_block(20, 30, 25, 15, 5, 5)))
    inside = masks[0][2:8, 2:10]  # the polygon covers its rectangle, and nothing beyond its border pixels
    assert inside.float().mean() > 0.7 and masks[0].sum() <= 9 * 7 and masks[0][10:].sum() == 0
    dropped = coco.read_instances(tmp_path / "i.json", tmp_path, drop_empty=True)
    assert [ex["image_id"] for ex in dropped.examples] == [5] and dropped.paths == [str(tmp_path / "x.png")]


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a mask: run lengths of the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return counts


def test_a_malformed_instances_file_is_named(tmp_path):
    from beit3.finetune.data.sources import DataSourceError

    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataSourceError, match="bad.json.*annotations"):
        coco.read_instances(tmp_path / "bad.json", tmp_path)
    with pytest.raises(DataSourceError, match="does not exist"):
        coco.read_instances(tmp_path / "missing.json", tmp_path)
