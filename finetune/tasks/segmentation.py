"""Semantic segmentation: a feature-pyramid head on the BEiT-3 vision encoder (ADE20K).

Its definition (:class:`~beit3.finetune.tasks.spec.TaskSpec`): :data:`SPEC`. The backbone is
:class:`beit3.finetune.dense.backbone.DenseBackbone` (the encoder plus ViTDet's simple feature pyramid,
``p2``..``p5`` at strides 4..32); the head (:class:`FPNHead`) is torchvision's ``FeaturePyramidNetwork``
over those maps (lateral 1x1 convolutions, top-down sums, a 3x3 convolution per level), every level
upsampled to ``p2`` and concatenated, a 3x3 convolution with GroupNorm and ReLU, and a 1x1 classifier; the
logits are upsampled (bilinear) to the input. Loss: pixel cross-entropy, 255 ignored (mean over the
labelled pixels). The head and the pyramid are fresh (the reload report lists them); layer-wise lr decay
applies to the encoder's layers only (:func:`beit3.model.layer_id_for_lr_decay` puts every other parameter
at the top).

Batches (:func:`beit3.finetune.dense.data.collate_segmentation`): training ``image`` (B, 3, S, S) and
``label_map`` (B, S, S); evaluation the images with their shorter side at S (padded), their sizes, and the
label maps at their own sizes. Evaluation is sliding-window inference: S x S windows at
``segmentation.eval_stride`` (0: 2/3 S, mmseg's 426 for 640), logits averaged where windows overlap,
resized to the label map, arg-max; the confusion matrix of each rank's images is summed over the ranks
(:meth:`beit3.finetune.evaluate.EvalContext.summed`), so N ranks give exactly one process's ``eval/miou``,
``eval/pixel_acc`` and ``eval/macc`` (:mod:`beit3.finetune.dense.seg_metrics`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from beit3.finetune.data.augment import _import_torchvision
from beit3.finetune.dense.backbone import BackboneSettings
from beit3.finetune.dense.data import collate_segmentation, load_ade20k
from beit3.finetune.dense.seg_metrics import IGNORE_INDEX, confusion_matrix, segmentation_scores
from beit3.finetune.tasks.base import FinetuneTask, OptimSettings
from beit3.finetune.tasks.spec import BuildInputs, TaskSpec
from beit3.model import BEiT3Model
from beit3.model.flops import linear_flops


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)  # no batch statistics: rank-independent


class FPNHead(nn.Module):
    """Per-pixel class logits at ``p2``'s resolution from the pyramid's maps (the module docstring)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, levels: int = 4) -> None:
        super().__init__()
        tv = _import_torchvision()
        self.fpn = tv.ops.FeaturePyramidNetwork([in_channels] * levels, channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(levels * channels, channels, 3, padding=1, bias=False), _group_norm(channels), nn.ReLU()
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)  # mmseg's decode heads
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        maps = list(self.fpn(feats).values())  # p2 first
        size = maps[0].shape[-2:]
        up = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        return self.classifier(self.fuse(torch.cat(up, dim=1)))  # (B, K, H / 4, W / 4)


class SemanticSegmentation(FinetuneTask):
    """The dense backbone (``backbone``: ``beit3.`` the encoder, ``pyramid.``) plus ``decode_head``."""

    head_prefixes = ("decode_head",)
    float_inputs = ("image",)

    def __init__(
        self,
        encoder: BEiT3Model,
        num_classes: int,
        optim: OptimSettings | None = None,
        channels: int = 256,
        eval_stride: int = 0,
        backbone: BackboneSettings | None = None,
    ) -> None:
        nn.Module.__init__(self)  # the encoder lives in the backbone, not as self.beit3
        self.cfg = encoder.cfg
        self.optim = optim or OptimSettings()
        self.num_classes = num_classes
        self.backbone = (backbone or BackboneSettings()).build(encoder, channels)
        self.decode_head = FPNHead(channels, channels, num_classes)
        self.crop = self.cfg.img_size
        self.eval_stride = eval_stride or max(1, round(self.crop * 2 / 3))
        self._no_weight_decay = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) class logits of (B, 3, H, W) images (sides multiples of the patch size)."""
        out = self.decode_head(self.backbone(images))
        return F.interpolate(out.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.logits(batch["image"])
        labels = batch["label_map"]
        labelled = (labels != IGNORE_INDEX).sum()
        # Mean over the labelled pixels; 0 (with gradient) for a batch without any (a crop of "other" only).
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        loss = loss / labelled.clamp(min=1)
        with torch.no_grad():
            hits = ((logits.argmax(1) == labels) & (labels != IGNORE_INDEX)).sum()
        return loss, {"loss/seg": loss.detach(), "acc/pixel": (hits / labelled.clamp(min=1)).item()}

    @torch.no_grad()
    def slide_logits(self, image: torch.Tensor) -> torch.Tensor:
        """(K, h, w) logits of one (3, h, w) image by crop x crop windows at ``eval_stride`` (the last window
        of each row and column flush with the edge; an image smaller than the crop is padded), averaged
        where they overlap. One forward pass per image, whatever its size (ZeRO-3's gathers stay in step)."""
        c, s = self.crop, self.eval_stride
        h, w = image.shape[-2:]
        padded = F.pad(image, (0, max(c - w, 0), 0, max(c - h, 0)))
        H, W = padded.shape[-2:]
        ys = sorted({*range(0, H - c, s), H - c})
        xs = sorted({*range(0, W - c, s), W - c})
        windows = torch.stack([padded[:, y : y + c, x : x + c] for y in ys for x in xs])
        out = self.logits(windows)
        total = torch.zeros(out.shape[1], H, W, device=out.device)
        count = torch.zeros(1, H, W, device=out.device)
        for k, (y, x) in enumerate((y, x) for y in ys for x in xs):
            total[:, y : y + c, x : x + c] += out[k]
            count[:, y : y + c, x : x + c] += 1
        return (total / count)[:, :h, :w]

    @torch.no_grad()
    def confusion(self, batch: dict, real: int) -> torch.Tensor:
        """The (K, K) confusion matrix of an evaluation batch's ``real`` first images, at their label maps'
        sizes; every image of the batch is inferred (the filler too: as many passes on every rank)."""
        k = self.num_classes
        matrix = torch.zeros(k, k, dtype=torch.long, device=batch["image"].device)
        for i in range(batch["image"].shape[0]):
            h, w = (int(v) for v in batch["image_size"][i])
            logits = self.slide_logits(batch["image"][i, :, :h, :w])
            lh, lw = (int(v) for v in batch["label_size"][i])
            logits = F.interpolate(logits[None], size=(lh, lw), mode="bilinear", align_corners=False)[0]
            if i < real:
                matrix += confusion_matrix(logits.argmax(0), batch["label_map"][i, :lh, :lw], k)
        return matrix

    def batch_stats(self, batch: dict) -> dict:
        """Samples, vision tokens and training FLOPs of a micro-batch: the backbone's
        (``DenseBackbone.training_flops``: encoder and pyramid) plus the head's (:meth:`head_flops`)."""
        b, _, h, w = batch["image"].shape
        tokens = b * ((h // self.cfg.patch_size) * (w // self.cfg.patch_size) + int(self.backbone.cls_token))
        flops = self.backbone.training_flops(b, h, w) + self.head_flops(batch)
        return {"samples": b, "tokens": tokens, "flops": flops}

    def head_flops(self, batch: dict) -> float:
        """Training FLOPs of the head's convolutions (6 per multiply-add, as :func:`linear_flops` counts a
        weight matrix applied at every pixel): the FPN's laterals and 3x3s at each level, the fuse 3x3 and
        the classifier at ``p2``."""
        b, _, h, w = batch["image"].shape
        rows, cols = h // self.cfg.patch_size, w // self.cfg.patch_size
        levels = [(4 * rows) * (4 * cols), (2 * rows) * (2 * cols), rows * cols, (rows // 2) * (cols // 2)]
        head, fpn = self.decode_head, self.decode_head.fpn
        total = 0.0
        for pixels, inner, layer in zip(levels, fpn.inner_blocks, fpn.layer_blocks):
            for conv in (inner[0], layer[0]):
                total += linear_flops(
                    b * pixels, conv.in_channels * conv.kernel_size[0] ** 2, conv.out_channels
                )
        for conv in (head.fuse[0], head.classifier):
            total += linear_flops(
                b * levels[0], conv.in_channels * conv.kernel_size[0] ** 2, conv.out_channels
            )
        return total


# ----- the task definition --------------------------------------------------------------------------------
def _build(b: BuildInputs) -> SemanticSegmentation:
    s = b.recipe.segmentation
    return SemanticSegmentation(b.encoder, b.num_classes, b.optim, s.head_channels, s.eval_stride, s.backbone)


def recipe_problem(recipe, model_cfg) -> str | None:
    """What ``[segmentation]`` asks that the model cannot do (None: nothing), checked without data: the
    sliding windows' stride within the crop (``model.img_size``), the backbone settings against the depth."""
    s, crop = recipe.segmentation, model_cfg.img_size
    if s.eval_stride > crop:
        return f"segmentation.eval_stride={s.eval_stride} exceeds the crop {crop}: windows would skip pixels"
    return s.backbone.problem(model_cfg.depth, "segmentation.backbone")


def _evaluate(ev) -> dict[str, float]:
    matrix = ev.summed(ev.task.confusion)
    return {f"eval/{k}": v for k, v in segmentation_scores(matrix.cpu()).items()}


def _backbone(task: SemanticSegmentation) -> nn.Module:
    return task.backbone


SPEC = TaskSpec(
    name="semantic_segmentation",
    configuration="vision",
    final_norm=False,
    build=_build,
    selection=("eval/miou", "max"),
    evaluate=_evaluate,
    collate=collate_segmentation,
    backbone=_backbone,
    texts_in_batch=False,
    needs_tokenizer=False,
    sections=("segmentation",),
    load_data=load_ade20k,
    recipe_problem=recipe_problem,
)
