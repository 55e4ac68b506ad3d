"""Block-wise image masking (BEiT v2) and BERT text masking: exact counts, shapes, determinism, statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from beit3.tokenizers.masking import (
    IGNORE_INDEX,
    BlockMaskingGenerator,
    MaskingError,
    bert_corruption,
    bert_mask_tokens,
    num_masking_patches,
)


def test_num_masking_patches_rounds_half_up():
    assert num_masking_patches((14, 14), 0.4) == 78
    assert num_masking_patches((16, 16), 0.4) == 102
    assert num_masking_patches((2, 2), 0.125) == 1  # 0.5 rounds up
    with pytest.raises(MaskingError):
        num_masking_patches((14, 14), 1.5)


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (4, 4), (7, 12)])
def test_block_mask_has_exact_count_on_any_grid(grid):
    n = num_masking_patches(grid, 0.4)
    gen = BlockMaskingGenerator(grid, n, min_num_patches=min(16, n))
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = gen(rng)
        assert mask.shape == grid and mask.dtype == bool and mask.sum() == n


def test_default_min_block_larger_than_target_still_gives_exact_count():
    # The 64 px demo models have a 4x4 grid: 40% is 6 patches, below the default 16-patch minimum block.
    gen = BlockMaskingGenerator((4, 4), num_masking_patches((4, 4), 0.4))
    rng = np.random.default_rng(0)
    masks = [gen(rng) for _ in range(200)]
    assert all(m.sum() == 6 for m in masks)
    assert len({m.tobytes() for m in masks}) > 20  # still random


def test_same_seed_same_mask_and_different_seeds_differ():
    gen = BlockMaskingGenerator((14, 14), 78)
    a = gen(np.random.default_rng(7))
    b = gen(np.random.default_rng(7))
    c = gen(np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected regions of True cells."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        while stack:
            r, c = stack.pop()
            if not (0 <= r < mask.shape[0] and 0 <= c < mask.shape[1]) or seen[r, c] or not mask[r, c]:
                continue
            seen[r, c] = True
            stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    return count


def test_masks_are_blocks_not_scattered_cells():
    # With min block area 16 the mask is a few large connected regions; random cells would form dozens.
    gen = BlockMaskingGenerator((14, 14), 78)
    rng = np.random.default_rng(1)
    components = [_components(gen(rng)) for _ in range(100)]
    assert np.mean(components) < 6
    scattered = np.zeros(196, dtype=bool)
    scattered[rng.choice(196, 78, replace=False)] = True
    assert _components(scattered.reshape(14, 14)) > 10


def test_single_blocks_respect_area_and_aspect_bounds():
    # With the target equal to one block's maximum, the first block alone is a rectangle obeying the bounds.
    gen = BlockMaskingGenerator((14, 14), 40, min_num_patches=16, max_num_patches=40, min_aspect=0.3)
    rng = np.random.default_rng(3)
    for _ in range(300):
        mask = np.zeros((14, 14), dtype=bool)
        new = gen._add_block(mask, 40, rng)
        if new == 0:
            continue
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        h, w = rows.size, cols.size
        assert mask.sum() == h * w == new  # one filled rectangle
        assert h < 14 and w < 14
        assert new <= 40
        # Rounding sqrt(area * aspect) moves each side by at most 0.5.
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / max(w - 0.5, 1e-9) >= 0.3
        assert (h + 0.5) * (w + 0.5) >= 16


def test_mask_covers_every_cell_over_many_draws():
    gen = BlockMaskingGenerator((16, 16), 102)
    rng = np.random.default_rng(0)
    freq = np.mean([gen(rng) for _ in range(500)], axis=0)
    # Corners are covered less (blocks are smaller than the grid) but every cell is reachable.
    assert freq.min() > 0.02 and abs(freq.mean() - 102 / 256) < 1e-9


def test_generator_rejects_impossible_counts():
    with pytest.raises(MaskingError, match="outside"):
        BlockMaskingGenerator((4, 4), 17)


# ---- BERT text masking ----------------------------------------------------------------------------------

SPECIALS = frozenset({0, 1, 2, 3, 999})
MASK = 999


def _batch(rows=64, length=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 999, size=(rows, length))
    lengths = rng.integers(5, length + 1, size=rows)
    pad = np.arange(length)[None] >= lengths[:, None]
    ids[:, 0] = 0
    ids[np.arange(rows), lengths - 1] = 2
    ids[pad] = 1
    return ids, pad, lengths


def test_bert_masking_chooses_exact_count_of_ordinary_tokens():
    ids, pad, lengths = _batch()
    masked, labels = bert_mask_tokens(ids, pad, 0.15, MASK, 4, 999, SPECIALS, np.random.default_rng(0))
    chosen = labels != IGNORE_INDEX
    n = lengths - 2  # bos and eos are special
    assert chosen.sum(1).tolist() == [max(1, math.floor(0.15 * k + 0.5)) for k in n]
    assert (
        not chosen[pad].any()
        and not chosen[:, 0].any()
        and not chosen[np.arange(len(ids)), lengths - 1].any()
    )
    assert np.array_equal(labels[chosen], ids[chosen])
    assert np.array_equal(masked[~chosen], ids[~chosen])


def test_bert_masking_is_80_10_10():
    ids, pad, _ = _batch(rows=2000, length=64)
    masked, labels = bert_mask_tokens(ids, pad, 0.5, MASK, 4, 999, SPECIALS, np.random.default_rng(1))
    chosen = labels != IGNORE_INDEX
    new, old = masked[chosen], ids[chosen]
    total = chosen.sum()
    frac_mask = (new == MASK).mean()
    frac_same = (new == old).mean()
    frac_random = ((new != MASK) & (new != old)).mean()
    # Binomial standard error at n ~ 30k is ~0.002: these bounds are ~5 sigma.
    assert total > 20_000
    assert abs(frac_mask - 0.8) < 0.01
    assert abs(frac_same - (0.1 + 0.1 / 995)) < 0.01
    assert abs(frac_random - 0.1 * 994 / 995) < 0.01
    replaced = new[(new != MASK) & (new != old)]
    assert replaced.min() >= 4 and replaced.max() < 999


def test_bert_masking_torch_in_torch_out_and_deterministic():
    ids, pad, _ = _batch()
    t_ids, t_pad = torch.from_numpy(ids), torch.from_numpy(pad)
    m1, l1 = bert_mask_tokens(t_ids, t_pad, 0.15, MASK, 4, 999, SPECIALS, np.random.default_rng(5))
    m2, l2 = bert_mask_tokens(ids, pad, 0.15, MASK, 4, 999, SPECIALS, np.random.default_rng(5))
    assert isinstance(m1, torch.Tensor) and m1.dtype == torch.long and l1.dtype == torch.long
    assert np.array_equal(m1.numpy(), m2) and np.array_equal(l1.numpy(), l2)
    assert torch.equal(t_ids, torch.from_numpy(ids))  # input untouched


def test_bert_masking_at_least_one_and_empty_rows():
    ids = np.array([[0, 10, 2, 1], [0, 2, 1, 1]])
    pad = ids == 1
    masked, labels = bert_mask_tokens(ids, pad, 0.15, MASK, 4, 999, SPECIALS, np.random.default_rng(0))
    assert labels[0].tolist() == [IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX]
    assert (labels[1] == IGNORE_INDEX).all() and np.array_equal(masked[1], ids[1])


def test_bert_masking_rejects_bad_ratio():
    ids, pad, _ = _batch(rows=2)
    with pytest.raises(MaskingError, match="ratio"):
        bert_mask_tokens(ids, pad, 0.0, MASK, 4, 999, SPECIALS, np.random.default_rng(0))


def test_bert_corruption_is_one_rule_for_numpy_and_torch():
    action = np.array([0.0, 0.79, 0.8, 0.85, 0.9, 0.99])
    for draws in (action, torch.from_numpy(action)):
        to_mask, to_random = bert_corruption(draws)
        assert list(map(bool, to_mask)) == [True, True, False, False, False, False]
        assert list(map(bool, to_random)) == [False, False, True, True, False, False]
