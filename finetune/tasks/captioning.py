"""Image captioning by masked finetuning of the seq2seq configuration (UniLM style, as released).

The sequence is [image ; caption]. Attention: image tokens see only image tokens; caption tokens see the
whole image and the caption up to themselves (causal). Training masks a share of the caption tokens
(``mask_prob``; 80 % become ``<mask>``, 10 % stay, 10 % become a random token) and predicts them with
``mlm_head`` under label smoothing; decoding feeds ``<mask>`` after the text so far and reads the
prediction there (:mod:`beit3.finetune.decoding`).

Batch (after :func:`mask_captions`): ``image``, ``text`` (masked input ids), ``text_padding_mask``,
``masked`` (B, T) bool, ``labels`` (B, T) original ids; ``step`` (int), the optimizer step the batch is
trained in, when the loss drops its worst tokens (:meth:`Captioning.set_drop_worst`). Its definition
(:class:`~beit3.finetune.tasks.spec.TaskSpec`): :data:`SPEC`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from beit3.finetune.errors import BatchError
from beit3.finetune.tasks.base import FinetuneTask, OptimSettings
from beit3.finetune.tasks.spec import BuildInputs, TaskSpec
from beit3.model import BEiT3Model
from beit3.model.flops import linear_flops
from beit3.tokenizers.masking import bert_corruption
from beit3.tokenizers.text import FIRST_ORDINARY_ID


def captioning_attention_mask(
    num_vision: int, text_len: int, device: torch.device | None = None
) -> torch.Tensor:
    """(Nv + T, Nv + T) bool, True = blocked: image->text blocked, text causal (diagonal allowed)."""
    n = num_vision + text_len
    blocked = torch.zeros(n, n, dtype=torch.bool, device=device)
    blocked[:num_vision, num_vision:] = True
    blocked[num_vision:, num_vision:] = torch.ones(text_len, text_len, dtype=torch.bool, device=device).triu(
        1
    )
    return blocked


def mask_captions(
    ids: torch.Tensor,
    padding_mask: torch.Tensor,
    mask_prob: float,
    mask_id: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Choose caption positions to predict and corrupt them (pure, seeded).

    Per caption of n tokens (``<s>`` and ``</s>`` included): round(mask_prob * n) positions, at least 1 and
    at most n - 1, drawn uniformly among positions 1..n-1 (never ``<s>``; ``</s>`` may be chosen so that the
    model learns to stop). Of the chosen: 80 % -> ``mask_id``, 10 % -> a random id in
    [``FIRST_ORDINARY_ID``, mask_id), 10 % kept (:func:`beit3.tokenizers.masking.bert_corruption`).
    Returns ``text`` (corrupted ids), ``masked`` (bool) and ``labels`` (the original ids).
    """
    b, t = ids.shape
    valid = ~padding_mask.bool()
    n = valid.sum(dim=1)
    k = torch.clamp(torch.round(mask_prob * n.float()).long(), min=1)
    k = torch.minimum(k, n - 1)
    eligible = valid.clone()
    eligible[:, 0] = False
    noise = torch.rand(b, t, generator=generator)
    noise[~eligible] = 2.0  # never chosen: sorted last
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each position in a random order of eligibles
    masked = (rank < k[:, None]) & eligible
    to_mask, to_random = bert_corruption(torch.rand(b, t, generator=generator))
    random_ids = torch.randint(FIRST_ORDINARY_ID, mask_id, (b, t), generator=generator)
    text = torch.where(masked & to_mask, torch.full_like(ids, mask_id), ids)
    text = torch.where(masked & to_random, random_ids, text)
    return {"text": text, "masked": masked, "labels": ids}


def label_smoothed_loss(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float, reduce: bool = True
) -> torch.Tensor:
    """Mean KL divergence to the smoothed one-hot target (1 - eps on the label, eps / (C - 1) elsewhere);
    ``reduce=False``: per row (M,).

    Zero exactly when the predicted distribution equals the smoothed target.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    c = logits.shape[-1]
    on, off = 1.0 - smoothing, smoothing / (c - 1)
    target_logp = logp.gather(1, labels[:, None]).squeeze(1)
    cross = -(on * target_logp + off * (logp.sum(dim=-1) - target_logp))
    entropy = -(on * math.log(on) if on > 0 else 0.0) - (smoothing * math.log(off) if off > 0 else 0.0)
    per_row = cross - entropy
    return per_row.mean() if reduce else per_row


def drop_worst(losses: torch.Tensor, ratio: float) -> torch.Tensor:
    """The lowest ``int(M * (1 - ratio))`` (at least 1) of ``M`` per-token losses: the released captioning
    loss's "drop worst" (the hardest tokens of a batch, likely noisy captions, are left out)."""
    keep = max(1, int(losses.numel() * (1.0 - ratio)))
    return torch.topk(losses, keep, largest=False, sorted=False).values


class Captioning(FinetuneTask):
    """Masked finetuning of the seq2seq configuration; ``mlm_head`` is the pretrained MLM head (reused).

    Build the encoder with ``configuration="seq2seq"``.
    """

    configuration = "seq2seq"
    head_prefixes = ("mlm_head",)

    def __init__(
        self, encoder: BEiT3Model, label_smoothing: float = 0.1, optim: OptimSettings | None = None
    ) -> None:
        super().__init__(encoder, optim)
        if encoder.mlm_head is None:
            raise ValueError("the captioning task needs the mlm_head: build the encoder as 'seq2seq'")
        self.mlm_head = encoder.mlm_head
        self.label_smoothing = label_smoothing
        self.drop_worst_ratio, self.drop_worst_after = 0.0, 0

    def set_drop_worst(self, ratio: float, after: int) -> None:
        """From optimizer step ``after`` on (read from the batch's ``step``), the loss keeps the lowest
        (1 - ``ratio``) fraction of its per-token losses (recipe ``[captioning] drop_worst_*``)."""
        if not 0.0 <= ratio < 1.0 or after < 0:
            raise ValueError(f"drop_worst needs 0 <= ratio < 1 and after >= 0, got {ratio}, {after}")
        self.drop_worst_ratio, self.drop_worst_after = float(ratio), int(after)

    def hidden(
        self, image: torch.Tensor, text: torch.Tensor, text_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, D) caption-token states under the captioning attention mask."""
        nv = self.cfg.num_vision_tokens
        mask = captioning_attention_mask(nv, text.shape[1], text.device)
        x = self.beit3(image=image, text=text, text_padding_mask=text_padding_mask, attn_mask=mask)
        return x[:, nv:]

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        h = self.hidden(batch["image"], batch["text"], batch.get("text_padding_mask"))
        masked = batch["masked"]
        logits = self.mlm_head(h[masked])  # (M, V): logits only where a prediction is scored
        labels = batch["labels"][masked]
        losses = label_smoothed_loss(logits, labels, self.label_smoothing, reduce=False)
        if self.drop_worst_ratio:
            if "step" not in batch:
                raise ValueError("drop_worst needs the batch's step: BatchLoader(micro_batches_per_step=...)")
            if batch["step"] >= self.drop_worst_after:
                losses = drop_worst(losses, self.drop_worst_ratio)
        loss = losses.mean()
        acc = (logits.argmax(-1) == labels).float().mean().item()
        return loss, {"loss/caption": loss.detach(), "acc/masked_tokens": acc}

    def head_flops(self, batch: dict) -> float:
        """``mlm_head`` runs at the masked positions only."""
        return linear_flops(int(batch["masked"].sum()), self.cfg.embed_dim, self.cfg.vocab_size)


# ----- the task definition --------------------------------------------------------------------------------
def _build(b: BuildInputs) -> Captioning:
    task = Captioning(b.encoder, b.recipe.task.label_smoothing, b.optim)
    c = b.recipe.captioning
    if c.drop_worst_ratio:
        task.set_drop_worst(c.drop_worst_ratio, c.drop_worst_after)
    return task


def add_masking(batch: dict, examples: list[dict], collator, generator: torch.Generator) -> None:
    """Captioning's ``collate`` hook: the captions masked (:func:`mask_captions`, ``collator.mask_prob``)."""
    if collator.mask_id is None:
        raise BatchError("captioning batches need Collator(mask_id=tokenizer.mask_id)")
    batch.update(
        mask_captions(
            batch["text"], batch["text_padding_mask"], collator.mask_prob, collator.mask_id, generator
        )
    )


def _evaluate(ev) -> dict[str, float]:
    """BLEU-4, CIDEr-D (ROUGE-L with pycocoevalcap) of one beam-search caption per image."""
    return {f"eval/{k}": v for k, v in ev.caption_scores().items()}


def _predict(ev) -> tuple[list, dict]:
    """The COCO results list and, when references exist (``--references``, else the split's own captions),
    the COCO scores with the official toolkit where installed."""
    return ev.caption_results()


def _report(ev) -> dict:
    """A finished run's eval.json: generated and reference captions of the first 4 eval images."""
    return {"samples": ev.sample_captions(4)} if ev.split.examples else {}


SPEC = TaskSpec(
    name="captioning",
    configuration="seq2seq",
    final_norm=True,
    build=_build,
    selection=("eval/cider", "max"),
    evaluate=_evaluate,
    predict=_predict,
    report=_report,
    collate=add_masking,
    sections=("captioning",),
    batch_step=True,
    references=True,
)
