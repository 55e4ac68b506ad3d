"""Masks for masked data modeling: block-wise image masks (BEiT v2) and BERT-style text masking.

Both are pure functions of their inputs and a ``numpy.random.Generator``, so a seeded generator gives the
same mask in every process and tests need no model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from beit3.tokenizers.errors import TokenizersError

# numpy is imported inside the functions that use it: the torch-only parts (bert_corruption, the token
# shares) are imported by bench/gpu_giant.py on machines with torch alone.
if TYPE_CHECKING:
    import numpy as np

IGNORE_INDEX = -100  # label of positions that carry no loss (torch cross-entropy's default ignore_index)
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # BERT's corruption of chosen tokens; the remaining 0.1 stays unchanged


class MaskingError(TokenizersError, ValueError):
    """Masking parameters that cannot be satisfied; the message names the fix."""


def num_masking_patches(grid: tuple[int, int], ratio: float = 0.4) -> int:
    """Patches to mask on ``grid`` at ``ratio``, rounded half up (40% of 14x14 -> 78, of 16x16 -> 102)."""
    if not 0.0 <= ratio <= 1.0:
        raise MaskingError(f"mask ratio {ratio} is outside [0, 1]")
    return int(math.floor(ratio * grid[0] * grid[1] + 0.5))


class BlockMaskingGenerator:
    """Block-wise masking of a patch grid (BEiT §2, as corrected in BEiT v2 to an exact count).

    Rectangular blocks are added until ``num_masking_patches`` cells are masked. Each block tries up to 10
    times: area ~ U[min_num_patches, min(remaining, max_num_patches)], log-aspect ~ U[log min_aspect,
    log max_aspect], height/width rounded from them and strictly smaller than the grid, a random top-left,
    accepted if it masks between 1 and ``remaining`` new cells. When no block makes progress, or a block
    overshoots, the mask is corrected to exactly ``num_masking_patches`` by masking or unmasking random
    cells (BEiT v2's behaviour; BEiT v1 let the count vary).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        num_masking_patches: int,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = int(grid[0]), int(grid[1])
        if self.height < 1 or self.width < 1:
            raise MaskingError(f"grid {grid} is empty")
        if not 0 <= num_masking_patches <= self.height * self.width:
            raise MaskingError(
                f"num_masking_patches={num_masking_patches} is outside [0, {self.height * self.width}] "
                f"for grid {grid}"
            )
        if min_aspect <= 0:
            raise MaskingError(f"min_aspect={min_aspect} must be positive")
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(num_masking_patches if max_num_patches is None else max_num_patches)
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    @property
    def grid(self) -> tuple[int, int]:
        """(H, W) of the masks produced."""
        return self.height, self.width

    def __repr__(self) -> str:
        return (
            f"BlockMaskingGenerator(grid={self.grid}, num_masking_patches={self.num_masking_patches}, "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"aspect=({math.exp(self.log_aspect[0]):.3f}, {math.exp(self.log_aspect[1]):.3f}))"
        )

    def _add_block(self, mask: np.ndarray, max_new: int, rng: np.random.Generator) -> int:
        """Try up to 10 random blocks; return the number of newly masked cells of the first accepted one."""
        lo, hi = sorted((float(self.min_num_patches), float(max_new)))
        for _ in range(10):
            area = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= max_new:
                block[:] = True
                return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """A bool mask (H, W), True = masked, with exactly ``num_masking_patches`` True cells."""
        import numpy as np

        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            max_new = min(self.num_masking_patches - count, self.max_num_patches)
            new = self._add_block(mask, max_new, rng)
            if new == 0:
                break
            count += new
        flat = mask.reshape(-1)  # a view: edits below change ``mask``
        if count > self.num_masking_patches:
            on = np.flatnonzero(flat)
            flat[rng.choice(on, count - self.num_masking_patches, replace=False)] = False
        elif count < self.num_masking_patches:
            off = np.flatnonzero(~flat)
            flat[rng.choice(off, self.num_masking_patches - count, replace=False)] = True
        return mask


def bert_corruption(action):
    """BERT's 80/10/10 rule: ``(to_mask, to_random)`` selections from uniform draws in [0, 1), one per chosen
    token; draws below 0.8 become ``<mask>``, those in [0.8, 0.9) a random ordinary id, the rest stay.

    Works on numpy arrays and torch tensors alike (element-wise comparisons), so both the pretraining data
    (numpy generators) and caption masking (torch generators) apply the one rule.
    """
    to_mask = action < MASK_SHARE
    return to_mask, ~to_mask & (action < MASK_SHARE + RANDOM_SHARE)


def bert_mask_tokens(
    ids: np.ndarray | torch.Tensor,
    padding_mask: np.ndarray | torch.Tensor | None,
    ratio: float,
    mask_id: int,
    vocab_low: int,
    vocab_high: int,
    special_ids: frozenset[int] | set[int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a batch of token ids (B, L); returns ``(masked_ids, labels)`` of the input's type.

    Per row, ``round(ratio * n)`` (half up, at least 1) of the ``n`` positions that are neither padding
    (``padding_mask`` True) nor in ``special_ids`` are chosen uniformly without replacement. Each chosen
    token independently becomes ``mask_id`` with probability 0.8, a random id from ``[vocab_low,
    vocab_high)`` with 0.1, or stays unchanged with 0.1 (:func:`bert_corruption`). ``labels`` hold the
    original id at chosen positions and -100 elsewhere. Rows without a candidate position get no labels.
    Computation is in numpy; torch inputs come back as torch tensors (int64), numpy inputs as numpy arrays.
    """
    import numpy as np

    if not 0.0 < ratio <= 1.0:
        raise MaskingError(f"text mask ratio {ratio} is outside (0, 1]")
    if vocab_high <= vocab_low:
        raise MaskingError(f"empty random-token range [{vocab_low}, {vocab_high})")
    is_torch = torch.is_tensor(ids)
    arr = np.array(ids.cpu().numpy() if is_torch else ids, dtype=np.int64, copy=True)
    if arr.ndim != 2:
        raise MaskingError(f"ids must be (B, L), got shape {arr.shape}")
    if padding_mask is None:
        pad = np.zeros_like(arr, dtype=bool)
    else:
        pad = np.asarray(
            padding_mask.cpu().numpy() if torch.is_tensor(padding_mask) else padding_mask, dtype=bool
        )
    candidates = ~pad & ~np.isin(arr, np.fromiter(special_ids, dtype=np.int64, count=len(special_ids)))
    labels = np.full_like(arr, IGNORE_INDEX)
    for row in range(arr.shape[0]):
        positions = np.flatnonzero(candidates[row])
        if positions.size == 0:
            continue
        k = max(1, int(math.floor(ratio * positions.size + 0.5)))
        chosen = rng.choice(positions, k, replace=False)
        labels[row, chosen] = arr[row, chosen]
        to_mask, to_random = bert_corruption(rng.random(k))
        arr[row, chosen[to_mask]] = mask_id
        arr[row, chosen[to_random]] = rng.integers(vocab_low, vocab_high, size=int(to_random.sum()))
    if is_torch:
        return torch.from_numpy(arr), torch.from_numpy(labels)
    return arr, labels
