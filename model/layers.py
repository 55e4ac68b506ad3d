"""Building blocks of the Multiway Transformer: experts routed by position, attention, FFN, block.

Routing follows the released code: the sequence is image tokens first, then text tokens, and a single
integer ``num_vision`` says how many leading tokens belong to the image. Modules wrapped in
:class:`Multiway` send the first ``num_vision`` tokens through expert ``A`` (vision) and the rest through
expert ``B`` (language); expert ``C`` (vision-language, paper layout only) takes the whole sequence of an
image-text input. Expert names are the released checkpoint's key names (``ffn.A.fc1.weight``).

Several sub-batches (images, texts, pairs) can also run through a layer together (``forward_packed``):
their tokens lie in one packed stream of rows (:class:`Packing`) ordered so that each expert's rows are one
contiguous slice, every expert and shared module is called once on all its rows, and only the attention
(which has no parameters) runs per sub-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from beit3.model.cache import KVCache
from beit3.model.qkv import FusedQKV, qkv_load_state_dict_pre_hook, qkv_state_dict_hook


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


class Packing:
    """Where the tokens of several sub-batches lie in one packed stream of rows (N, D).

    ``shapes`` gives (samples, image tokens, text tokens) per sub-batch. The rows are, each part sample-major:
    the image tokens of the image-only sub-batches, the image tokens of the image-text sub-batches, the text
    tokens of the image-text sub-batches, the text tokens of the text-only sub-batches. So every expert's
    rows are one contiguous slice (:meth:`groups`): A (vision) the leading image rows, B (language) the text
    rows after them; in a layer with vision-language experts, C takes all the pairs' rows (the middle), A the
    image-only rows before them and B the text-only rows after.
    """

    def __init__(self, shapes: Sequence[tuple[int, int, int]]) -> None:
        self.shapes = tuple(shapes)
        image_only = [i for i, (_, nv, nt) in enumerate(self.shapes) if nv and not nt]
        pairs = [i for i, (_, nv, nt) in enumerate(self.shapes) if nv and nt]
        text_only = [i for i, (_, nv, nt) in enumerate(self.shapes) if nt and not nv]
        #: sub-batch indices in the order their image (text) tokens appear in the stream
        self.vision_order = image_only + pairs
        self.text_order = pairs + text_only
        self.segments: dict[tuple[int, bool], tuple[int, int]] = {}  # (sub-batch, image?) -> rows
        row = 0
        for i, vision in [(i, True) for i in self.vision_order] + [(i, False) for i in self.text_order]:
            b, nv, nt = self.shapes[i]
            self.segments[i, vision] = (row, row + b * (nv if vision else nt))
            row += b * (nv if vision else nt)
        self.rows = row
        self.vision_rows = sum(self.shapes[i][0] * self.shapes[i][1] for i in self.vision_order)
        first_pair = sum(self.shapes[i][0] * self.shapes[i][1] for i in image_only)
        last_pair = self.vision_rows + sum(self.shapes[i][0] * self.shapes[i][2] for i in pairs)
        self.pair_rows = (first_pair, last_pair)

    def groups(self, use_vl: bool = False) -> list[tuple[str, int, int]]:
        """(expert, first row, end row) of each non-empty expert slice, in row order."""
        if use_vl:
            s, e = self.pair_rows
            bounds = [("A", 0, s), ("C", s, e), ("B", e, self.rows)]
        else:
            bounds = [("A", 0, self.vision_rows), ("B", self.vision_rows, self.rows)]
        return [g for g in bounds if g[2] > g[1]]

    def pack(self, per_sub: Sequence[torch.Tensor]) -> torch.Tensor:
        """Rows (N, ...) from per-sub-batch tensors (B, T, ...) laid out image tokens first."""
        parts = []
        for (i, vision), (s, e) in self.segments.items():
            if e > s:
                nv = self.shapes[i][1]
                t = per_sub[i][:, :nv] if vision else per_sub[i][:, nv:]
                parts.append(t.reshape((e - s,) + t.shape[2:]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def sequences(self, pieces: Sequence[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """Each sub-batch's (B, T, D) sequence, image tokens first, from the packed rows.

        ``pieces``: (first row, rows) that cover the stream in order, e.g. ``[(0, x)]``, or one piece per
        expert slice; no segment straddles two pieces. Single-modality sub-batches come back as views.
        """
        out = []
        for i, (b, nv, nt) in enumerate(self.shapes):
            parts = []
            for vision, n in ((True, nv), (False, nt)):
                if not n:
                    continue
                s, e = self.segments[i, vision]
                first, rows = next((p, t) for p, t in pieces if p <= s and e <= p + t.shape[0])
                parts.append(rows[s - first : e - first].view(b, n, rows.shape[-1]))
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        return out


Pieces = list[tuple[int, torch.Tensor]]  # (first row, rows) covering a packed stream, in row order


def join_pieces(pieces: Pieces) -> torch.Tensor:
    return pieces[0][1] if len(pieces) == 1 else torch.cat([t for _, t in pieces])


def apply_packed(modules: list[nn.Module], pieces: Pieces, groups: list[tuple[str, int, int]]) -> Pieces:
    """Apply token-wise modules one after the other on packed rows: each Multiway expert once on its slice
    (``groups``), a shared module once on all rows. Returns the result in pieces (one per expert slice
    after a Multiway module), so that the next Multiway module takes them without a copy."""
    for m in modules:
        if isinstance(m, Multiway):
            if [p for p, _ in pieces] != [s for _, s, _ in groups]:
                x = join_pieces(pieces)
                pieces = [(s, x[s:e]) for _, s, e in groups]
            out = []
            for (expert, s, _), (_, rows) in zip(groups, pieces):
                module = getattr(m, expert)
                if module is None:
                    raise ValueError(f"{type(m).__name__} has no expert {expert}")
                out.append((s, module(rows)))
            pieces = out
        else:
            pieces = [(0, m(join_pieces(pieces)))]
    return pieces


class WindowGrid:
    """An image's tokens on its patch grid and the windows that window attention keeps each patch within.

    The tokens are ``num_cls`` leading tokens (the vision CLS token: 0 or 1) then the ``rows`` x ``cols``
    patch grid, row-major. As in ViTDet (Li et al., 2022, section 3) the grid is padded at the bottom and
    right to multiples of ``size`` and cut into non-overlapping ``size`` x ``size`` windows; a patch attends
    to the patches of its window and to the leading tokens. Unlike ViTDet, which lets queries attend to the
    zero-padded tokens, the padding is masked out, so a patch's output does not depend on how much padding
    its window has. A leading token attends to every token (globally). So when one window covers the whole
    grid the result is global attention's; no parameters are involved (BEiT-3 has no relative position
    bias), so any window size fits any checkpoint.
    """

    def __init__(self, rows: int, cols: int, size: int, num_cls: int = 1) -> None:
        if rows <= 0 or cols <= 0 or size <= 0 or num_cls not in (0, 1):
            raise ValueError(f"window grid {rows}x{cols}, window {size}, {num_cls} leading tokens")
        self.rows, self.cols, self.size, self.num_cls = rows, cols, size, num_cls
        self.window_rows, self.window_cols = -(-rows // size), -(-cols // size)  # windows per column / row
        self.num_windows = self.window_rows * self.window_cols
        self._masks: dict[torch.device, torch.Tensor | None] = {}

    def _key_mask(self, device: torch.device) -> torch.Tensor | None:
        """(windows, 1, 1, leading + size**2) bool, True = a real token (may be attended); None without
        padding."""
        if device not in self._masks:
            s = self.size
            if self.rows % s == 0 and self.cols % s == 0:
                self._masks[device] = None
            else:
                shape = (self.window_rows * s, self.window_cols * s)
                real = torch.zeros(shape, dtype=torch.bool, device=device)
                real[: self.rows, : self.cols] = True
                real = real.view(self.window_rows, s, self.window_cols, s).transpose(1, 2)
                real = real.reshape(self.num_windows, s * s)
                lead = torch.ones(self.num_windows, self.num_cls, dtype=torch.bool, device=device)
                self._masks[device] = torch.cat([lead, real], dim=1)[:, None, None, :]
        return self._masks[device]

    def partition(self, y: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, H, rows * cols, d) -> windows (B * windows, H, size**2, d), windows row-major
        within each image, padding zero."""
        b, h, _, d = y.shape
        s = self.size
        y = y.reshape(b, h, self.rows, self.cols, d)
        y = F.pad(y, (0, 0, 0, self.window_cols * s - self.cols, 0, self.window_rows * s - self.rows))
        y = y.view(b, h, self.window_rows, s, self.window_cols, s, d).permute(0, 2, 4, 1, 3, 5, 6)
        return y.reshape(b * self.num_windows, h, s * s, d)

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`partition`, padding dropped: (B * windows, H, size**2, d) -> (B, H, N, d)."""
        s = self.size
        h, d = y.shape[1], y.shape[-1]
        y = y.view(-1, self.window_rows, self.window_cols, h, s, s, d).permute(0, 3, 1, 4, 2, 5, 6)
        y = y.reshape(y.shape[0], h, self.window_rows * s, self.window_cols * s, d)
        return y[:, :, : self.rows, : self.cols].reshape(y.shape[0], h, self.rows * self.cols, d)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Window attention of heads (B, H, leading + rows * cols, d) -> (B, H, T, d)."""
        c = self.num_cls
        qw, kw, vw = (self.partition(y[:, :, c:]) for y in (q, k, v))
        if c:  # every window's patches also attend to the leading tokens
            kw = torch.cat([k[:, :, :c].repeat_interleave(self.num_windows, dim=0), kw], dim=2)
            vw = torch.cat([v[:, :, :c].repeat_interleave(self.num_windows, dim=0), vw], dim=2)
        mask = self._key_mask(q.device)
        if mask is not None:
            mask = mask.repeat(q.shape[0], 1, 1, 1)  # (B * windows, 1, 1, S), image-major as the windows
        patches = self.merge(F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask))
        if not c:
            return patches
        lead = F.scaled_dot_product_attention(q[:, :, :c], k, v)  # (B, H, c, d): global
        return torch.cat([lead, patches], dim=2)


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
        return drop_branch(x, mask, keep)

    def sample(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The (n, 1, 1) keep mask ``forward`` draws for a (n, T, D) branch of that dtype (same RNG use)."""
        return torch.empty((n, 1, 1), dtype=dtype, device=device).bernoulli_(1.0 - self.p)

    def keep_prob(self, device: torch.device) -> torch.Tensor:
        """The keep probability as a 0-d fp32 tensor, for :func:`drop_branch`: a compiled layer then takes
        it as an input, where the float attribute ``p`` would be a guard (each layer has its own rate, so
        every layer would compile again)."""
        return torch.tensor(1.0 - self.p, device=device)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_branch(branch: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | float) -> torch.Tensor:
    """Stochastic depth with its keep mask drawn (``DropPath.sample``): ``branch * mask / keep``, one
    rounding in ``branch``'s dtype. ``DropPath.forward`` draws the mask itself; the packed path passes masks
    and the keep probability as tensors drawn before the layers (``DropPath.keep_prob``)."""
    return branch * mask / keep


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
    module is shared by all modalities, and queries, keys and values come from one fused projection
    (:class:`FusedQKV`, one GEMM) whose state-dict keys are still ``q_proj``, ``k_proj`` and ``v_proj``.
    """

    def __init__(self, dim: int, num_heads: int, decoupled: bool, subln: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads

        def wrap(make: Callable[[], nn.Module]) -> nn.Module:
            return Multiway(make) if decoupled else make()

        def linear() -> nn.Module:
            return nn.Linear(dim, dim)

        if decoupled:
            self.k_proj = wrap(linear)
            self.v_proj = wrap(linear)
            self.q_proj = wrap(linear)
            self.qkv_proj = None
        else:
            # One GEMM for queries, keys and values. Registered where k_proj was, so that module order
            # (state-dict order, initialisation draws) is that of the three projections.
            self.qkv_proj = FusedQKV(dim)
            self.register_state_dict_post_hook(qkv_state_dict_hook)
            self.register_load_state_dict_pre_hook(qkv_load_state_dict_pre_hook)
        self.out_proj = wrap(linear)
        self.inner_attn_ln = wrap(lambda: nn.LayerNorm(dim, eps=eps)) if subln else None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        num_vision: int,
        mask: torch.Tensor | None,  # (B or 1, 1, T, S) bool, True = may attend
        cache: KVCache | None = None,
        layer_idx: int = 0,
        window: WindowGrid | None = None,
    ) -> torch.Tensor:
        """``window``: attention within the non-overlapping windows of an image's patch grid instead of
        over the whole sequence (``x`` an image's tokens, laid out as ``window`` says; no mask, no cache)."""
        b, t, d = x.shape
        q, k, v = self._project(x, num_vision)
        q, k, v = (y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        if window is not None:
            out = window.attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(b, t, d)
        post = [self.out_proj] if self.inner_attn_ln is None else [self.inner_attn_ln, self.out_proj]
        return _route_chain(post, out, num_vision)

    def forward_packed(self, h: Pieces, packing: Packing, masks: Sequence[torch.Tensor | None]) -> Pieces:
        """Attention over several sub-batches at once: ``h`` their packed, normalised rows; ``masks`` one SDPA
        mask per sub-batch (None: none). Each projection (each expert) runs once on all its rows; the
        attention itself per sub-batch on its own (B, H, T, hd) tensors, no padding across sub-batches."""
        groups = packing.groups()
        if self.qkv_proj is not None:  # one GEMM on all rows, then per sub-batch (B, T, 3D) -> q, k, v views
            fused = packing.sequences(apply_packed([self.qkv_proj], h, groups))
            qkv = list(zip(*(self.qkv_proj.split(y) for y in fused)))
        else:
            projections = (self.q_proj, self.k_proj, self.v_proj)
            qkv = [packing.sequences(apply_packed([m], h, groups)) for m in projections]
        outs = []
        for (b, nv, nt), q, k, v, mask in zip(packing.shapes, *qkv, masks):
            t = nv + nt
            q, k, v = (y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
            outs.append(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        post = [self.out_proj] if self.inner_attn_ln is None else [self.inner_attn_ln, self.out_proj]
        return apply_packed(post, [(0, packing.pack(outs))], groups)

    def _project(self, x: torch.Tensor, num_vision: int) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values (B, T, D); a mixed sequence is split (contiguously) once for all three.
        Shared attention: one fused GEMM, q, k, v are views of its (B, T, 3D) output."""
        if self.qkv_proj is not None:
            return self.qkv_proj.split(self.qkv_proj(x))
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
        num_vision: int = 0,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        paired: bool | None = None,
        packed: tuple | None = None,
        recompute: str | None = None,
        window: WindowGrid | None = None,
    ) -> torch.Tensor:
        """``paired`` says the sequence is an image-text pair (default: both modalities are in ``x``); with
        a KV cache the image may sit in the cache while ``x`` holds only new text tokens. ``packed``:
        ``(packing, masks, drop)`` runs :meth:`forward_packed` on packed rows ``x`` instead, through the
        module call, so that hooks on the layer (ZeRO-3 gathering a whole layer's parameters when the
        layer is a gathering unit) fire for the packed path too. ``recompute``: ``"attention"`` or
        ``"ffn"`` recomputes that branch in the backward instead of saving its activations (selective
        activation checkpointing; not with a cache); a whole layer is checkpointed by the caller.
        ``window``: window attention over an image's patch grid (:class:`WindowGrid`), None = global."""
        if packed is not None:
            return self.forward_packed(x, *packed, recompute=recompute)
        # The vision-language expert serves image-text input only (paper §2.1): both modalities present.
        if paired is None:
            paired = 0 < num_vision < x.shape[1]
        use_vl = self.with_vl and paired
        attn = _branch(
            recompute == "attention", self._attention, x, num_vision, mask, cache, layer_idx, window
        )
        x = self._residual(x, attn)
        return self._residual(x, _branch(recompute == "ffn", self._ffn, x, num_vision, use_vl))

    def _attention(self, x, num_vision, mask, cache, layer_idx, window=None) -> torch.Tensor:
        """The attention branch of :meth:`forward`: pre-LN, attention, output projection."""
        h = _route(self.self_attn_layer_norm, x, num_vision)
        return self.self_attn(h, num_vision, mask, cache, layer_idx, window)

    def _ffn(self, x: torch.Tensor, num_vision: int, use_vl: bool) -> torch.Tensor:
        """The FFN branch of :meth:`forward`: final LN, FFN experts."""
        return _route_chain([self.final_layer_norm, self.ffn], x, num_vision, use_vl)

    def forward_packed(
        self,
        x: torch.Tensor,  # (N, D) packed rows of several sub-batches
        packing: Packing,
        masks: Sequence[torch.Tensor | None],
        drop: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        recompute: str | None = None,
    ) -> torch.Tensor:
        """The layer on the packed rows of several sub-batches: each module (each expert) called once on
        all its rows, attention per sub-batch (``masks``, one per sub-batch). ``drop``: stochastic depth
        drawn beforehand, ``(attention keep mask, FFN keep mask, keep probability)``: two (N, 1) per-row
        masks and a 0-d tensor (None: no drop path). Nothing here reads a per-layer number, so the layers
        of one structure share one compiled graph. An image-text sub-batch's rows go through the
        vision-language experts where the layer has them. ``recompute``: as in :meth:`forward`."""
        attn = _branch(recompute == "attention", self._attention_packed, x, packing, masks)
        x = x + (attn if drop is None else drop_branch(attn, drop[0], drop[2]))
        ffn = _branch(recompute == "ffn", self._ffn_packed, x, packing)
        return x + (ffn if drop is None else drop_branch(ffn, drop[1], drop[2]))

    def _attention_packed(
        self, x: torch.Tensor, packing: Packing, masks: Sequence[torch.Tensor | None]
    ) -> torch.Tensor:
        """The attention branch of :meth:`forward_packed` on packed rows (N, D)."""
        h = apply_packed([self.self_attn_layer_norm], [(0, x)], packing.groups())
        return join_pieces(self.self_attn.forward_packed(h, packing, masks))

    def _ffn_packed(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """The FFN branch of :meth:`forward_packed` on packed rows (N, D)."""
        groups = packing.groups(self.with_vl)
        return join_pieces(apply_packed([self.final_layer_norm, self.ffn], [(0, x)], groups))


def _branch(recompute: bool, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``fn(*args)``, under activation checkpointing when ``recompute`` and gradients are on: its inputs
    are saved, its activations are not, and it runs again in the backward. Non-reentrant, so that it nests
    in a compiled layer. A branch draws no random numbers (stochastic depth is applied outside it), so
    no RNG state is kept for the recomputation."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)
