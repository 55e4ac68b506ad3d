"""Architecture configuration of the Multiway Transformer: a frozen dataclass, validated on creation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from beit3.model.errors import ModelError

# What activation checkpointing recomputes of each chosen layer: all of it, or only its attention branch
# (pre-LN, q/k/v, attention, output projection) or its FFN branch (final LN, FFN experts).
CHECKPOINT_PARTS = ("layer", "attention", "ffn")

LAYOUTS = ("released", "paper")
INITS = ("beit", "magneto")


class ModelConfigError(ModelError, ValueError):
    """An architecture configuration that cannot be built."""


@dataclass(frozen=True)
class ModelConfig:
    """Every architecture hyperparameter of a BEiT-3 model.

    ``layout`` selects between the two designs that share one code path:

    * ``"released"``: the decoupled Multiway Transformer of the released checkpoints: separate vision and
      language Q/K/V/O projections and attention LayerNorms, no vision-language experts.
    * ``"paper"``: the paper's design: one shared self-attention module, vision and language FFN experts in
      every layer and vision-language FFN experts in the top ``vl_expert_layers`` layers.
    """

    layout: str = "released"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010  # text embedding rows (64002 used by the XLM-R style tokenizer, 8 spare)
    max_text_positions: int = 1024  # rows of the text position table; indices start at 2
    visual_vocab_size: int = 8192  # VQ-KD codebook size, output size of the MIM head
    vl_expert_layers: int = 0  # top layers with a vision-language FFN expert (paper layout only)
    subln: bool = True  # Magneto Sub-LN inside attention (before out_proj) and the FFN (before fc2)
    normalize_output: bool = True  # final per-modality LayerNorm
    layernorm_eps: float = 1e-5
    drop_path_rate: float = 0.0
    init: str = "beit"
    pretraining_heads: bool = True  # mlm_head and mim_head, as stored in released pretrained checkpoints

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ModelConfigError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.init not in INITS:
            raise ModelConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.embed_dim % self.num_heads:
            raise ModelConfigError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.img_size % self.patch_size:
            raise ModelConfigError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        if not 0 <= self.vl_expert_layers <= self.depth:
            raise ModelConfigError(f"vl_expert_layers must lie in [0, depth={self.depth}]")
        if self.layout == "released" and self.vl_expert_layers:
            raise ModelConfigError(
                "the released layout has no vision-language experts: set vl_expert_layers=0 or layout='paper'"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ModelConfigError("drop_path_rate must lie in [0, 1)")
        for name in ("embed_dim", "depth", "num_heads", "ffn_dim", "vocab_size", "max_text_positions"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"{name} must be positive")
        if self.max_text_positions < 3:
            raise ModelConfigError("max_text_positions must be at least 3 (indices start at 2)")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_vision_tokens(self) -> int:
        """Patches plus the vision CLS token."""
        return self.num_patches + 1

    @property
    def max_text_len(self) -> int:
        """Longest text the position table can hold (two rows are never used, as in the release)."""
        return self.max_text_positions - 2

    @property
    def decoupled_attention(self) -> bool:
        return self.layout == "released"

    def replace(self, **overrides) -> ModelConfig:
        """A copy with some fields changed; unknown field names raise ModelConfigError."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ModelConfigError(f"unknown model config field(s) {unknown}; known: {sorted(fields)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        """Every field as a plain value (JSON and weights-only pickle); :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """The config :meth:`to_dict` wrote (config.json's ``"model"``, an export's ``"config"``), validated.

        An unknown field or a value of the wrong type raises ModelConfigError; a missing field takes its
        default (a record written before the field existed).
        """
        if not isinstance(data, dict):
            raise ModelConfigError(f"a model config is a mapping of its fields, got {type(data).__name__}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise ModelConfigError(f"unknown model config field(s) {unknown}; known: {sorted(types)}")
        for name, value in data.items():
            want = _FIELD_TYPES[types[name]]
            if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
                raise ModelConfigError(f"model config field {name}={value!r} is not of type {types[name]}")
        return cls(**data)


# ``from_dict``'s type check, by annotation (an int is a valid float; a bool is no int).
_FIELD_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool}

# The fields that fix a model's parameters and computation: weights trained under one value do not fit
# another. The others may differ between a pretrained file and the model it is loaded into: resolution
# (positions are interpolated), table sizes (taken from the file's shapes), regularisation, initialisation,
# and which heads and final LayerNorm a task keeps.
ARCHITECTURE_FIELDS = (
    "layout",
    "embed_dim",
    "depth",
    "num_heads",
    "ffn_dim",
    "patch_size",
    "in_chans",
    "vl_expert_layers",
    "subln",
    "layernorm_eps",
)


def architecture_differences(a: ModelConfig, b: ModelConfig) -> dict[str, tuple]:
    """``{field: (a's value, b's value)}`` for each of :data:`ARCHITECTURE_FIELDS` that differs."""
    return {n: (getattr(a, n), getattr(b, n)) for n in ARCHITECTURE_FIELDS if getattr(a, n) != getattr(b, n)}
