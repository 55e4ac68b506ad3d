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
        """Leading ``num_vision`` tokens through A, the rest through B; all through C when ``use_vl``."""
        if use_vl and self.C is not None:
            return self.C(x)
        if num_vision >= x.shape[1]:
            return self.A(x)
        if num_vision <= 0:
            return self.B(x)
        # split (not two slices): its backward is one concatenation, where each slice's backward would
        # allocate a zero-filled gradient of the whole sequence and accumulate into it.
        vision, text = x.split([num_vision, x.shape[1] - num_vision], dim=1)
        return torch.cat([self.A(vision), self.B(text)], dim=1)


def _route(module: nn.Module, x: torch.Tensor, num_vision: int, use_vl: bool = False) -> torch.Tensor:
    """Apply a module that may or may not be Multiway."""
    if isinstance(module, Multiway):
        return module(x, num_vision, use_vl)
    return module(x)


def _route_chain(
    modules: list[nn.Module], x: torch.Tensor, num_vision: int, use_vl: bool = False
) -> torch.Tensor:
    """Apply token-wise modules one after the other, splitting a mixed sequence once rather than per module.

    Same result as routing each module in turn; fewer copies (one split and one concatenation in all).
    """
    if use_vl or not 0 < num_vision < x.shape[1]:
        for m in modules:
            x = _route(m, x, num_vision, use_vl)
        return x
    parts = list(x.split([num_vision, x.shape[1] - num_vision], dim=1))
    for i, expert in enumerate("AB"):
        for m in modules:
            parts[i] = getattr(m, expert)(parts[i]) if isinstance(m, Multiway) else m(parts[i])
    return torch.cat(parts, dim=1)


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
        q, k, v = self._project(x, num_vision)
        q, k, v = (y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(b, t, d)
        post = [self.out_proj] if self.inner_attn_ln is None else [self.inner_attn_ln, self.out_proj]
        return _route_chain(post, out, num_vision)

    def _project(self, x: torch.Tensor, num_vision: int) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values (B, T, D); a mixed sequence is split (contiguously) once for all three."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if not isinstance(self.q_proj, Multiway) or not 0 < num_vision < x.shape[1]:
            return tuple(_route(m, x, num_vision) for m in projections)
        vision, text = (p.contiguous() for p in x.split([num_vision, x.shape[1] - num_vision], dim=1))
        return tuple(torch.cat([m.A(vision), m.B(text)], dim=1) for m in projections)


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
        branch = _route_chain([self.final_layer_norm, self.ffn], x, num_vision, use_vl)
        return self._residual(x, branch)
