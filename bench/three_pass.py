"""The pretraining objective as it was before the one pass per micro-batch (issue 13 item 1), kept as a
reference for benchmarks and equality tests only (``bench/train_step.py --objective three-pass``,
``tests/test_pretrain_one_pass.py``).

One model forward per sub-batch (images, texts, pairs, in that order), so each layer's parameters are used
up to three times per micro-batch (ZeRO-3 gathers them again for each pass), and each head once per loss
term. Same losses, metrics and gradients as ``MaskedDataModeling`` to fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from beit3.pretrain.objective import SUBBATCHES, MaskedDataModeling


class ThreePassObjective(MaskedDataModeling):
    """``MaskedDataModeling`` with the three-pass forward."""

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m, c = self.model, self.cfg

        def ce(head, hidden, select, targets):
            logits = head(hidden[select]).float()
            target = targets[select]
            loss = F.cross_entropy(logits, target, reduction="sum", label_smoothing=c.label_smoothing)
            count = select.sum()
            return loss / count.clamp(min=1), (logits.argmax(-1) == target).sum(), count

        def image_loss(h, b):
            return ce(m.mim_head, h[:, 1:], b["image_mask"], b["image_codes"])

        def text_loss(h, b):
            labels = b["text_labels"]
            return ce(m.mlm_head, h, labels.ne(-100), labels.clamp(min=0))

        terms = []
        if "image" in batch:
            b = batch["image"]
            h = m(image=b["image"], image_mask=b["image_mask"])
            terms.append(("mim", c.mim_weight, *image_loss(h, b)))
        if "text" in batch:
            b = batch["text"]
            h = m(text=b["text"], text_padding_mask=b["text_padding_mask"])
            terms.append(("mlm", c.mlm_weight, *text_loss(h, b)))
        if "pair" in batch:
            b = batch["pair"]
            h = m(
                image=b["image"],
                text=b["text"],
                text_padding_mask=b["text_padding_mask"],
                image_mask=b["image_mask"],
            )
            nv = h.shape[1] - b["text"].shape[1]
            terms.append(("vl_mlm", c.vl_mlm_weight, *text_loss(h[:, nv:], b)))
            terms.append(("vl_mim", c.vl_mim_weight, *image_loss(h[:, :nv], b)))
        if not terms:
            raise ValueError(f"batch holds none of the sub-batches {SUBBATCHES}")
        total = sum(w * loss for _, w, loss, _, _ in terms)
        metrics = {}
        for name, _, loss, correct, count in terms:
            metrics[f"loss/{name}"] = loss.detach()
            metrics[f"acc/{name}"] = correct.float() / count.clamp(min=1)
        return total, metrics
