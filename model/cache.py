"""Key/value cache for incremental (autoregressive) decoding, e.g. captioning with beam search."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values of the tokens decoded so far, each (B, heads, S, head_dim).

    ``update`` appends the new step's keys/values and returns the full ones. Beam search uses
    ``reorder`` to follow surviving beams and ``truncate`` to forget trailing slots (the captioning
    recipe feeds ``[previous token, <mask>]`` each step and drops the ``<mask>`` slot afterwards).

    The model also records how many cached positions are image tokens (``num_vision``, always first) and
    text tokens (``num_text``), so that a text fed with a cache but without ``text_positions`` continues
    the text position table where the cached text stopped.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.num_vision = 0
        self.num_text = 0

    def advance(self, num_vision: int, num_text: int) -> None:
        """Count the tokens of a forward pass that has just been appended (called by the model)."""
        self.num_vision += num_vision
        self.num_text += num_text

    def __len__(self) -> int:
        """Number of cached positions."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search: the beams that survive this step)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i] = k.index_select(0, index)
                self.values[i] = v.index_select(0, index)

    def truncate(self, length: int) -> None:
        """Forget every cached position from ``length`` on."""
        self.num_vision = min(self.num_vision, length)
        self.num_text = max(0, min(self.num_text, length - self.num_vision))
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i] = k[:, :, :length]
                self.values[i] = v[:, :, :length]
