"""Semantic segmentation metrics from a confusion matrix: mean IoU and pixel accuracy (pure functions).

The confusion matrix is what evaluation accumulates, per rank, and sums over the ranks: counts add, so the
metrics of N ranks are exactly those of one process over the same images. Pixels labelled
``ignore_index`` (ADE20K's 255: "other" after reducing the zero label, and crop padding) are left out.

IoU of class c = TP / (TP + FP + FN) = M[c, c] / (row c + column c - M[c, c]) with M[target, prediction];
the mean is over the classes present in the ground truth or the prediction of the evaluated images (a
class absent from both has no IoU and does not count, as in mmsegmentation's nan-mean). Pixel accuracy =
trace / total: the fraction of labelled pixels predicted right.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = 255  # the label of pixels no metric or loss counts


def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows the target class, columns the predicted one, of the
    pixels of ``prediction`` / ``target`` (same shape, class indices) whose target is not
    ``ignore_index``."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    keep = target != ignore_index
    t, p = target[keep].long(), prediction[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"target classes must be in [0, {num_classes}) or {ignore_index}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(matrix: torch.Tensor) -> dict[str, float]:
    """``miou`` (mean IoU over the classes present in target or prediction), ``pixel_acc`` and ``macc``
    (mean per-class accuracy over the classes present in the target) of a confusion matrix."""
    m = matrix.double()
    tp = m.diagonal()
    in_target, in_prediction = m.sum(1), m.sum(0)
    union = in_target + in_prediction - tp
    present, labelled = union > 0, in_target > 0
    total = m.sum()
    return {
        "miou": (tp[present] / union[present]).mean().item() if present.any() else 0.0,
        "pixel_acc": (tp.sum() / total).item() if total > 0 else 0.0,
        "macc": (tp[labelled] / in_target[labelled]).mean().item() if labelled.any() else 0.0,
    }
