"""The image-text contrastive (ITC) stage: the dual encoder tuned on the pretraining pairs, with the whole
global batch (every rank, every micro-batch of the optimizer step) as negatives.

The released retrieval models start from this intermediate tuning (paper App. A: 5 epochs on the pretraining
pairs, batch 16k). The task module is the retrieval dual encoder
(:class:`~beit3.finetune.tasks.retrieval.Retrieval`: the same heads and keys, so its ``model.pth`` is the
retrieval recipes' ``model.pretrained``) and its loss is retrieval's symmetric InfoNCE over features gathered
from every rank with gradient (:func:`~beit3.finetune.tasks.retrieval.contrastive_loss`).

**Gradient caching** (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"). With gradient accumulation the engine runs a step's k micro-batches one after another, forward and
backward each, and optimises the mean of their losses (DeepSpeed divides each micro-batch's loss by k). A
contrastive loss of each micro-batch alone would see k times fewer negatives. So the training stream
(:mod:`beit3.finetune.data.pair_stream`) hands every micro-batch of a step the step's whole group
(:data:`GROUP`, with its position :data:`MICRO`); at the first one the task

1. encodes every micro-batch of the group without gradient (recording the RNG state before each: drop path),
2. computes the loss over the group's features, gathered from every rank (world * k * b candidates), and its
   gradient with respect to each local feature and the logit scale (``torch.autograd.grad``; the gather's
   backward adds the other ranks' terms);

and at each micro-batch j it encodes micro-batch j again with gradient (the RNG state replayed, so the
features are the cached ones) and returns ``loss + s - s.detach()`` with the surrogate
``s = k * <features_j, cached gradient_j> + logit_scale * its cached gradient``: the value is the step's
loss, and the k backwards (each divided by k) add up to the gradient of the loss over the global batch. The
memory is one micro-batch's activations plus the group's features; the cost is one extra forward per
micro-batch (``recompute_flops``). Without accumulation (k = 1) batches carry no group and the loss is
retrieval's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from beit3.finetune.tasks.base import OptimSettings
from beit3.finetune.tasks.retrieval import SPEC as RETRIEVAL
from beit3.finetune.tasks.retrieval import Retrieval, contrastive_loss
from beit3.finetune.tasks.spec import BuildInputs, TaskSpec
from beit3.model import BEiT3Model
from beit3.model.flops import encoder_flops, linear_flops, patch_embed_flops

GROUP = "step_group"  # the optimizer step's micro-batches (list of {"image", "text", "text_padding_mask"})
MICRO = "micro_step"  # this micro-batch's position in the group
INPUTS = ("image", "text", "text_padding_mask")


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class _StepCache:
    """What the first micro-batch of a step computes for all of them."""

    group: list  # the step's micro-batches (identity: the cache belongs to this group)
    loss: torch.Tensor  # the loss over the global batch, as computed on this rank (detached)
    metrics: dict
    image_grads: list[torch.Tensor]  # d loss / d image features, per micro-batch (b, D)
    text_grads: list[torch.Tensor]
    scale_grad: torch.Tensor  # d loss / d logit_scale
    rng: list[tuple]  # the RNG state before each micro-batch's encoding


class Contrastive(Retrieval):
    """The retrieval dual encoder trained with negatives from the global batch (gradient caching above)."""

    def __init__(self, encoder: BEiT3Model, optim: OptimSettings | None = None, pooling: str = "cls") -> None:
        super().__init__(encoder, optim, pooling)
        self._cache: _StepCache | None = None  # the current step's, between its micro-batches

    def prepare_batch(self, batch: dict, device: torch.device | str) -> dict:
        """A grouped micro-batch: the group is moved to ``device`` once, at its first micro-batch (the
        group list is shared by its micro-batches); the batch's own tensors are the group's entry."""
        group = batch.get(GROUP)
        if group is None:
            return super().prepare_batch(batch, device)
        if group[0]["image"].device != torch.device(device):
            group[:] = [super(Contrastive, self).prepare_batch(mb, device) for mb in group]
        return {**group[batch[MICRO]], MICRO: batch[MICRO], GROUP: group}

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        group = batch.get(GROUP)
        if group is None:
            loss, metrics = super().forward(batch)
            return loss, {**metrics, "itc/negatives": float(_negatives(batch["text"].shape[0]))}
        cache = self._cache
        if cache is None or cache.group is not group:
            cache = self._cache = self._step_cache(group)
        j, k = batch[MICRO], len(group)
        # The RNG as before this micro-batch's cached encoding (drop path): the same features again. After
        # the last one the RNG is where the cached encodings left it.
        _set_rng_state(cache.rng[j], batch["image"].device)
        img = self.embed_images(batch["image"])
        txt = self.embed_texts(batch["text"], batch.get("text_padding_mask"))
        surrogate = k * (
            (img.float() * cache.image_grads[j]).sum() + (txt.float() * cache.text_grads[j]).sum()
        )
        surrogate = surrogate + (self.logit_scale.float() * cache.scale_grad).sum()
        if j == k - 1:
            self._cache = None  # the step is done: free the group and its gradients
        return cache.loss + (surrogate - surrogate.detach()), dict(cache.metrics)

    def _step_cache(self, group: list[dict]) -> _StepCache:
        """Encode every micro-batch of the step without gradient, then the loss over them all (gathered
        over ranks) and its gradient with respect to each feature and the logit scale."""
        device = group[0]["image"].device
        rng, images, texts = [], [], []
        with torch.no_grad():
            for mb in group:
                rng.append(_rng_state(device))
                images.append(self.embed_images(mb["image"]).float())
                texts.append(self.embed_texts(mb["text"], mb.get("text_padding_mask")).float())
        sizes = [t.shape[0] for t in texts]
        all_images = torch.cat(images).requires_grad_()
        all_texts = torch.cat(texts).requires_grad_()
        scale = self.logit_scale.detach().float().requires_grad_()
        with torch.enable_grad():
            loss, metrics = contrastive_loss(all_images, all_texts, scale)
            image_grad, text_grad, scale_grad = torch.autograd.grad(loss, (all_images, all_texts, scale))
        metrics["itc/negatives"] = float(_negatives(all_texts.shape[0]))
        return _StepCache(group, loss.detach(), metrics, list(image_grad.split(sizes)),
                          list(text_grad.split(sizes)), scale_grad, rng)  # fmt: skip

    def batch_stats(self, batch: dict) -> dict:
        """Retrieval's, and with a group the cache's encoding of the micro-batch without gradient as
        ``recompute_flops``: the forward of its passes (a third of the encoder's training FLOPs, 2 of 6 per
        multiply-add; half of the patch projection's, 2 of 4) and of the two heads (2 of 6)."""
        stats = super().batch_stats(batch)
        if GROUP in batch:
            cfg, passes = self.cfg, self.passes(batch)
            heads = sum(
                linear_flops(batch[k].shape[0], cfg.embed_dim, cfg.embed_dim) for k in ("image", "text")
            )
            encoder = sum(encoder_flops(cfg, p.samples, p.seq_len(cfg)) for p in passes)
            patches = sum(patch_embed_flops(cfg, p.samples) for p in passes if p.image)
            stats["recompute_flops"] = (encoder + heads) / 3 + patches / 2
        return stats

    def head_flops(self, batch: dict) -> float:
        """Retrieval's, the similarities taken against the whole group's pairs of every rank."""
        flops = super().head_flops(batch)
        if GROUP in batch:  # retrieval's counts the micro-batch's own world * b columns
            b, others = batch["text"].shape[0], _negatives(batch["text"].shape[0]) * (len(batch[GROUP]) - 1)
            flops += 2 * linear_flops(b, self.cfg.embed_dim, others)
        return flops


def _negatives(local_rows: int) -> int:
    """Candidates each image (and text) is contrasted with: the rows of every rank."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return world * local_rows


# ----- the task definition --------------------------------------------------------------------------------
def _build(b: BuildInputs) -> Contrastive:
    return Contrastive(b.encoder, b.optim, b.recipe.task.pooling)


SPEC = TaskSpec(
    name="contrastive",
    configuration="dual",
    final_norm=True,
    build=_build,
    selection=RETRIEVAL.selection,  # zero-shot retrieval on the held-out pairs: eval/average
    evaluate=RETRIEVAL.evaluate,
    pair_stream=True,
    pooling=True,
)
