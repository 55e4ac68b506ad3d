"""Vision-language understanding on the fusion encoder: visual question answering and NLVR2.

Their definitions (:class:`~beit3.finetune.tasks.spec.TaskSpec`): :data:`VQA_SPEC`, :data:`NLVR2_SPEC`.

VQA batch: ``image``, ``text`` (question ids), ``text_padding_mask``, ``scores`` (B, num_answers) soft
targets. NLVR2 batch: ``image``, ``image2``, ``text``, ``text_padding_mask``, ``label`` (B,) in {0, 1}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from beit3.finetune.metrics import accuracy, vqa_score
from beit3.finetune.outputs import vqa_submission
from beit3.finetune.tasks.base import FinetuneTask, OptimSettings, fused_padding, init_head, pool_tokens
from beit3.finetune.tasks.spec import BuildInputs, TaskSpec, add_labels
from beit3.model import BEiT3Model
from beit3.model.flops import Pass


class Pooler(nn.Module):
    """Token 0 (the vision CLS; ``pooling="mean"``: the mean of the tokens, :func:`pool_tokens`) ->
    LayerNorm -> Linear -> tanh; keys ``norm``, ``dense`` as released."""

    def __init__(self, dim: int, eps: float, pooling: str = "cls") -> None:
        super().__init__()
        self.pooling = pooling
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.dense(self.norm(pool_tokens(x, self.pooling, padding_mask))))


class VQA(FinetuneTask):
    """Answer classification over a fixed answer vocabulary, trained with soft-score BCE.

    Head ``head`` = Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, num_answers) (keys ``head.0/1/3``).
    The loss is binary cross-entropy averaged over answers and multiplied by the number of answers, i.e.
    summed over answers and averaged over the batch, as released. Build the encoder with
    ``configuration="fusion", normalize_output=False``. ``pooling``: what the pooler reads (:class:`Pooler`).
    """

    configuration = "fusion"
    head_prefixes = ("head", "pooler")

    def __init__(
        self,
        encoder: BEiT3Model,
        num_answers: int,
        optim: OptimSettings | None = None,
        pooling: str = "cls",
    ) -> None:
        super().__init__(encoder, optim)
        d, eps = self.cfg.embed_dim, self.cfg.layernorm_eps
        self.num_answers = num_answers
        self.pooler = Pooler(d, eps, pooling)
        self.head = nn.Sequential(
            nn.Linear(d, 2 * d), nn.LayerNorm(2 * d, eps=eps), nn.GELU(), nn.Linear(2 * d, num_answers)
        )
        init_head(self.pooler)
        init_head(self.head)

    def logits(
        self, image: torch.Tensor, text: torch.Tensor, text_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, num_answers) answer scores."""
        x = self.beit3(image=image, text=text, text_padding_mask=text_padding_mask)
        return self.head(self.pooler(x, fused_padding(text_padding_mask, self.cfg.num_vision_tokens)))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.logits(batch["image"], batch["text"], batch.get("text_padding_mask"))
        scores = batch["scores"].float()
        loss = F.binary_cross_entropy_with_logits(logits.float(), scores) * self.num_answers
        return loss, {"loss/vqa": loss.detach(), "score/vqa": vqa_score(logits, scores)}


class TwoLayerMLP(nn.Module):
    """LayerNorm -> Linear -> LayerNorm -> GELU -> Linear; keys ``norm1/dense1/norm2/dense2`` as released."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim_in, eps=eps)
        self.dense1 = nn.Linear(dim_in, dim_hidden)
        self.norm2 = nn.LayerNorm(dim_hidden, eps=eps)
        self.dense2 = nn.Linear(dim_hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(F.gelu(self.norm2(self.dense1(self.norm1(x)))))


class NLVR2(FinetuneTask):
    """Is the statement true of the two images? Two fused passes (image_a, text) and (image_b, text).

    Per pair: [vision CLS ; language CLS (the ``<s>`` output)] (2D); the two pairs concatenated (4D) ->
    :class:`TwoLayerMLP` -> 2 classes. Build the encoder with ``configuration="fusion"``.
    """

    configuration = "fusion"
    head_prefixes = ("head",)

    def __init__(self, encoder: BEiT3Model, optim: OptimSettings | None = None) -> None:
        super().__init__(encoder, optim)
        d, eps = self.cfg.embed_dim, self.cfg.layernorm_eps
        self.head = TwoLayerMLP(4 * d, 2 * d, 2, eps)
        init_head(self.head, 0.001)

    def logits(
        self,
        image: torch.Tensor,
        image2: torch.Tensor,
        text: torch.Tensor,
        text_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, 2) scores for false / true."""
        b = image.shape[0]
        pad = torch.cat([text_padding_mask] * 2) if text_padding_mask is not None else None
        x = self.beit3(image=torch.cat([image, image2]), text=torch.cat([text, text]), text_padding_mask=pad)
        nv = self.cfg.num_vision_tokens
        pair = torch.cat([x[:, 0], x[:, nv]], dim=-1)  # (2B, 2D)
        return self.head(torch.cat([pair[:b], pair[b:]], dim=-1))  # (B, 4D) -> (B, 2)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.logits(batch["image"], batch["image2"], batch["text"], batch.get("text_padding_mask"))
        loss = F.cross_entropy(logits.float(), batch["label"])
        return loss, {"loss/nlvr2": loss.detach(), "acc/nlvr2": accuracy(logits, batch["label"])}

    def token_counts(self, batch: dict) -> tuple[int, int, int]:
        vision, text, samples = super().token_counts(batch)
        return 2 * vision, 2 * text, 2 * samples

    def passes(self, batch: dict) -> list[Pass]:
        return [Pass(2 * batch["image"].shape[0], image=True, text_len=batch["text"].shape[1])]


# ----- the task definitions -------------------------------------------------------------------------------
def add_scores(batch: dict, examples: list[dict], collator, generator) -> None:
    """VQA's ``collate`` hook: ``scores`` (B, num_answers), each example's soft scores by answer index."""
    scores = torch.zeros(len(examples), collator.num_answers)
    for i, ex in enumerate(examples):
        for label, score in ex["scores"].items():
            scores[i, label] = score
    batch["scores"] = scores


def _vqa_logits(ev):
    return lambda batch: ev.task.logits(batch["image"], batch["text"], batch["text_padding_mask"])


def _evaluate_vqa(ev) -> dict[str, float]:
    hits, _, total = ev.hits(_vqa_logits(ev), soft=True)
    return {"eval/vqa_score": hits / total}


def _predict_vqa(ev) -> tuple[list, dict]:
    """The VQAv2 submission (question ids from the index's ``qid``, else the example's position) and, when
    the split carries answers, its VQA score."""
    examples = ev.split.examples
    preds = ev.predictions(_vqa_logits(ev))
    qids = [ex.get("question_id", i) for i, ex in enumerate(examples)]
    report: dict = {"questions": len(preds)}
    if any(ex.get("scores") for ex in examples):  # an annotated split: its VQA score
        hits = sum(ex.get("scores", {}).get(p, 0.0) for ex, p in zip(examples, preds))
        report["vqa_score"] = hits / len(preds)
    return vqa_submission(qids, preds, ev.answers or []), report


def _evaluate_nlvr2(ev) -> dict[str, float]:
    task = ev.task
    hits, _, total = ev.hits(
        lambda b: task.logits(b["image"], b["image2"], b["text"], b["text_padding_mask"])
    )
    return {"eval/accuracy": hits / total}


def _build_vqa(b: BuildInputs) -> VQA:
    return VQA(b.encoder, b.num_classes, b.optim, b.recipe.task.pooling)


def _build_nlvr2(b: BuildInputs) -> NLVR2:
    return NLVR2(b.encoder, b.optim)


VQA_SPEC = TaskSpec(
    name="vqa",
    configuration="fusion",
    final_norm=False,
    build=_build_vqa,
    selection=("eval/vqa_score", "max"),
    evaluate=_evaluate_vqa,
    predict=_predict_vqa,
    collate=add_scores,
    answer_vocabulary=True,
    pooling=True,
    shapes_layout="questions",
    eval_items="questions",
)
NLVR2_SPEC = TaskSpec(
    name="nlvr2",
    configuration="fusion",
    final_norm=True,
    build=_build_nlvr2,
    selection=("eval/accuracy", "max"),
    evaluate=_evaluate_nlvr2,
    collate=add_labels,
    shapes_layout="pairs",
    eval_items="pairs",
)
