"""Image-text retrieval on the dual encoder, with a contrastive loss over features gathered from all ranks.

Batch: ``image``, ``text``, ``text_padding_mask`` (row i of the images goes with row i of the texts).
Its definition (:class:`~beit3.finetune.tasks.spec.TaskSpec`): :data:`SPEC`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from beit3.finetune.outputs import retrieval_report
from beit3.finetune.tasks.base import FinetuneTask, OptimSettings, init_head, pool_tokens
from beit3.finetune.tasks.spec import BuildInputs, TaskSpec
from beit3.model import BEiT3Model
from beit3.model.flops import Pass, linear_flops


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of ``x`` concatenated in rank order, gradients flowing back to each rank's own rows.

    Returns the gathered tensor and the offset of this rank's rows. Single process: ``x`` unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather  # autograd-aware: backward reduces gradients

    parts = all_gather(x)
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Symmetric InfoNCE of local features against all ranks' features (CLIP loss, gathered with gradient).

    Features are L2-normalised (B, D); ``logit_scale`` is the log temperature. Returns the loss, the mean
    of image-to-text and text-to-image cross-entropies, and in-batch accuracies.
    """
    all_images, offset = gather_with_grad(image_features)
    all_texts, _ = gather_with_grad(text_features)
    scale = logit_scale.exp()
    logits_i2t = scale * image_features @ all_texts.t()  # (B, world * B)
    logits_t2i = scale * text_features @ all_images.t()
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    loss = (F.cross_entropy(logits_i2t.float(), labels) + F.cross_entropy(logits_t2i.float(), labels)) / 2
    metrics = {
        "loss/contrastive": loss.detach(),
        "acc/i2t": (logits_i2t.argmax(-1) == labels).float().mean().item(),
        "acc/t2i": (logits_t2i.argmax(-1) == labels).float().mean().item(),
        "optim/logit_scale": scale.item(),
    }
    return loss, metrics


class Retrieval(FinetuneTask):
    """Dual encoder: vision CLS -> ``vision_head``, text ``<s>`` -> ``language_head``, both L2-normalised.

    Heads are bias-free Linear(D, D); ``logit_scale`` starts at log(1/0.07) and is not clamped, as released.
    It has shape (1,) where the release stores a 0-d tensor: DeepSpeed cannot broadcast 0-d parameters.
    Loading accepts either shape (:func:`beit3.finetune.reload.fit_logit_scale`).
    Build the encoder with ``configuration="dual"`` (final LayerNorm kept). ``pooling="mean"``: each head
    reads the mean of its side's tokens (padding left out) instead of the first token (:func:`pool_tokens`).
    """

    configuration = "dual"
    head_prefixes = ("vision_head", "language_head", "logit_scale")

    def __init__(self, encoder: BEiT3Model, optim: OptimSettings | None = None, pooling: str = "cls") -> None:
        super().__init__(encoder, optim)
        self.pooling = pooling
        d = self.cfg.embed_dim
        self.vision_head = nn.Linear(d, d, bias=False)
        self.language_head = nn.Linear(d, d, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        init_head(self.vision_head)
        init_head(self.language_head)

    def embed_images(self, image: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-norm image embeddings (a vision-only pass)."""
        x = self.beit3(image=image)
        return F.normalize(self.vision_head(pool_tokens(x, self.pooling)), dim=-1)

    def embed_texts(self, text: torch.Tensor, text_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) unit-norm text embeddings (a text-only pass)."""
        x = self.beit3(text=text, text_padding_mask=text_padding_mask)
        return F.normalize(self.language_head(pool_tokens(x, self.pooling, text_padding_mask)), dim=-1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        if "prompt_text" in batch:  # classification over class-name prompts (PromptClassification)
            return self._prompt_classification(batch)
        img = self.embed_images(batch["image"])
        txt = self.embed_texts(batch["text"], batch.get("text_padding_mask"))
        return contrastive_loss(img, txt, self.logit_scale)

    def _prompt_classification(self, batch: dict) -> tuple[torch.Tensor, dict]:
        img = self.embed_images(batch["image"])
        txt = self.embed_texts(batch["prompt_text"], batch.get("prompt_padding_mask"))
        logits = self.logit_scale.exp() * img @ txt.t()  # (B, num_classes)
        loss = F.cross_entropy(logits.float(), batch["label"])
        acc = (logits.argmax(-1) == batch["label"]).float().mean().item()
        return loss, {"loss/cls": loss.detach(), "acc/top1": acc}

    def passes(self, batch: dict) -> list[Pass]:
        """Images and texts are encoded apart: one pass each."""
        out = [Pass(batch["image"].shape[0], image=True)] if "image" in batch else []
        if "text" in batch:
            out.append(Pass(batch["text"].shape[0], text_len=batch["text"].shape[1]))
        return out

    def head_flops(self, batch: dict) -> float:
        """The projection heads, and the similarity logits of the contrastive loss (against all ranks)."""
        d = self.cfg.embed_dim
        flops = sum(linear_flops(batch[k].shape[0], d, d) for k in ("image", "text") if k in batch)
        if "image" in batch and "text" in batch:
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            flops += 2 * linear_flops(batch["image"].shape[0], d, world * batch["text"].shape[0])
        return flops


# ----- the task definition --------------------------------------------------------------------------------
def _build(b: BuildInputs) -> Retrieval:
    return Retrieval(b.encoder, b.optim, b.recipe.task.pooling)


def _evaluate(ev) -> dict[str, float]:
    """R@1/5/10 both ways and ``eval/average``, their mean (the released ``average_score``)."""
    return {f"eval/{k}": v for k, v in ev.recalls().items()}


def _predict(ev) -> tuple[dict, dict]:
    """The released recalls (percent, ``average_score``), also the report."""
    report = retrieval_report(ev.recalls())
    return report, dict(report)


SPEC = TaskSpec(
    name="retrieval",
    configuration="dual",
    final_norm=True,
    build=_build,
    selection=("eval/average", "max"),
    evaluate=_evaluate,
    predict=_predict,
    pooling=True,
)
