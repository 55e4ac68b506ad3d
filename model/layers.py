"""Building blocks of the Multiway Transformer: experts routed by position, attention, FFN, block.

Routing follows the released code: the sequence is image tokens first, then text tokens, and a single
integer ``num_vision`` says how many leading tokens belong to the image. Modules wrapped in
:class:`Multiway` send the first ``num_vision`` tokens through expert ``A`` (vision) and the rest through
expert ``B`` (language); expert ``C`` (vision-language, paper layout only) takes the whole sequence of an
image-text input. Expert names are the released checkpoint's key names (``ffn.A.fc1.weight``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from beit3.model.cache import KVCache


class Multiway(nn.Module):
    """Copies of one module, one per modality, applied to the tokens of that modality."""

    def __init__(self, make: Callable[[], nn.Module], with_vl: bool = False) -> None:
        super().__init__()
        self.A = make()  # vision
        self.B = make()  # language
        self.C = make() if with_vl else None  # vision-language (image-text input only)

    @classmethod
    def pair(cls, vision: nn.Module, language: nn.Module) -> Multiway:
        """Two different modules (e.g. position tables of different sizes) as vision/language experts."""
        m = cls(nn.Identity)
        m.A, m.B = vision, language
        return m

    def forward(self, x: torch.Tensor, num_vision: int, use_vl: bool = False) -> torch.Tensor:
        if use_vl and self.C is not None:
            return self.C(x)
        if num_vision >= x.shape[1]:
            return self.A(x)
        if num_vision <= 0:
            return self.B(x)
        return torch.cat([self.A(x[:, :num_vision]), self.B(x[:, num_vision:])], dim=1)


def _route(module: nn.Module, x: torch.Tensor, num_vision: int, use_vl: bool = False) -> torch.Tensor:
    """Apply a module that may or may not be Multiway."""
    if isinstance(module, Multiway):
        return module(x, num_vision, use_vl)
    return module(x)


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample with probability ``p`` during training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeedForward(nn.Module):
    """fc1 -> GELU -> (Sub-LN) -> fc2, key names as released (``fc1``, ``ffn_layernorm``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int, subln: bool, eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps) if subln else None
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GELU on bf16 input is computed in fp32 inside the kernel and rounded once, which is what the
        # release's explicit x.float() round trip does, without materialising an fp32 copy.
        x = F.gelu(self.fc1(x))
        if self.ffn_layernorm is not None:
            x = self.ffn_layernorm(x)
        return self.fc2(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the whole (image ; text) sequence.

    With ``decoupled=True`` (released layout) every projection and the Sub-LN have a vision and a language
    copy; only the attention computation itself is shared. With ``decoupled=False`` (paper layout) the whole
    module is shared by all modalities.
    """

    def __init__(self, dim: int, num_heads: int, decoupled: bool, subln: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads

        def wrap(make: Callable[[], nn.Module]) -> nn.Module:
            return Multiway(make) if decoupled else make()

        def linear() -> nn.Module:
            return nn.Linear(dim, dim)

        self.k_proj = wrap(linear)
        self.v_proj = wrap(linear)
        self.q_proj = wrap(linear)
        self.out_proj = wrap(linear)
        self.inner_attn_ln = wrap(lambda: nn.LayerNorm(dim, eps=eps)) if subln else None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        num_vision: int,
        mask: torch.Tensor | None,  # (B or 1, 1, T, S) bool, True = may attend
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        b, t, d = x.shape
        q = _route(self.q_proj, x, num_vision)
        k = _route(self.k_proj, x, num_vision)
        v = _route(self.v_proj, x, num_vision)
        q, k, v = (y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(b, t, d)
        if self.inner_attn_ln is not None:
            out = _route(self.inner_attn_ln, out, num_vision)
        return _route(self.out_proj, out, num_vision)


class MultiwayBlock(nn.Module):
    """One pre-LN Transformer layer: shared (or decoupled) attention, then per-modality FFN experts."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        decoupled: bool,
        with_vl: bool,
        subln: bool,
        eps: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.with_vl = with_vl
        self.self_attn = SelfAttention(dim, num_heads, decoupled, subln, eps)
        if decoupled:
            self.self_attn_layer_norm = Multiway(lambda: nn.LayerNorm(dim, eps=eps))
        else:
            self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = Multiway(lambda: FeedForward(dim, ffn_dim, subln, eps), with_vl=with_vl)
        self.final_layer_norm = Multiway(lambda: nn.LayerNorm(dim, eps=eps), with_vl=with_vl)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return x + (self.drop_path(branch) if self.drop_path is not None else branch)

    def forward(
        self,
        x: torch.Tensor,
        num_vision: int,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        paired: bool | None = None,
    ) -> torch.Tensor:
        """``paired`` says the sequence is an image-text pair (default: both modalities are in ``x``); with
        a KV cache the image may sit in the cache while ``x`` holds only new text tokens."""
        # The vision-language expert serves image-text input only (paper §2.1): both modalities present.
        if paired is None:
            paired = 0 < num_vision < x.shape[1]
        use_vl = self.with_vl and paired
        h = _route(self.self_attn_layer_norm, x, num_vision)
        x = self._residual(x, self.self_attn(h, num_vision, mask, cache, layer_idx))
        h = self.final_layer_norm(x, num_vision, use_vl)
        return self._residual(x, self.ffn(h, num_vision, use_vl))
