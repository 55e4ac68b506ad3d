"""Classification tasks: images (vision encoder), texts (language encoder), images by class-name prompts.

Their definitions (:class:`~beit3.finetune.tasks.spec.TaskSpec`): :data:`IMAGE_CLASSIFICATION`,
:data:`TEXT_CLASSIFICATION`, :data:`PROMPT_CLASSIFICATION`.

Batches: ``image`` (B, 3, H, W) float or ``text`` (B, T) ids with ``text_padding_mask`` (True = pad), and
``label`` (B,) class indices; with Mixup/CutMix also ``target`` (B, num_classes), the mixed soft targets
(label smoothing included), which the loss then takes instead (soft-target cross-entropy, as released) while
the accuracy stays against ``label``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from beit3.engine.config_io import ConfigError
from beit3.finetune.metrics import accuracy
from beit3.finetune.tasks.base import FinetuneTask, OptimSettings, init_head, pool_tokens
from beit3.finetune.tasks.retrieval import Retrieval
from beit3.finetune.tasks.spec import BuildInputs, TaskSpec, add_labels
from beit3.model import BEiT3Model
from beit3.model.flops import linear_flops

HEAD_INIT_SCALE = 0.001  # released classification heads start near zero


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c target_c log softmax(logits)_c (fp32): the cross-entropy against soft
    targets (rows summing to 1)."""
    return -(target.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


class _PooledClassifier(FinetuneTask):
    """A pooled encoder feature -> ``fc_norm`` -> ``head`` (keys as released), cross-entropy loss.

    Subclasses say which configuration they run on and how they pool (:meth:`features`).
    """

    head_prefixes = ("head", "fc_norm")

    def __init__(
        self,
        encoder: BEiT3Model,
        num_classes: int,
        label_smoothing: float = 0.0,
        optim: OptimSettings | None = None,
    ) -> None:
        super().__init__(encoder, optim)
        d = self.cfg.embed_dim
        self.label_smoothing = label_smoothing
        self.fc_norm = nn.LayerNorm(d, eps=self.cfg.layernorm_eps)
        self.head = nn.Linear(d, num_classes)
        init_head(self.fc_norm)
        init_head(self.head, HEAD_INIT_SCALE)

    def features(self, batch: dict) -> torch.Tensor:
        """(B, D) pooled encoder output of a batch."""
        raise NotImplementedError

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.head(self.fc_norm(self.features(batch)))
        if "target" in batch:
            loss = soft_target_cross_entropy(logits, batch["target"])
        else:
            loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.label_smoothing)
        return loss, {"loss/cls": loss.detach(), "acc/top1": accuracy(logits, batch["label"])}


class ImageClassification(_PooledClassifier):
    """Mean of the patch tokens (CLS excluded) -> ``fc_norm`` -> ``head``, keys as released.

    Build the encoder with ``configuration="vision", normalize_output=False`` (as released).
    """

    configuration = "vision"

    def __init__(self, encoder: BEiT3Model, num_classes: int, label_smoothing: float = 0.1,
                 optim: OptimSettings | None = None) -> None:  # fmt: skip
        super().__init__(encoder, num_classes, label_smoothing, optim)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) class scores."""
        return self.head(self.fc_norm(self.features({"image": image})))

    def features(self, batch: dict) -> torch.Tensor:
        return self.beit3(image=batch["image"])[:, 1:].mean(dim=1)  # (B, 1 + Np, D) -> (B, D)


class TextClassification(_PooledClassifier):
    """The ``<s>`` token's output (the language "CLS"; ``pooling="mean"``: the mean of the text tokens
    without padding) -> ``fc_norm`` -> ``head``.

    Build the encoder with ``configuration="language", normalize_output=False``.
    """

    configuration = "language"

    def __init__(self, encoder: BEiT3Model, num_classes: int, label_smoothing: float = 0.0,
                 optim: OptimSettings | None = None, pooling: str = "cls") -> None:  # fmt: skip
        super().__init__(encoder, num_classes, label_smoothing, optim)
        self.pooling = pooling

    def logits(self, text: torch.Tensor, text_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_classes) class scores."""
        return self.head(self.fc_norm(self.features({"text": text, "text_padding_mask": text_padding_mask})))

    def features(self, batch: dict) -> torch.Tensor:
        pad = batch.get("text_padding_mask")
        return pool_tokens(self.beit3(text=batch["text"], text_padding_mask=pad), self.pooling, pad)


class PromptClassification(nn.Module):
    """The paper's formulation of image classification: image-to-text retrieval over class-name prompts.

    Wraps a :class:`~beit3.finetune.tasks.retrieval.Retrieval` dual encoder. Every step embeds all class
    prompts (so every language-side parameter is used every step) and scores each image against them:
    logits = exp(logit_scale) x cosine(image, prompt). Loss: cross-entropy over classes.
    """

    def __init__(
        self, retrieval: nn.Module, prompt_ids: torch.Tensor, prompt_padding_mask: torch.Tensor
    ) -> None:
        super().__init__()
        self.retrieval = retrieval
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        self.register_buffer("prompt_padding_mask", prompt_padding_mask.bool(), persistent=False)

    @property
    def cfg(self):
        """The backbone's model configuration (the wrapped dual encoder's)."""
        return self.retrieval.cfg

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) scaled cosine similarities (plain inference; training goes through forward)."""
        img = self.retrieval.embed_images(image)
        txt = self.retrieval.embed_texts(self.prompt_ids, self.prompt_padding_mask)
        return self.retrieval.logit_scale.exp() * img @ txt.t()

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        # Through Retrieval.forward, so that ZeRO-3 gathers its own parameter logit_scale.
        prompts = {"prompt_text": self.prompt_ids, "prompt_padding_mask": self.prompt_padding_mask}
        return self.retrieval({**batch, **prompts})

    def prepare_batch(self, batch: dict, device: torch.device | str) -> dict:
        return self.retrieval.prepare_batch(batch, device)

    def param_groups(self) -> list[dict]:
        return self.retrieval.param_groups()

    def batch_stats(self, batch: dict) -> dict:
        stats = self.retrieval.batch_stats({"image": batch["image"]})
        prompts = self.retrieval.batch_stats(
            {"text": self.prompt_ids, "text_padding_mask": self.prompt_padding_mask}
        )
        scores = linear_flops(batch["image"].shape[0], self.retrieval.cfg.embed_dim, self.prompt_ids.shape[0])
        return {"samples": stats["samples"], "tokens": stats["tokens"] + prompts["tokens"],
                "flops": stats["flops"] + prompts["flops"] + scores}  # fmt: skip


# ----- the task definitions -------------------------------------------------------------------------------
def accuracies(hits: float, hits5: float, total: float) -> dict[str, float]:
    """Image classification's metrics: ``eval/accuracy`` (= ``eval/acc1``) and ``eval/acc5``, the released
    ImageNet names (as fractions; the release prints percent)."""
    return {"eval/accuracy": hits / total, "eval/acc1": hits / total, "eval/acc5": hits5 / total}


def _build_image(b: BuildInputs) -> ImageClassification:
    return ImageClassification(b.encoder, b.num_classes, b.recipe.task.label_smoothing, b.optim)


def _build_text(b: BuildInputs) -> TextClassification:
    task = b.recipe.task
    return TextClassification(b.encoder, b.num_classes, task.label_smoothing, b.optim, task.pooling)


def _build_prompt(b: BuildInputs) -> PromptClassification:
    if b.tokenizer is None:
        raise ConfigError("prompt_classification needs data.tokenizer to encode the class prompts")
    prompts = [b.recipe.task.prompt.format(c.replace("_", " ")) for c in b.classes]
    ids, pad = b.tokenizer.encode_batch(prompts, b.recipe.data.max_text_len)
    return PromptClassification(Retrieval(b.encoder, b.optim), ids, pad)


def _evaluate_image(ev) -> dict[str, float]:
    return accuracies(*ev.hits(lambda batch: ev.task.logits(batch["image"]), top_k=5))


def _evaluate_text(ev) -> dict[str, float]:
    hits, _, total = ev.hits(lambda batch: ev.task.logits(batch["text"], batch["text_padding_mask"]))
    return {"eval/accuracy": hits / total}


def _evaluate_prompt(ev) -> dict[str, float]:
    # The class prompts' embeddings once (on every rank: ZeRO-3's gathers stay in lock-step); images are
    # ranked by their cosine with them, which orders classes as the logits exp(logit_scale) x cosine do.
    # (logit_scale, a parameter of the wrapped module itself, is gathered by ZeRO-3 in forward only.)
    task = ev.task
    retrieval, device = task.retrieval, ev.device
    prompts = retrieval.embed_texts(task.prompt_ids.to(device), task.prompt_padding_mask.to(device))
    return accuracies(*ev.hits(lambda batch: retrieval.embed_images(batch["image"]) @ prompts.t(), top_k=5))


def _wrapped_retrieval(task: PromptClassification) -> nn.Module:
    return task.retrieval


IMAGE_CLASSIFICATION = TaskSpec(
    name="image_classification",
    configuration="vision",
    final_norm=False,
    build=_build_image,
    selection=("eval/accuracy", "max"),
    evaluate=_evaluate_image,
    collate=add_labels,
    texts_in_batch=False,
    needs_tokenizer=False,
    mixup=True,
)
PROMPT_CLASSIFICATION = TaskSpec(
    name="prompt_classification",
    configuration="dual",
    final_norm=True,
    build=_build_prompt,
    selection=("eval/accuracy", "max"),
    evaluate=_evaluate_prompt,
    collate=add_labels,
    backbone=_wrapped_retrieval,
    texts_in_batch=False,
)
TEXT_CLASSIFICATION = TaskSpec(
    name="text_classification",
    configuration="language",
    final_norm=False,
    build=_build_text,
    selection=("eval/accuracy", "max"),
    evaluate=_evaluate_text,
    collate=add_labels,
    images=False,
    pooling=True,
    eval_items="texts",
)
