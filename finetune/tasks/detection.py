"""Object detection and instance segmentation: torchvision's Mask R-CNN (or Faster R-CNN, RetinaNet) on the
BEiT-3 vision encoder's simple feature pyramid (:class:`~beit3.finetune.dense.backbone.DenseBackbone`).

Its definition: :data:`SPEC` (task ``detection``). The recipe's ``[detection]`` table
(:class:`DetectionSection`) picks the detector (``mask_rcnn``, ``faster_rcnn``, ``retinanet``), the training
views, the anchors and the sampling of proposals; ``[detection.backbone]`` the backbone's attention (the dense
tasks' :class:`~beit3.finetune.dense.backbone.BackboneSettings`: ViTDet's windows with global attention in a
few layers).

Batches: ``image`` (B, 3, H, W) in [-1, 1] (the project's normalisation), ``image_size`` (B, 2) the (h, w)
each image fills from the top-left corner (the rest is padding), and ``targets``: one dict per image with
``boxes`` (K, 4) xyxy in those pixels, ``labels`` (K,) class indices and, for Mask R-CNN, ``masks``
(K, h, w) uint8. Evaluation examples also carry their size as stored (``height``, ``width``), to which the
detections are mapped back before COCO's evaluation (:mod:`beit3.finetune.dense.coco`).

torchvision's ``GeneralizedRCNNTransform`` (inside its detectors) normalises and resizes again: it is set up
to do neither (mean 0, std 1; ``min_size = max_size`` = the recipe's image size, so an image the pipeline
already sized to fit it keeps its size) and only pads the batch to ``size_divisibility`` (2 x the patch).
Class 0 of torchvision's detectors is the background: a class index c is the detector's label c + 1.

Precision: under a bf16 model (DeepSpeed's bf16 casts every parameter) torchvision would code boxes in bf16,
whose 8-bit mantissa puts coordinates beyond 512 px on a 4 px grid. The anchors are made in fp32 and the
heads' outputs cast to fp32 (:class:`Float32Outputs`), so proposals, regression targets, decoded boxes and
the losses stay fp32; only the RoI features are sampled in the model's dtype.

ZeRO-3 (docs/engine.md): every step uses every parameter. The RPN, the box head and the pyramid see every
image; torchvision's Mask R-CNN runs its mask head on the positive proposals even when there are none (an
empty batch of RoIs, whose loss is 0 x the logits), so the mask head's gradients are zeros, not missing
(``tests/test_finetune_detection.py`` checks every parameter gets a gradient on an image without objects).

torchvision's compiled ops: PyPI's torchvision 0.28.0 is a CUDA build whose ops do not load beside the CPU
torch of the development machines (:func:`beit3.finetune.data.augment._import_torchvision`). RoIAlign then
runs torchvision's own Python implementation (eagerly: torchvision would compile it with ``torch.compile`` on
first use, minutes of CPU), Mask R-CNN's mask targets sample 2 x 2 points per cell (:func:`mask_targets`);
NMS, which has none, runs :func:`greedy_nms` (the same definition: highest score first, drop boxes whose
IoU with a kept one exceeds the threshold). With the ops loaded (a CUDA torch) nothing is replaced.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from torch import nn

from beit3.engine.config_io import bounded
from beit3.finetune.data.sources import DataSourceError
from beit3.finetune.dense.backbone import LEVELS, BackboneSettings, DenseBackbone
from beit3.finetune.dense.coco import (
    IOU_TYPES,
    annotated,
    coco_metrics,
    collate_detection,
    ground_truth,
    image_results,
    load_coco,
    to_original_frame,
)
from beit3.finetune.tasks.base import OptimSettings
from beit3.finetune.tasks.spec import BuildInputs, TaskSpec
from beit3.model import build_param_groups
from beit3.model.flops import linear_flops

DETECTORS = ("mask_rcnn", "faster_rcnn", "retinanet")
ASPECT_RATIOS = (0.5, 1.0, 2.0)


@dataclass
class DetectionSection:
    """The recipe's ``[detection]`` table (torchvision's names and defaults where it has the setting)."""

    detector: str = "mask_rcnn"  # one of DETECTORS
    train_images: str = "train2017"  # the image folders of data.train / data.eval (relative to data.root)
    eval_images: str = "val2017"
    # Large-scale jitter (ViTDet's training view: beit3.finetune.dense.coco.DetectionViews); data.hflip flips
    scale_min: float = bounded(0.1, "(0, inf)")
    scale_max: float = bounded(2.0, "(0, inf)")
    out_channels: int = bounded(256, "[1, inf)")  # the pyramid's width
    # [detection.backbone]: window attention, out_layers, CLS token (the dense tasks' shared keys).
    backbone: BackboneSettings = field(default_factory=BackboneSettings)
    anchor_size: float = bounded(32.0, "(0, inf)")  # p2's anchor side, doubled at each coarser level
    rpn_batch_size_per_image: int = bounded(256, "[1, inf)")  # anchors sampled for the RPN loss
    rpn_pre_nms_top_n_train: int = bounded(2000, "[1, inf)")  # proposals per level before NMS
    rpn_post_nms_top_n_train: int = bounded(1000, "[1, inf)")  # proposals per image after it (detectron2)
    rpn_pre_nms_top_n_test: int = bounded(1000, "[1, inf)")
    rpn_post_nms_top_n_test: int = bounded(1000, "[1, inf)")
    box_batch_size_per_image: int = bounded(512, "[1, inf)")  # RoIs sampled for the box (and mask) losses
    detections_per_image: int = bounded(100, "[1, inf)")  # COCO scores at most 100 per image
    score_threshold: float = bounded(0.05, "[0, 1)")
    mask_threshold: float = bounded(0.5, "(0, 1)")  # mask probability -> pixel in the results


def _load_torchvision():
    """torchvision, with the fallbacks of the module docstring where its compiled ops did not load."""
    from beit3.finetune.data.augment import _import_torchvision

    torchvision = _import_torchvision()
    from torchvision import extension
    from torchvision.ops import boxes

    roi_align = importlib.import_module("torchvision.ops.roi_align")  # the module: ops.roi_align is the op
    if not extension._has_ops() and boxes.nms is not greedy_nms:
        boxes.nms = greedy_nms  # batched_nms (RPN, RoI heads, RetinaNet) calls the module's nms
        torchvision.ops.nms = greedy_nms
        # torchvision compiles its Python RoIAlign on first use (torch.compile: minutes of CPU): eager.
        roi_align._roi_align = getattr(roi_align._roi_align, "__wrapped__", roi_align._roi_align)
        from torchvision.models.detection import roi_heads

        roi_heads.project_masks_on_boxes = mask_targets
    return torchvision


def mask_targets(
    gt_masks: torch.Tensor, boxes: torch.Tensor, matched: torch.Tensor, size: int
) -> torch.Tensor:
    """Mask R-CNN's targets of one image: each RoI's matched mask (K, H, W) sampled on a ``size`` x
    ``size`` grid over the RoI (RoIAlign), 2 x 2 samples per cell. torchvision's adaptive count (every pixel
    of the RoI) costs seconds per image in its Python RoIAlign; used only where its compiled ops are
    missing."""
    from torchvision.ops import roi_align

    rois = torch.cat([matched[:, None].to(boxes), boxes], dim=1)
    return roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0, sampling_ratio=2)[:, 0]


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes (N, 4) xyxy kept by non-maximum suppression, by decreasing score: the best box
    is kept and every box whose IoU with it exceeds ``iou_threshold`` dropped, then the best remaining one."""
    order = scores.argsort(descending=True, stable=True)
    if not len(order):
        return order
    b = boxes[order].float()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    corner_min, corner_max = (
        torch.max(b[:, None, :2], b[None, :, :2]),
        torch.min(b[:, None, 2:], b[None, :, 2:]),
    )
    inter = (corner_max - corner_min).clamp(min=0).prod(dim=-1)  # (N, N)
    overlaps = (inter / (area[:, None] + area[None, :] - inter) > iou_threshold).cpu().numpy()
    removed = overlaps[0] & False
    keep = []
    for i in range(len(order)):
        if not removed[i]:
            keep.append(i)
            removed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def stride_anchors(sizes: list[tuple[float, ...]], strides: list[float]) -> nn.Module:
    """torchvision's AnchorGenerator (``sizes`` per level, :data:`ASPECT_RATIOS`) placed at the backbone's
    true strides: torchvision infers integer strides from the map sizes (3 instead of 3.5 at p2 of a
    patch-14 model)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    class StrideAnchors(AnchorGenerator):
        def forward(self, image_list, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
            dtype, device = torch.float32, feature_maps[0].device  # box coordinates in fp32, always
            self.set_cell_anchors(dtype, device)
            grids = [list(f.shape[-2:]) for f in feature_maps]
            steps = [[torch.tensor(s, dtype=dtype, device=device)] * 2 for s in strides]
            anchors = torch.cat(self.grid_anchors(grids, steps))
            return [anchors for _ in image_list.image_sizes]

    return StrideAnchors(tuple(sizes), (ASPECT_RATIOS,) * len(sizes))


class Float32Outputs(nn.Module):
    """A head whose outputs (tensors, or lists / tuples of them) are returned in fp32: the box coding and the
    losses downstream of it then run in fp32 under a bf16 / fp16 model (module docstring)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, *args, **kwargs):
        return _float32(self.head(*args, **kwargs))

    def __getattr__(self, name: str):  # the head's other methods (RetinaNet's compute_loss) and attributes
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("head"), name)


def _float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        return type(out)(_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _float32(v) for k, v in out.items()}
    return out


def _pooler(levels: list[str], size: int, strides: list[float]) -> nn.Module:
    """torchvision's MultiScaleRoIAlign with its scales and levels from the strides (not inferred from the map
    sizes); it samples fp32 features at the fp32 boxes and returns the features' dtype (boxes cast to bf16
    would sit on a 4-pixel grid from 512 px on, shifting the RoI bins against the fp32 mask targets)."""
    from torchvision.ops.poolers import MultiScaleRoIAlign, initLevelMapper

    class StridePooler(MultiScaleRoIAlign):
        def forward(self, x, boxes, image_shapes):
            dtype = next(iter(x.values())).dtype
            feats = {k: v.float() for k, v in x.items()}
            return super().forward(feats, [b.float() for b in boxes], image_shapes).to(dtype)

    p = StridePooler(levels, output_size=size, sampling_ratio=2)
    p.scales = [1.0 / st for st in strides]
    p.map_levels = initLevelMapper(2, 2 + len(levels) - 1)
    return p


def build_detector(
    backbone: DenseBackbone, num_classes: int, s: DetectionSection, img_size: int
) -> nn.Module:
    """The torchvision detector ``s.detector`` of ``num_classes`` classes (plus the background) on
    ``backbone``, its transform neither normalising nor resizing an image of the recipe's size."""
    _load_torchvision()
    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet

    strides = [backbone.strides[n] for n in LEVELS]
    common = {"min_size": img_size, "max_size": img_size, "image_mean": [0.0] * 3, "image_std": [1.0] * 3,
              "size_divisible": backbone.size_divisibility}  # fmt: skip
    if s.detector == "retinanet":  # three scales per octave, as in RetinaNet's paper
        sizes = [tuple(s.anchor_size * 2 ** (i + k / 3) for k in range(3)) for i in range(len(LEVELS))]
        model = RetinaNet(backbone, num_classes + 1, anchor_generator=stride_anchors(sizes, strides),
                          score_thresh=s.score_threshold, detections_per_img=s.detections_per_image,
                          topk_candidates=s.rpn_pre_nms_top_n_test, **common)  # fmt: skip
        model.head.classification_head = Float32Outputs(model.head.classification_head)
        model.head.regression_head = Float32Outputs(model.head.regression_head)
        return model

    def pool(size: int) -> nn.Module:
        return _pooler(list(LEVELS), size, strides)

    kwargs = {
        "rpn_anchor_generator": stride_anchors(
            [(s.anchor_size * 2**i,) for i in range(len(LEVELS))], strides
        ),
        "box_roi_pool": pool(7),
        "rpn_batch_size_per_image": s.rpn_batch_size_per_image,
        "rpn_pre_nms_top_n_train": s.rpn_pre_nms_top_n_train,
        "rpn_post_nms_top_n_train": s.rpn_post_nms_top_n_train,
        "rpn_pre_nms_top_n_test": s.rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_test": s.rpn_post_nms_top_n_test,
        "box_batch_size_per_image": s.box_batch_size_per_image,
        "box_detections_per_img": s.detections_per_image,
        "box_score_thresh": s.score_threshold,
        **common,
    }
    if s.detector == "faster_rcnn":
        model = FasterRCNN(backbone, num_classes + 1, **kwargs)
    else:
        model = MaskRCNN(backbone, num_classes + 1, mask_roi_pool=pool(14), **kwargs)
        model.roi_heads.mask_predictor = Float32Outputs(model.roi_heads.mask_predictor)
    model.rpn.head = Float32Outputs(model.rpn.head)
    model.roi_heads.box_predictor = Float32Outputs(model.roi_heads.box_predictor)
    return model


class Detection(nn.Module):
    """A torchvision detector (``self.detector``) on a :class:`DenseBackbone` (``self.detector.backbone``),
    speaking the engine's task protocol (:class:`beit3.engine.task.TaskModule`)."""

    def __init__(self, backbone: DenseBackbone, num_classes: int, settings: DetectionSection,
                 img_size: int, optim: OptimSettings | None = None) -> None:  # fmt: skip
        super().__init__()
        self.cfg = backbone.cfg
        self.settings = settings
        self.num_classes = num_classes
        self.optim = optim or OptimSettings()
        self.detector = build_detector(backbone, num_classes, settings, img_size)
        self._no_weight_decay = {f"detector.backbone.{n}" for n in backbone.no_weight_decay()}

    @property
    def backbone(self) -> DenseBackbone:
        """The dense backbone (its ``beit3`` keys are the released ones)."""
        return self.detector.backbone

    @property
    def masks(self) -> bool:
        """The detector predicts instance masks (Mask R-CNN)."""
        return self.settings.detector == "mask_rcnn"

    def _images(self, batch: dict) -> list[torch.Tensor]:
        return [img[:, :h, :w] for img, (h, w) in zip(batch["image"], batch["image_size"].tolist())]

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1,
                    **({"masks": t["masks"]} if self.masks else {})} for t in batch["targets"]]  # fmt: skip
        losses = self.detector(self._images(batch), targets)
        loss = sum(v.float() for v in losses.values())
        return loss, {"loss/total": loss.detach(), **{f"loss/{k.removeprefix('loss_')}": v.detach()
                                                      for k, v in losses.items()}}  # fmt: skip

    @torch.no_grad()
    def detect(self, batch: dict) -> list[dict]:
        """Per image: ``boxes`` (N, 4) xyxy in the pixels of ``image_size``, ``scores``, ``labels`` (class
        indices) and for Mask R-CNN ``masks`` (N, 1, h, w) probabilities (evaluation mode)."""
        outputs = self.detector(self._images(batch))
        # Class 0 is the background the heads are built with (num_classes + 1 outputs); RetinaNet's
        # post-processing may still emit it: dropped, never mapped to a category.
        kept = [{k: v[o["labels"] > 0] for k, v in o.items()} for o in outputs]
        return [{**o, "labels": o["labels"] - 1} for o in kept]

    def prepare_batch(self, batch: dict, device: torch.device | str) -> dict:
        """Tensors to ``device``, the images in the parameters' dtype; the targets' tensors too."""
        dtype = next(self.parameters()).dtype
        out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out["image"] = out["image"].to(dtype)
        if "targets" in batch:
            out["targets"] = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        return out

    def param_groups(self) -> list[dict]:
        """Layer-wise lr decay over the encoder (``detector.backbone.beit3.*``); the pyramid and the
        detection heads at the full rate (``head_lr_scale`` applies to the heads)."""
        o = self.optim
        named = [(n.removeprefix("detector."), p) for n, p in self.named_parameters()]
        groups = build_param_groups(
            named, depth=self.cfg.depth, weight_decay=o.weight_decay, layer_decay=o.layer_decay,
            head_lr_scale=o.head_lr_scale, head_prefixes=("rpn.", "roi_heads.", "head."),
            no_weight_decay={n.removeprefix("detector.") for n in self._no_weight_decay},
        )  # fmt: skip
        return groups

    def batch_stats(self, batch: dict) -> dict:
        """Samples, image tokens and an estimate of the training FLOPs: the backbone's
        (:meth:`DenseBackbone.training_flops`: the encoder's layers at their attention span, the pyramid) at
        the size torchvision pads the batch to, plus :meth:`head_flops`."""
        b, _, height, width = batch["image"].shape
        unit = self.backbone.size_divisibility
        height, width = -(-height // unit) * unit, -(-width // unit) * unit
        p = self.cfg.patch_size
        tokens = b * ((height // p) * (width // p) + int(self.backbone.cls_token))
        flops = self.backbone.training_flops(b, height, width) + self.head_flops(b, height, width)
        return {"samples": b, "tokens": tokens, "flops": flops}

    def head_flops(self, images: int, height: int, width: int) -> float:
        """Training FLOPs (6 per multiply-add) of the detection heads, estimated: the RPN's 3x3 conv over
        every pyramid position (its 1x1 predictors left out), the box head's two fully connected layers over
        the sampled RoIs, and the mask head's four 3x3 convs over the 14 x 14 RoIs of the positive fraction
        (1/4 of the sampled ones, an upper bound); RetinaNet: its two subnets' four 3x3 convs per position."""
        c, s = self.backbone.out_channels, self.settings
        positions = images * sum(height * width / st**2 for st in self.backbone.strides.values())
        conv3 = linear_flops(positions, 9 * c, c)
        if s.detector == "retinanet":
            return 2 * 4 * conv3
        rois = images * s.box_batch_size_per_image
        box = linear_flops(rois, c * 7 * 7, 1024) + linear_flops(rois, 1024, 1024)
        mask = 4 * linear_flops(rois / 4 * 14 * 14, 9 * c, c) if self.masks else 0.0
        return conv3 + box + mask


def _build(inputs: BuildInputs) -> Detection:
    recipe = inputs.recipe
    s = recipe.detection
    backbone = s.backbone.build(inputs.encoder, s.out_channels)
    return Detection(backbone, inputs.num_classes, s, inputs.encoder.cfg.img_size, inputs.optim)


def recipe_problem(recipe, model_cfg) -> str | None:
    """What the recipe's ``[detection]`` table asks that the model preset cannot do (None: nothing)."""
    s = recipe.detection
    if s.detector not in DETECTORS:
        return f"detection.detector must be one of {DETECTORS}, got {s.detector!r}"
    if s.scale_min > s.scale_max:
        return f"detection.scale_min={s.scale_min} exceeds detection.scale_max={s.scale_max}"
    return s.backbone.problem(model_cfg.depth, "detection.backbone")


def _results(ev) -> list[dict]:
    """COCO results (``image_id``, ``category_id``, ``bbox`` xywh, ``score``, with Mask R-CNN an RLE
    ``segmentation``) of every rank's detections, mapped back to the images as stored, gathered on every
    rank in image order."""
    task, categories = ev.task, ev.split.images.views.categories

    def per_batch(batch: dict, real: int) -> list[list[dict]]:
        outputs = task.detect(batch)  # every image, fillers too: the ranks' forwards stay in step (ZeRO-3)
        sizes, originals = batch["image_size"].tolist(), batch["original_size"].tolist()
        ids = batch["image_id"].tolist()
        return [image_results(ids[i], to_original_frame(out, sizes[i], originals[i],
                                                        task.settings.mask_threshold), categories)
                for i, out in enumerate(outputs[:real])]  # fmt: skip

    return [r for image in ev.gathered(per_batch) for r in image]


def _scores(ev, results: list[dict]) -> dict[str, float]:
    """``eval/bbox_*`` (and ``eval/segm_*`` for Mask R-CNN): COCOeval of ``results`` against the split's
    annotations, on rank 0 only (its memory grows with the set), the numbers given to every rank."""
    iou_types = IOU_TYPES if ev.task.masks else ("bbox",)
    categories = ev.split.images.views.categories

    def score() -> dict[str, float]:
        metrics = coco_metrics(ground_truth(ev.split.examples, categories), results, iou_types)
        return {f"eval/{k}": v for k, v in metrics.items()}

    return ev.on_first_rank(score)


def _evaluate(ev) -> dict[str, float]:
    """COCO AP of the split's detections (:func:`_results`, :func:`_scores`): the same numbers on every
    rank. A split without any annotation (a test set's image list) cannot be scored: it is refused."""
    if not annotated(ev.split.examples):
        raise DataSourceError(
            "data.eval has no annotations (a test set's image list?): it cannot be scored; predict its "
            "detections with --eval-only CHECKPOINT --predict OUT.json"
        )
    return _scores(ev, _results(ev))


def _predict(ev) -> tuple[list, dict]:
    """``--predict``: the COCO results file (a list of detections, the format of COCO's evaluation server
    and of ``COCO.loadRes``) and, when the split has annotations, its COCO AP."""
    results = _results(ev)
    unscored = {"scored": False, "reason": "no annotations"}
    scores = _scores(ev, results) if annotated(ev.split.examples) else unscored
    return results, {**scores, "detections": len(results), "images": len(ev.split.examples)}


SPEC = TaskSpec(
    name="detection",
    configuration="vision",
    final_norm=False,
    build=_build,
    selection=("eval/bbox_ap", "max"),
    evaluate=_evaluate,
    predict=_predict,
    collate=collate_detection,
    backbone=lambda task: task.backbone,
    texts_in_batch=False,
    needs_tokenizer=False,
    sections=("detection",),
    load_data=load_coco,
    recipe_problem=recipe_problem,
)
