"""Training FLOPs of the Multiway Transformer for MFU (docs/performance.md): the one count every task uses.

Training FLOPs per token = 6 x (active matmul parameters) + 12 x layers x hidden x sequence length
(attention scores and weighted values, forward and backward). A token activates one expert per Multiway
module, so the active count is the same for both layouts and every configuration: 4 d^2 (Q, K, V, O) +
2 d f (FFN) per layer. Recomputation under activation checkpointing is not counted (that would be HFU: add
:func:`recompute_flops`). Embedding look-ups are free; the patch projection and the prediction heads
(evaluated at the predicted positions only) are counted. Padded positions are computed, so they count.

``tests/test_flops.py`` checks :func:`training_flops` against ``torch.utils.flop_counter.FlopCounterMode``
over the real model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from beit3.model.config import CHECKPOINT_PARTS, ModelConfig


@dataclass(frozen=True)
class Pass:
    """One forward (and backward) of ``samples`` sequences through the backbone.

    A sequence holds the image's tokens (CLS first) when ``image`` is set, then ``text_len`` text positions
    (padding included).
    """

    samples: int
    image: bool = False
    text_len: int = 0

    def seq_len(self, cfg: ModelConfig) -> int:
        """Positions of one sequence."""
        return (cfg.num_vision_tokens if self.image else 0) + self.text_len


def active_params_per_token(cfg: ModelConfig) -> int:
    """Matmul parameters a token passes through in the encoder."""
    d, f = cfg.embed_dim, cfg.ffn_dim
    return cfg.depth * (4 * d * d + 2 * d * f)


def linear_flops(rows: int, in_features: int, out_features: int) -> float:
    """Forward+backward FLOPs of a Linear layer over ``rows`` inputs (2 for the forward, 4 for backward)."""
    return 6.0 * rows * in_features * out_features


def transformer_flops(matmul_params: int, depth: int, dim: int, sequences: int, seq_len: int) -> float:
    """Forward+backward FLOPs of ``sequences`` sequences of ``seq_len`` positions through a Transformer of
    ``depth`` layers of width ``dim`` whose weight matrices a token passes through hold ``matmul_params``
    parameters: 6 per parameter and position, plus attention's 12 x depth x dim x seq_len per position."""
    return float(sequences * seq_len * (6 * matmul_params + 12 * depth * dim * seq_len))


def encoder_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """Forward+backward FLOPs of ``batch`` sequences of ``seq_len`` positions through the encoder."""
    return transformer_flops(active_params_per_token(cfg), cfg.depth, cfg.embed_dim, batch, seq_len)


def patch_embed_flops(cfg: ModelConfig, images: int) -> float:
    """Forward+backward FLOPs of the patch projection: 2 for the forward and 2 for the weight gradient per
    multiply-add (an image needs no gradient of its own)."""
    return 4.0 * images * cfg.num_patches * cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim


def head_flops(cfg: ModelConfig, predicted_text: int, predicted_patches: int) -> float:
    """Forward+backward FLOPs of the MLM / MIM heads at the predicted positions."""
    d = cfg.embed_dim
    return linear_flops(predicted_text, d, cfg.vocab_size) + linear_flops(
        predicted_patches, d, cfg.visual_vocab_size
    )


def training_flops(
    cfg: ModelConfig, passes: Iterable[Pass], predicted_text: int = 0, predicted_patches: int = 0
) -> float:
    """Model training FLOPs of one micro-batch: its backbone passes plus the MLM / MIM heads.

    ``predicted_text`` / ``predicted_patches``: positions whose ``mlm_head`` / ``mim_head`` logits are
    computed (the masked ones). Task heads of finetuning add :func:`linear_flops` of their own.
    """
    total = 0.0
    for p in passes:
        total += encoder_flops(cfg, p.samples, p.seq_len(cfg))
        if p.image:
            total += patch_embed_flops(cfg, p.samples)
    return total + head_flops(cfg, predicted_text, predicted_patches)


def checkpoint_recompute_flops(
    cfg: ModelConfig,
    passes: Iterable[Pass],
    layers: Iterable[int],
    part: str = "layer",
    drop_path: bool | None = None,
    one_pass: bool = True,
) -> float:
    """FLOPs the backward recomputes under activation checkpointing of ``layers`` (indices) with ``part``
    (``"layer"``, ``"attention"``, ``"ffn"``) for one micro-batch of ``passes``: the forward of the
    recomputed part of each layer, as eager torch runs it (hardware FLOPs = model FLOPs + this).

    Torch's non-reentrant checkpoint stops recomputing as soon as every tensor the backward needs is back
    (early stop, its default). A matmul saves its input before it runs, so the last one of a recomputed
    part (the output projection or ``fc2`` of the last expert slice in row order) is not run again, unless
    something saved after it needs its output: a whole layer's stochastic-depth keep mask (on where
    ``drop_path``, default ``cfg.drop_path_rate > 0``, in every layer but the first, whose rate is 0).
    ``one_pass``: the layers see one packed stream (``BEiT3.forward_mixed``), else one sequence per pass
    (``BEiT3.forward``). ``tests/test_selective_checkpointing.py`` checks this against torch's FLOP counter.
    """
    if part not in CHECKPOINT_PARTS:
        raise ValueError(f"checkpointing part {part!r}: use one of {', '.join(CHECKPOINT_PARTS)}")
    passes = [p for p in passes if p.samples]
    drop_path = cfg.drop_path_rate > 0 if drop_path is None else drop_path
    d, f = cfg.embed_dim, cfg.ffn_dim
    rows = _rows(cfg, passes)
    attention = sum(p.samples * p.seq_len(cfg) * (8 * d * d + 4 * d * p.seq_len(cfg)) for p in passes)
    ffn = 4.0 * d * f * rows
    units = [passes] if one_pass else [[p] for p in passes]
    first_vl = cfg.depth - cfg.vl_expert_layers
    total = 0.0
    for i in layers:
        vl = i >= first_vl
        if part != "ffn":
            total += attention
        if part != "attention":
            total += ffn
        if part == "attention":
            out_rows = [
                _last_slice(cfg, u, False) if cfg.decoupled_attention else _rows(cfg, u) for u in units
            ]
            total -= 2.0 * d * d * sum(out_rows)
        elif part == "ffn" or not (drop_path and i > 0):
            total -= 2.0 * d * f * sum(_last_slice(cfg, u, vl) for u in units)
    return total


def _rows(cfg: ModelConfig, passes: list[Pass]) -> int:
    return sum(p.samples * p.seq_len(cfg) for p in passes)


def _last_slice(cfg: ModelConfig, passes: list[Pass], vl: bool) -> int:
    """Rows of the last expert slice of a Multiway module over these passes' packed rows
    (``layers.Packing.groups``): A the image rows, then B the text rows; in a layer with vision-language
    experts A the image-only rows, C the pairs' rows, B the text-only rows."""
    nv = cfg.num_vision_tokens
    if vl and any(p.image and p.text_len for p in passes):
        groups = [
            sum(p.samples * nv for p in passes if p.image and not p.text_len),
            sum(p.samples * p.seq_len(cfg) for p in passes if p.image and p.text_len),
            sum(p.samples * p.text_len for p in passes if not p.image),
        ]
    else:
        groups = [sum(p.samples * nv for p in passes if p.image), sum(p.samples * p.text_len for p in passes)]
    return next((n for n in reversed(groups) if n), 0)
