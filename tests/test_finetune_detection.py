"""Detection and instance segmentation: COCO instances in, COCO-style mAP out, and the Mask R-CNN task.

The evaluation's reference is pycocotools' COCOeval run directly on files (the ground truth as written, the
results as the COCO results format says), the way COCO's own evaluation scripts use it.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import finetune_on_two_ranks, tensorboard_run
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from beit3.finetune.dense import coco

REPO = Path(__file__).resolve().parents[1]

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


def _assert_project_metrics_equal_cocoeval(instances, outputs, frames, gt_file, result_files) -> dict:
    """The project's path (model-style outputs -> original frame -> COCO results -> metrics) on
    ``instances`` equals COCOeval run directly on ``gt_file`` and the reference results (the metrics)."""
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
    return metrics


def test_evaluation_from_model_outputs_equals_pycocotools_cocoeval(fixture_set, tmp_path):
    gt_file, outputs, frames, result_files = fixture_set
    instances = coco.read_instances(gt_file, tmp_path)
    metrics = _assert_project_metrics_equal_cocoeval(instances, outputs, frames, gt_file, result_files)
    # The fixture is not trivial: neither perfect nor empty, and a 'large' object is scored.
    assert 0.2 < metrics["bbox_ap"] < 0.95 and metrics["bbox_apl"] > 0


def test_annotation_ids_from_0_and_no_iscrowd_key_score_as_pycocotools_on_ids_from_1(fixture_set, tmp_path):
    """COCOeval counts a match with ground-truth id 0 as none, and reads iscrowd: a file whose ids start at
    0 (one repeated) and whose non-crowd annotations have no iscrowd key scores as the same file with ids
    1..N does under pycocotools."""
    gt_file, outputs, frames, result_files = fixture_set
    gt = json.loads(gt_file.read_text())
    for i, ann in enumerate(gt["annotations"]):
        ann["id"] = max(i - 1, 0)  # 0, 0, 1, 2, ...
        if not ann["iscrowd"]:
            del ann["iscrowd"]
    odd = tmp_path / "odd_instances.json"
    odd.write_text(json.dumps(gt))
    instances = coco.read_instances(odd, tmp_path)
    _assert_project_metrics_equal_cocoeval(instances, outputs, frames, gt_file, result_files)


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


# ----- the task: torchvision's detectors on the dense backbone ----------------------------------------------
RECT_COLORS = {1: (220, 30, 30), 2: (30, 60, 220)}  # category id -> colour of its rectangles


def write_rectangles(root: Path, train: int = 6, val: int = 3, size: int = 64, seed: int = 0) -> Path:
    """A COCO-format folder: ``instances_{train,val}.json`` and ``train/``, ``val/`` PNGs of ``size`` px, each
    with 1 to 3 filled rectangles of two categories, side by side (boxes and polygons exact)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(1, n + 1):
            pixels = np.full((size, size, 3), 255, dtype=np.uint8)
            band = size // 3  # one rectangle per vertical third: they never overlap
            for k in range(int(rng.integers(1, 4))):
                cat = int(rng.integers(1, 3))
                w, h = int(rng.integers(band // 2, band)), int(rng.integers(size // 5, size // 2))
                x, y = k * band + int(rng.integers(0, band - w + 1)), int(rng.integers(0, size - h))
                pixels[y : y + h, x : x + w] = RECT_COLORS[cat]
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                             "area": w * h, "iscrowd": 0,
                             "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})  # fmt: skip
            Image.fromarray(pixels).save(root / split / f"{i}.png")
            images.append({"id": i, "file_name": f"{i}.png", "height": size, "width": size})
        cats = [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]
        data = {"images": images, "annotations": anns, "categories": cats}
        (root / f"instances_{split}.json").write_text(json.dumps(data))
    return root


TINY = {"out_channels": 16, "anchor_size": 8.0, "rpn_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 64,
        "rpn_post_nms_top_n_train": 32, "rpn_pre_nms_top_n_test": 64, "rpn_post_nms_top_n_test": 32,
        "box_batch_size_per_image": 16, "detections_per_image": 10}  # fmt: skip


def _task(detector: str = "mask_rcnn"):
    from beit3.finetune.configurations import build_encoder
    from beit3.finetune.tasks.base import OptimSettings
    from beit3.finetune.tasks.detection import Detection, DetectionSection

    torch.manual_seed(0)
    settings = DetectionSection(detector=detector, **TINY)
    encoder = build_encoder("beit3_tiny_patch16_64", "vision", normalize_output=False)
    optim = OptimSettings(weight_decay=0.05, layer_decay=0.5, head_lr_scale=1.0)
    return Detection(settings.backbone.build(encoder, settings.out_channels), 2, settings, 64, optim)


def test_greedy_nms_keeps_the_best_box_of_each_overlapping_group():
    from beit3.finetune.tasks.detection import greedy_nms

    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9], [21, 20, 30, 30.0]]
    )
    scores = torch.tensor([0.5, 0.9, 0.3, 0.8, 0.4])
    # IoU(1, 0) = 81/119 = 0.68, IoU(1, 3) = 72/118 = 0.61, IoU(0, 3) = 0.9, IoU(4, 2) = 0.9: box 1 removes
    # 0 and 3 at 0.5, box 4 removes 2; at 0.65 box 3 (IoU 0.61 with box 1) survives and removes nothing else.
    assert greedy_nms(boxes, scores, 0.5).tolist() == [1, 4]
    assert greedy_nms(boxes, scores, 0.65).tolist() == [1, 3, 4]
    assert greedy_nms(boxes[:0], scores[:0], 0.5).tolist() == []


def test_anchors_are_centred_at_the_backbones_true_strides():
    from beit3.finetune.dense.backbone import LEVELS
    from beit3.finetune.tasks.detection import _load_torchvision, stride_anchors

    _load_torchvision()
    from torchvision.models.detection.image_list import ImageList

    strides = [3.5, 7.0, 14.0, 28.0]  # a patch-14 model's pyramid
    generator = stride_anchors([(8.0,), (16.0,), (32.0,), (64.0,)], strides)
    maps = [torch.zeros(1, 4, 8 // 2**i, 8 // 2**i) for i in range(len(LEVELS))]
    anchors = generator(ImageList(torch.zeros(1, 3, 28, 28), [(28, 28)]), maps)[0]
    assert anchors.shape == (3 * (64 + 16 + 4 + 1), 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    p2 = centres[: 3 * 64].reshape(64, 3, 2)[:, 0]  # one per position, the three aspect ratios share it
    assert torch.allclose(p2[:8, 0], torch.arange(8) * 3.5) and torch.allclose(
        p2[::8, 1], torch.arange(8) * 3.5
    )
    sides = anchors[:3, 2:] - anchors[:3, :2]  # (w, h) of aspect ratios (h / w) 0.5, 1, 2 about 8 x 8
    assert (sides[:, 1] / sides[:, 0]).tolist() == [0.5, 1.0, 2.0] and sides[1].tolist() == [8.0, 8.0]


def test_every_parameter_is_used_on_images_without_objects_and_layer_decay_reaches_the_encoder():
    task = _task()
    task.train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}  # fmt: skip
    batch = {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "image_size": torch.tensor([[64, 64], [48, 64]]),
             "targets": [empty, {**empty, "masks": torch.zeros(0, 48, 64, dtype=torch.uint8)}]}  # fmt: skip
    loss, metrics = task(task.prepare_batch(batch, "cpu"))
    loss.backward()
    assert (
        torch.isfinite(loss) and metrics["loss/mask"] == 0.0
    )  # no positive RoI: the mask loss is 0 x logits
    # ZeRO-3's contract: every trainable parameter has a gradient (zeros where unused), none is left out.
    assert [n for n, p in task.named_parameters() if p.grad is None] == []
    scales = {}
    for group in task.param_groups():
        for p in group["params"]:
            scales[id(p)] = group.get("lr_scale", 1.0)
    named = dict(task.named_parameters())
    layer0 = scales[id(named["detector.backbone.beit3.encoder.layers.0.ffn.A.fc1.weight"])]
    assert layer0 == pytest.approx(0.5**2)  # depth 2: layer 0 is two decays below the heads
    assert scales[id(named["detector.roi_heads.mask_predictor.head.mask_fcn_logits.weight"])] == 1.0
    stats = task.batch_stats(batch)
    assert stats["samples"] == 2 and stats["tokens"] == 2 * (16 + 1)
    assert stats["flops"] > task.backbone.training_flops(2, 64, 64)
    # A bf16 model (DeepSpeed's bf16) codes its boxes in fp32: bf16 would round 1000 px to a 8 px grid.
    task.to(torch.bfloat16).eval()
    out = task.detect(task.prepare_batch(batch, "cpu"))[0]
    assert out["boxes"].dtype == out["scores"].dtype == out["masks"].dtype == torch.float32


def test_training_views_move_boxes_and_masks_with_the_image(tmp_path):
    from beit3.finetune.dense.data import DenseImages

    root = write_rectangles(tmp_path, train=4, val=1, size=64)
    inst = coco.read_instances(root / "instances_train.json", root / "train")
    views = coco.DetectionViews(48, inst.categories, masks=True, scale_min=0.5, scale_max=1.5, hflip=True)
    collator = type("Collator", (), {"images": DenseImages(inst.paths, 48, views, train=True)})()
    batch = {}
    coco.collate_detection(batch, inst.examples, collator, torch.Generator().manual_seed(3))
    assert batch["image"].shape == (4, 3, 48, 48) and batch["image"].min() >= -1 and batch["image"].max() <= 1
    for image, target in zip(batch["image"], batch["targets"]):
        assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"])
        for box, label, mask in zip(target["boxes"], target["labels"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)  # a rectangle's mask fills its box
            assert torch.allclose(box, torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float(),
                                  atol=1.5)  # fmt: skip
            inside = image[:, ys, xs].mean(dim=1)  # its pixels have its category's colour
            colour = torch.tensor(RECT_COLORS[inst.categories.ids[int(label)]]) / 127.5 - 1
            assert torch.allclose(inside, colour, atol=0.35)
    again = {}
    coco.collate_detection(again, inst.examples, collator, torch.Generator().manual_seed(3))
    assert torch.equal(again["image"], batch["image"])  # the batch's generator decides the views


def test_a_detection_recipe_asking_what_the_model_cannot_do_is_refused():
    from beit3.engine.config_io import ConfigError
    from beit3.finetune.recipe import load_recipe, validate_run

    config = json.loads((REPO / "ds_configs" / "zero0_fp32.json").read_text())
    small = REPO / "finetune" / "recipes" / "coco_detection_small.toml"
    with pytest.raises(ConfigError, match=r"detection\.backbone\.global_layers \[7\].*4 layers"):
        validate_run(load_recipe(small, ["detection.backbone.global_layers=[7]"]), config, 1)
    with pytest.raises(ConfigError, match="detection.detector must be one of"):
        validate_run(load_recipe(small, ["detection.detector=cascade"]), config, 1)


# ----- end to end: beit3-finetune on 2 CPU ranks ------------------------------------------------------------
RECIPE = """
[task]
name = "detection"
[model]
name = "beit3_tiny_patch16_64"
drop_path_rate = 0.0
[data]
source = "coco"
root = "{root}"
train = "instances_train.json"
eval = "instances_val.json"
hflip = true
num_workers = 0
[detection]
train_images = "train"
eval_images = "val"
scale_min = 0.8
scale_max = 1.2
{tiny}
[train]
total_steps = 2
warmup_steps = 1
lr = 1e-3
log_every = 1
save_every = 0
eval_every = 2
[param_groups]
layer_decay = 0.9
"""


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """One 2-rank ``beit3-finetune`` run (torchrun, gloo) of the tiny Mask R-CNN under ZeRO-3 (its
    parameters partitioned over the ranks): 2 steps of batch 2 per rank on 4 training images, then 3
    evaluation images (rank 1 holds one and a filler: the ranks' forwards stay in step)."""
    tmp = tmp_path_factory.mktemp("det_run")
    root = write_rectangles(tmp / "data", train=4, val=3)
    recipe, run = tmp / "recipe.toml", tmp / "run"
    recipe.write_text(RECIPE.format(root=root, tiny="\n".join(f"{k} = {v!r}" for k, v in TINY.items())))
    finetune_on_two_ranks(recipe, run, "zero3_fp32.json", timeout=300)
    return recipe, run


@pytest.mark.multiprocess
def test_detection_finetunes_on_two_ranks_and_logs_coco_ap(two_rank_run):
    _, run = two_rank_run
    scalars = tensorboard_run(run)
    for term in ("total", "classifier", "box_reg", "mask", "objectness", "rpn_box_reg"):
        values = list(scalars[f"loss/{term}"].values())
        assert len(values) == 2 and all(np.isfinite(values)), term
    for name in coco.STAT_NAMES:
        assert set(scalars[f"eval/bbox_{name}"]) == {2} and set(scalars[f"eval/segm_{name}"]) == {2}
    scores = json.loads((run / "eval.json").read_text())
    assert 0.0 <= scores["eval/bbox_ap"] <= 1.0 and 0.0 <= scores["eval/segm_ap50"] <= 1.0
    assert json.loads((run / "classes.json").read_text())["classes"] == ["red", "blue"]


def test_evaluation_only_reads_no_training_file_and_checks_the_eval_categories(tmp_path):
    from beit3.finetune.data.sources import DataSourceError
    from beit3.finetune.recipe import load_recipe

    root = write_rectangles(tmp_path, train=2, val=2)
    recipe = load_recipe(REPO / "finetune" / "recipes" / "coco_detection_small.toml",
                         [f"data.root={root}", "data.train=missing.json", "data.eval=instances_val.json",
                          "detection.eval_images=val"])  # fmt: skip
    data = coco.load_coco(recipe, 64, train_images=False, classes=["red", "blue"])
    assert data.train.examples == [] and len(data.eval.examples) == 2 and data.classes == ["red", "blue"]
    assert data.eval.images.views.categories.ids == [1, 2] and not data.eval.images.train
    with pytest.raises(DataSourceError, match=r"categories \['red', 'blue'\] are not the training ones"):
        coco.load_coco(recipe, 64, train_images=False, classes=["cat", "dog"])
    with pytest.raises(DataSourceError, match="missing.json does not exist"):
        coco.load_coco(recipe, 64)
    gt = json.loads((root / "instances_val.json").read_text())
    del gt["annotations"][0]["segmentation"]  # boxes only: Mask R-CNN's masks cannot be trained or scored
    (root / "instances_val.json").write_text(json.dumps(gt))
    with pytest.raises(DataSourceError, match=r"1 annotation\(s\) without a segmentation.*faster_rcnn"):
        coco.load_coco(recipe, 64, train_images=False, classes=["red", "blue"])
    faster = load_recipe(REPO / "finetune" / "recipes" / "coco_detection_small.toml",
                         [f"data.root={root}", "data.eval=instances_val.json", "detection.eval_images=val",
                          "detection.detector=faster_rcnn"])  # fmt: skip
    assert len(coco.load_coco(faster, 64, train_images=False, classes=["red", "blue"]).eval.examples) == 2


def test_predict_writes_the_results_evaluation_scores_and_a_test_image_list_is_predicted_not_scored(tmp_path):
    """``--predict``'s output is COCO's results format: COCOeval run directly on it (as the evaluation
    server would) gives the AP the project reports (``_scores``, as evaluation does). An image list without
    annotations (COCO's test-dev info file) is predicted, refused by evaluation, and refused as a training
    run's eval set."""
    from beit3.finetune.data.sources import DataSourceError
    from beit3.finetune.evaluate import evaluate, predict
    from beit3.finetune.recipe import load_recipe

    root = write_rectangles(tmp_path, train=2, val=3)
    sets = [f"data.root={root}", "data.train=instances_train.json", "detection.train_images=train",
            "detection.eval_images=val", "detection.detector=faster_rcnn"]  # fmt: skip
    recipe = load_recipe(REPO / "finetune" / "recipes" / "coco_detection_small.toml",
                         [*sets, "data.eval=instances_val.json"])  # fmt: skip
    split = coco.load_coco(recipe, 64, train_images=False, classes=["red", "blue"]).eval
    task = _task("faster_rcnn")  # untrained heads still detect (over the score threshold): a real file
    results, report = predict("detection", task, split, 2)
    assert results and report["detections"] == len(results) and report["images"] == 3
    assert {r["image_id"] for r in results} <= {1, 2, 3} and {r["category_id"] for r in results} <= {1, 2}
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    direct = _cocoeval_directly(root / "instances_val.json", results_file, "bbox")
    assert [report[f"eval/bbox_{n}"] for n in coco.STAT_NAMES] == pytest.approx(direct, abs=1e-12)

    listing = json.loads((root / "instances_val.json").read_text())
    del listing["annotations"]  # images and categories only
    (root / "image_info_test.json").write_text(json.dumps(listing))
    test = load_recipe(REPO / "finetune" / "recipes" / "coco_detection_small.toml",
                       [*sets, "data.eval=image_info_test.json"])  # fmt: skip
    unlabelled = coco.load_coco(test, 64, train_images=False, classes=["red", "blue"]).eval
    predicted, report = predict("detection", task, unlabelled, 2)
    assert predicted == results and report["scored"] is False
    with pytest.raises(DataSourceError, match="no annotations.*--predict"):
        evaluate("detection", task, unlabelled, 2)
    with pytest.raises(DataSourceError, match="no annotations, so a training run cannot evaluate on it"):
        coco.load_coco(test, 64)
