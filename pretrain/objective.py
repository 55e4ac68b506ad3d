"""Masked data modeling (paper §2.2): one objective over images, texts and image-text pairs.

The task module the engine trains. Each micro-batch holds three sub-batches, forwarded in a fixed order
(images, texts, pairs) so that every optimizer step touches every parameter on every rank (ZeRO-3 re-applies
stale gradients to parameters unused in a step; docs/engine.md). Losses:

* ``mim``: masked image modeling on images: predict the visual-tokenizer code of every masked patch.
* ``mlm``: masked language modeling on texts.
* ``vl_mlm`` / ``vl_mim``: the same on image-text pairs (text and/or image masked, per the data's pair
  masking mode), with the other modality visible.

Each loss is a mean over its masked tokens; the total is their weighted sum. Logits are computed only at
masked positions (the 64k-way MLM head would otherwise dominate the step). The visual tokenizer is frozen and
is deliberately not a submodule: it runs in :meth:`prepare_batch` under no_grad, outside the DeepSpeed module,
so its weights are never partitioned, optimized or saved with the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from beit3.engine.config_io import bounded
from beit3.model import BEiT3Model, build_param_groups
from beit3.model.flops import Pass, training_flops

SUBBATCHES = ("image", "text", "pair")


@dataclass
class ObjectiveConfig:
    """Loss weights of the masked-data-modeling terms."""

    mim_weight: float = bounded(1.0, "[0, inf)")
    mlm_weight: float = bounded(1.0, "[0, inf)")
    vl_mlm_weight: float = bounded(1.0, "[0, inf)")
    vl_mim_weight: float = bounded(1.0, "[0, inf)")
    label_smoothing: float = bounded(0.0, "[0, 1)")

    def loss_weights(self) -> dict[str, float]:
        """``{term: weight}`` of every loss term (the fields named ``<term>_weight``)."""
        return {
            name[: -len("_weight")]: value for name, value in vars(self).items() if name.endswith("_weight")
        }


def _masked_ce(
    logits_fn, hidden: torch.Tensor, select: torch.Tensor, targets: torch.Tensor, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy mean over selected positions, with the number of correct predictions and positions.

    Empty selections give a zero loss (not NaN) while still running the head, so its parameters take part
    in every step.
    """
    logits = logits_fn(hidden[select]).float()  # (M, V)
    target = targets[select]
    loss_sum = F.cross_entropy(logits, target, reduction="sum", label_smoothing=smoothing)
    count = select.sum()
    correct = (logits.argmax(-1) == target).sum()
    return loss_sum / count.clamp(min=1), correct, count


class MaskedDataModeling(nn.Module):
    """The pretraining task module (engine protocol: forward, prepare_batch, param_groups, batch_stats)."""

    def __init__(
        self,
        model: BEiT3Model,
        visual_tokenizer=None,
        cfg: ObjectiveConfig | None = None,
        weight_decay: float = 0.05,
    ) -> None:
        super().__init__()
        if model.mlm_head is None or model.mim_head is None:
            raise ValueError("pretraining needs a model built with pretraining_heads=True")
        self.model = model
        self.cfg = cfg or ObjectiveConfig()
        self.weight_decay = weight_decay
        # Kept outside the module tree on purpose (see module docstring).
        self.__dict__["visual_tokenizer"] = visual_tokenizer

    # ---- engine protocol -------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_batch(self, batch: dict, device: torch.device) -> dict:
        """Move tensors to ``device`` and replace tokenizer views by visual-token codes."""
        out = {}
        for key, sub in batch.items():
            if key not in SUBBATCHES:
                out[key] = sub
                continue
            sub = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in sub.items()}
            if "tokenizer_image" in sub:
                if self.visual_tokenizer is None:
                    raise RuntimeError("batch has tokenizer views but no visual tokenizer was given")
                sub["image_codes"] = self.visual_tokenizer.codes(sub.pop("tokenizer_image")).to(device)
            if "image" in sub:
                sub["image"] = sub["image"].to(self._param_dtype())
            out[key] = sub
        return out

    def _param_dtype(self) -> torch.dtype:
        return self.model.beit3.vision_embed.proj.weight.dtype

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        model = self.model
        terms: list[tuple[str, float, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if "image" in batch:
            b = batch["image"]
            h = model(image=b["image"], image_mask=b["image_mask"])
            terms.append(("mim", c.mim_weight, *self._image_loss(h, b)))
        if "text" in batch:
            b = batch["text"]
            h = model(text=b["text"], text_padding_mask=b["text_padding_mask"])
            terms.append(("mlm", c.mlm_weight, *self._text_loss(h, b)))
        if "pair" in batch:
            b = batch["pair"]
            h = model(
                image=b["image"],
                text=b["text"],
                text_padding_mask=b["text_padding_mask"],
                image_mask=b["image_mask"],
            )
            num_vision = h.shape[1] - b["text"].shape[1]
            terms.append(("vl_mlm", c.vl_mlm_weight, *self._text_loss(h[:, num_vision:], b)))
            terms.append(("vl_mim", c.vl_mim_weight, *self._image_loss(h[:, :num_vision], b)))
        if not terms:
            raise ValueError(f"batch holds none of the sub-batches {SUBBATCHES}")
        total = sum(w * loss for _, w, loss, _, _ in terms)
        metrics: dict[str, torch.Tensor] = {}
        for name, _, loss, correct, count in terms:
            metrics[f"loss/{name}"] = loss.detach()
            metrics[f"acc/{name}"] = correct.float() / count.clamp(min=1)
        return total, metrics

    def _image_loss(self, hidden: torch.Tensor, b: dict):
        # hidden: (B, Np + 1, D) image part; position 0 is the vision CLS, which is never masked.
        return _masked_ce(
            self.model.mim_head, hidden[:, 1:], b["image_mask"], b["image_codes"], self.cfg.label_smoothing
        )

    def _text_loss(self, hidden: torch.Tensor, b: dict):
        labels = b["text_labels"]
        return _masked_ce(
            self.model.mlm_head, hidden, labels.ne(-100), labels.clamp(min=0), self.cfg.label_smoothing
        )

    def param_groups(self) -> list[dict]:
        """AdamW groups: weight decay except on biases, norms, position tables, CLS and mask tokens."""
        return build_param_groups(
            self.named_parameters(),
            depth=self.model.cfg.depth,
            weight_decay=self.weight_decay,
            no_weight_decay={f"model.{n}" for n in self.model.no_weight_decay()},
        )

    def batch_stats(self, batch: dict) -> dict:
        """Samples, tokens and training FLOPs of a micro-batch (call on the CPU batch: no device sync)."""
        cfg = self.model.cfg
        passes = []
        masked_text = masked_patches = 0
        for key in SUBBATCHES:
            if key not in batch:
                continue
            b = batch[key]
            n = (b["image"] if "image" in b else b["text"]).shape[0]
            passes.append(Pass(n, image="image" in b, text_len=b["text"].shape[1] if "text" in b else 0))
            if "image" in b:
                masked_patches += int(b["image_mask"].sum())
            if "text_labels" in b:
                masked_text += int(b["text_labels"].ne(-100).sum())
        return {
            "samples": sum(p.samples for p in passes),
            "tokens": sum(p.samples * p.seq_len(cfg) for p in passes),
            "flops": training_flops(cfg, passes, masked_text, masked_patches),
        }
