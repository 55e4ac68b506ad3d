"""Synthetic mixed micro-batches with the data pipeline's batch contract, for benchmarks and tests.

Imported by ``bench/train_step.py`` and the tests (``tests/test_flops.py``) with ``bench/`` on ``sys.path``.

Random images, random token ids and masks drawn at the recipe's ratios: never zeros (timing on zeros
flatters some kernels), and no data loader in the way.
"""

from __future__ import annotations

import math

import torch

from beit3.model.config import ModelConfig
from beit3.tokenizers.ids import BOS_ID, EOS_ID, FIRST_ORDINARY_ID, UNK_ID


def synthetic_batch(
    cfg: ModelConfig,
    images: int,
    texts: int,
    pairs: int,
    text_len: int = 64,
    pair_text_len: int = 40,
    image_mask_ratio: float = 0.4,
    text_mask_ratio: float = 0.15,
    pair_text_mask_ratio: float = 0.5,
    seed: int = 0,
    with_codes: bool = True,
    exact_text_masks: bool = False,
) -> dict:
    """A batch like ``beit3.pretrain.data`` yields, already tokenized (``image_codes`` instead of views).

    Text positions are chosen with probability ``ratio`` each (position 1 always); ``exact_text_masks``: as
    the data pipeline chooses them (``tokenizers.masking.bert_mask_tokens``), ``round(ratio * n)`` of the
    ``n`` positions between BOS and EOS in every row, so that each row has the pipeline's count."""
    g = torch.Generator().manual_seed(seed)
    np_ = cfg.num_patches

    def image_part(n: int, ratio: float) -> dict:
        img = torch.rand(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g) * 2 - 1
        k = int(round(ratio * np_))
        order = torch.rand(n, np_, generator=g).argsort(dim=1)
        mask = torch.zeros(n, np_, dtype=torch.bool)
        mask.scatter_(1, order[:, :k], True)
        out = {"image": img, "image_mask": mask}
        if with_codes:
            out["image_codes"] = torch.randint(0, cfg.visual_vocab_size, (n, np_), generator=g)
        return out

    def text_part(n: int, length: int, ratio: float) -> dict:
        ids = torch.randint(FIRST_ORDINARY_ID, min(cfg.vocab_size, 64000), (n, length), generator=g)
        ids[:, 0], ids[:, -1] = BOS_ID, EOS_ID
        if exact_text_masks:
            k = max(1, int(math.floor(ratio * (length - 2) + 0.5)))
            order = torch.rand(n, length - 2, generator=g).argsort(dim=1)[:, :k] + 1
            chosen = torch.zeros(n, length, dtype=torch.bool).scatter_(1, order, True)
        else:
            chosen = torch.rand(n, length, generator=g) < ratio
            chosen[:, 0] = chosen[:, -1] = False
            chosen[:, 1] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        masked = torch.where(chosen, torch.full_like(ids, UNK_ID), ids)  # any id stands in for <mask>
        return {
            "text": masked,
            "text_padding_mask": torch.zeros(n, length, dtype=torch.bool),
            "text_labels": labels,
        }

    batch = {}
    if images:
        batch["image"] = image_part(images, image_mask_ratio)
    if texts:
        batch["text"] = text_part(texts, text_len, text_mask_ratio)
    if pairs:
        batch["pair"] = {
            **image_part(pairs, image_mask_ratio),
            **text_part(pairs, pair_text_len, pair_text_mask_ratio),
        }
    return batch
