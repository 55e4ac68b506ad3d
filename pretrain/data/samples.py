"""Raw samples -> augmented, masked tensors of the three kinds, and their collation into sub-batches.

Masking (paper §2.2-2.3): texts mask ``text_mask_ratio`` (15%) of their tokens BERT-style (80% ``<mask>``,
10% random piece, 10% unchanged); images mask ``image_mask_ratio`` (40%) of their patches block-wise; pairs
mask ``pair_text_mask_ratio`` (50%) of their text and/or ``pair_image_mask_ratio`` (40%) of their image,
either one of the two per pair (``pair_masking="separate"``, image with probability
``pair_image_mask_prob``) or both (``"joint"``). ``<s>``, ``</s>``, ``<pad>`` (and ``<unk>``) are never
masked. Labels are -100 except at masked text positions.
"""

from __future__ import annotations

import numpy as np
import torch

from beit3.pretrain.data.config import PretrainDataConfig
from beit3.pretrain.data.decode import SkipSample, decode_image, decode_text, image_field, text_field
from beit3.pretrain.data.tario import RawSample
from beit3.pretrain.data.transforms import TwoViewTransform
from beit3.tokenizers.masking import (
    IGNORE_INDEX,
    BlockMaskingGenerator,
    bert_mask_tokens,
    num_masking_patches,
)
from beit3.tokenizers.text import FIRST_ORDINARY_ID  # random replacements come from ordinary pieces


class SampleProcessor:
    """Turns one raw sample of a stream into a dict of tensors, drawing all randomness from ``rng``."""

    def __init__(self, cfg: PretrainDataConfig, tokenizer) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.transform = TwoViewTransform(
            cfg.img_size,
            cfg.tokenizer_img_size,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
            crop_scale=tuple(cfg.crop_scale),
            crop_ratio=tuple(cfg.crop_ratio),
            hflip=cfg.hflip,
            color_jitter=cfg.color_jitter,
        )
        grid = (cfg.grid_size, cfg.grid_size)
        self.num_patches = grid[0] * grid[1]
        self.image_masker = self._masker(grid, cfg.image_mask_ratio)
        self.pair_image_masker = self._masker(grid, cfg.pair_image_mask_ratio)

    def _masker(self, grid: tuple[int, int], ratio: float) -> BlockMaskingGenerator | None:
        n = num_masking_patches(grid, ratio)
        return BlockMaskingGenerator(grid, n, min_num_patches=self.cfg.min_num_patches) if n else None

    # ---- pieces -----------------------------------------------------------------------------------
    def _views(self, raw: RawSample, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        img = decode_image(image_field(raw.fields), self.cfg.max_image_pixels)
        return self.transform.arrays(img, rng)

    def _patch_mask(self, masker: BlockMaskingGenerator | None, rng: np.random.Generator) -> np.ndarray:
        if masker is None:
            return np.zeros(self.num_patches, dtype=bool)
        return masker(rng).reshape(-1)

    def _tokens(self, text: str, max_len: int) -> np.ndarray:
        ids = self.tokenizer.encode(text)[: max_len - 2]
        if not ids:  # e.g. only zero-width or control characters: a row of <s> </s> teaches nothing
            raise SkipSample("text_no_tokens", f"{text[:40]!r}")
        return np.asarray([self.tokenizer.bos_id, *ids, self.tokenizer.eos_id], dtype=np.int64)

    def _mask_text(
        self, ids: np.ndarray, ratio: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if ratio <= 0:
            return ids, np.full_like(ids, IGNORE_INDEX)
        tok = self.tokenizer
        masked, labels = bert_mask_tokens(
            ids[None], None, ratio, tok.mask_id, FIRST_ORDINARY_ID, tok.mask_id, tok.special_ids, rng
        )
        return masked[0], labels[0]

    # ---- the three kinds ----------------------------------------------------------------------------
    def image(self, raw: RawSample, rng: np.random.Generator) -> dict:
        """An image sample: both views and a block mask."""
        image, tok = self._views(raw, rng)
        return {
            "image": image,
            "tokenizer_image": tok,
            "image_mask": self._patch_mask(self.image_masker, rng),
        }

    def text(self, raw: RawSample, rng: np.random.Generator) -> dict:
        """A text segment: ``<s> ids </s>`` with BERT masking."""
        ids = self._tokens(decode_text(text_field(raw.fields)), self.cfg.text_max_len)
        masked, labels = self._mask_text(ids, self.cfg.text_mask_ratio, rng)
        return {"text": masked, "text_labels": labels}

    def pair(self, raw: RawSample, rng: np.random.Generator) -> dict:
        """An image-text pair: image and/or text masked according to ``pair_masking``."""
        # The text first: the cheaper checks (its tokens draw nothing from rng, so the order is free).
        ids = self._tokens(decode_text(text_field(raw.fields)), self.cfg.pair_text_max_len)
        image, tok = self._views(raw, rng)
        if self.cfg.pair_masking == "joint":
            mask_image = mask_text = True
        else:
            mask_image = bool(rng.random() < self.cfg.pair_image_mask_prob)
            mask_text = not mask_image
        image_mask = self._patch_mask(self.pair_image_masker if mask_image else None, rng)
        masked, labels = self._mask_text(ids, self.cfg.pair_text_mask_ratio if mask_text else 0.0, rng)
        return {
            "image": image,
            "tokenizer_image": tok,
            "image_mask": image_mask,
            "text": masked,
            "text_labels": labels,
        }


def collate(samples: list[dict], text_len: int | None, pad_id: int) -> dict:
    """Stack per-sample dicts; texts right-padded with ``pad_id`` to ``text_len`` (None: the longest)."""
    out = {}
    if "key" in samples[0]:
        out["keys"] = [s["key"] for s in samples]
    for key in ("image", "tokenizer_image", "image_mask"):
        if key in samples[0]:
            out[key] = torch.from_numpy(np.stack([s[key] for s in samples]))
    if "text" in samples[0]:
        length = text_len or max(len(s["text"]) for s in samples)
        ids = np.full((len(samples), length), pad_id, dtype=np.int64)
        labels = np.full((len(samples), length), IGNORE_INDEX, dtype=np.int64)
        pad = np.ones((len(samples), length), dtype=bool)
        for i, s in enumerate(samples):
            n = len(s["text"])
            ids[i, :n], labels[i, :n], pad[i, :n] = s["text"], s["text_labels"], False
        out["text"] = torch.from_numpy(ids)
        out["text_padding_mask"] = torch.from_numpy(pad)
        out["text_labels"] = torch.from_numpy(labels)
    return out
