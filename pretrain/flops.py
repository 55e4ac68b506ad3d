"""Model FLOPs accounting for MFU (docs/performance.md): pure functions of the architecture and shapes.

Training FLOPs per token = 6 x (active matmul parameters) + 12 x layers x hidden x sequence length
(attention scores and weighted values, forward and backward). A token activates one expert per Multiway
module, so the active count is the same for both layouts: 4 d^2 (Q, K, V, O) + 2 d f (FFN) per layer.
Recomputation under activation checkpointing is not counted (that would be HFU). Embedding look-ups are
free; the patch projection and the prediction heads (evaluated at masked positions only) are counted.
"""

from __future__ import annotations

from beit3.model.config import ModelConfig


def active_params_per_token(cfg: ModelConfig) -> int:
    """Matmul parameters a token passes through in the encoder."""
    d, f = cfg.embed_dim, cfg.ffn_dim
    return cfg.depth * (4 * d * d + 2 * d * f)


def encoder_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """Forward+backward FLOPs of ``batch`` sequences of ``seq_len`` tokens through the encoder."""
    per_token = 6 * active_params_per_token(cfg) + 12 * cfg.depth * cfg.embed_dim * seq_len
    return float(batch * seq_len * per_token)


def patch_embed_flops(cfg: ModelConfig, images: int) -> float:
    """Forward+backward FLOPs of the patch projection."""
    return float(6 * images * cfg.num_patches * cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim)


def head_flops(cfg: ModelConfig, masked_text: int, masked_patches: int) -> float:
    """Forward+backward FLOPs of the MLM / MIM heads at the masked positions."""
    d = cfg.embed_dim
    return float(6 * d * (masked_text * cfg.vocab_size + masked_patches * cfg.visual_vocab_size))
