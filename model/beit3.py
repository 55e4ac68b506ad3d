"""The BEiT-3 Multiway Transformer: embeddings, encoder, pretraining heads.

Module names reproduce the released checkpoints' keys (``beit3.encoder.layers.0.ffn.A.fc1.weight``), so a
released file loads strictly into the released layout. The model takes tensors and returns tensors: it knows
nothing of DeepSpeed, data files or losses. Activation checkpointing is switched on from outside with
:meth:`BEiT3Model.set_grad_checkpointing`. :meth:`BEiT3.forward_mixed` encodes several sub-batches (images,
texts, pairs) in one pass, layer by layer, each module called once on all the tokens routed to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from beit3.model.cache import KVCache
from beit3.model.config import CHECKPOINT_PARTS, ModelConfig
from beit3.model.errors import ModelError
from beit3.model.layers import Multiway, MultiwayBlock, Packing, WindowGrid, apply_packed
from beit3.model.qkv import QKV_DISK_ORDER, FusedQKV

# Position indices start at 2 in both tables, as in the released (fairseq-derived) code; rows 0 and 1 are
# never read. Kept so that position tables have the released shapes.
POSITION_OFFSET = 2


def checkpointed_layers(spec: str, depth: int) -> list[int] | None:
    """The layers a checkpointing spec recomputes: ``"none"`` (None), ``"all"``, or ``"every:N"`` (layers 0,
    N, 2N, ...); the grammar of the recipes' ``[model] grad_checkpointing``. ValueError for another spec."""
    if spec == "none":
        return None
    if spec == "all":
        return list(range(depth))
    step = spec.removeprefix("every:")
    if step != spec and step.isdigit() and int(step) > 0:
        return list(range(0, depth, int(step)))
    raise ValueError(f"grad_checkpointing={spec!r}: use 'none', 'all' or 'every:N'")


def checkpointed_part(part: str) -> str:
    """``part`` if it is one of :data:`CHECKPOINT_PARTS` (the recipes' ``[model] grad_checkpointing_part``),
    else ValueError naming the choices."""
    if part not in CHECKPOINT_PARTS:
        choices = ", ".join(repr(p) for p in CHECKPOINT_PARTS)
        raise ValueError(f"grad_checkpointing_part={part!r}: use one of {choices}")
    return part


# The kinds of input a forward takes; a pruned model (a finetuning configuration) accepts some of them.
INPUT_MODES = ("image", "text", "pair")
# The inputs a sub-batch of :meth:`BEiT3.forward_mixed` may hold.
MIXED_INPUTS = ("image", "text", "text_padding_mask", "image_mask", "attn_mask")
_DESCRIBE = {
    "image": "images (image=...)",
    "text": "texts (text=...)",
    "pair": "image-text pairs (image= and text= together)",
}


class ModalityError(ModelError, ValueError):
    """An input the model's configuration does not take (an image for a language-only encoder, ...)."""


class VisionEmbedding(nn.Module):
    """Patchify with a strided convolution, put ``mask_token`` at masked patches, prepend ``cls_token``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def forward(self, image: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        if image.dim() != 4 or image.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected images of shape (B, C, {self.img_size}, {self.img_size}), "
                f"got {tuple(image.shape)}; for another size build the model with img_size=... "
                "(load_checkpoint interpolates the vision positions)"
            )
        x = self.proj(image).flatten(2).transpose(1, 2)  # (B, Np, D)
        if image_mask is not None:
            w = image_mask.unsqueeze(-1).to(x.dtype)  # (B, Np, 1), 1 = masked
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)  # (B, Np + 1, D)

    def patch_grid(self, image: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, D, H / p, W / p) of images of any size whose sides are multiples of the
        patch size ``p`` (the dense-prediction path; no mask token, no CLS)."""
        p = self.proj.stride[0]
        if image.dim() != 4 or image.shape[-2] % p or image.shape[-1] % p or min(image.shape[-2:]) == 0:
            raise ValueError(
                f"expected images (B, C, H, W) with H and W multiples of the patch size {p}, got "
                f"{tuple(image.shape)}: pad or resize them to such a size"
            )
        return self.proj(image)


def resize_position_grid(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A square grid of position embeddings (S * S, D) resized to (rows * cols, D), row-major: bicubic,
    align_corners=False, in fp32 (as :func:`beit3.model.checkpoint.interpolate_vision_positions` resizes a
    table on load), returned as is when the size matches. Differentiable, so the table keeps training."""
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
        raise ValueError(f"a position grid of {grid.shape[0]} rows is not square")
    if (rows, cols) == (side, side):
        return grid
    x = grid.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, S, S)
    x = F.interpolate(x, size=(rows, cols), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(rows * cols, -1).to(grid.dtype)


class Encoder(nn.Module):
    """Position tables, the stack of Multiway blocks and the final per-modality LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.embed_positions = Multiway.pair(
            nn.Embedding(cfg.num_vision_tokens + POSITION_OFFSET, d),  # (Np + 3, D)
            nn.Embedding(cfg.max_text_positions, d),  # (1024, D)
        )
        # Stochastic depth rising linearly from 0 (first layer) to drop_path_rate (last layer).
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        first_vl = cfg.depth - cfg.vl_expert_layers
        self.layers = nn.ModuleList(
            MultiwayBlock(
                d,
                cfg.num_heads,
                cfg.ffn_dim,
                decoupled=cfg.decoupled_attention,
                with_vl=i >= first_vl,
                subln=cfg.subln,
                eps=cfg.layernorm_eps,
                drop_path=rates[i],
            )
            for i in range(cfg.depth)
        )
        self.layer_norm = (
            Multiway(lambda: nn.LayerNorm(d, eps=cfg.layernorm_eps)) if cfg.normalize_output else None
        )


class BEiT3(nn.Module):
    """The backbone: keys under ``beit3.`` in released checkpoints."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg)
        self.checkpoint_layers: frozenset[int] = frozenset()
        self.checkpoint_part = "layer"  # of CHECKPOINT_PARTS: what is recomputed of each of those layers
        self.configuration = ""  # the name of the configuration it is pruned to ("" when whole)
        self.accepts: tuple[str, ...] = INPUT_MODES  # the input modes whose weights the model holds

    def set_grad_checkpointing(
        self, enable: bool = True, layers: list[int] | None = None, part: str = "layer"
    ) -> None:
        """See :meth:`BEiT3Model.set_grad_checkpointing` (here for wrappers that hold only the backbone)."""
        if part not in CHECKPOINT_PARTS:
            raise ValueError(f"checkpointing part {part!r}: use one of {', '.join(CHECKPOINT_PARTS)}")
        if not enable:
            self.checkpoint_layers = frozenset()
            self.checkpoint_part = "layer"
            return
        layers = range(self.cfg.depth) if layers is None else layers
        bad = [i for i in layers if not 0 <= i < self.cfg.depth]
        if bad:
            raise ValueError(f"layer indices {bad} out of range for depth {self.cfg.depth}")
        self.checkpoint_layers = frozenset(layers)
        self.checkpoint_part = part

    def restrict_inputs(self, configuration: str, modes: tuple[str, ...]) -> None:
        """Record that the model was pruned to ``configuration``, which takes only ``modes`` (of
        :data:`INPUT_MODES`): a forward with another kind of input raises :class:`ModalityError`."""
        unknown = set(modes) - set(INPUT_MODES)
        if unknown or not modes:
            raise ValueError(f"input modes {modes!r} must be some of {INPUT_MODES}")
        self.configuration, self.accepts = configuration, tuple(modes)

    def _check_input_mode(self, has_image: bool, has_text: bool) -> None:
        mode = "pair" if has_image and has_text else "image" if has_image else "text"
        if mode in self.accepts:
            return
        takes = " or ".join(_DESCRIBE[m] for m in self.accepts)
        raise ModalityError(
            f"this model is pruned to the {self.configuration!r} configuration, which takes {takes} only; "
            f"it was given {_DESCRIBE[mode]}: pass {takes}, or build the model with a configuration that "
            f"takes {_DESCRIBE[mode].split(' (')[0]}"
        )

    def embed(
        self,
        image: torch.Tensor | None,
        text: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        text_positions: torch.Tensor | None,
        text_start: int = 0,
    ) -> tuple[torch.Tensor, int]:
        """Token plus position embeddings of the (image ; text) sequence and the number of image tokens.

        Text positions count from ``text_start`` (the text tokens already in a KV cache) unless
        ``text_positions`` gives the indices (fairseq offset of 2 included) explicitly.
        """
        parts = []
        positions = self.encoder.embed_positions
        if image is not None:
            x = self.vision_embed(image, image_mask)
            idx = torch.arange(POSITION_OFFSET, POSITION_OFFSET + x.shape[1], device=x.device)
            parts.append(x + positions.A(idx).to(x.dtype))
        if text is not None:
            x = self.text_embed(text)
            if text_positions is None:
                end = text_start + text.shape[1]
                if end > self.cfg.max_text_len:
                    raise ValueError(
                        f"text positions up to {end} exceed max_text_len {self.cfg.max_text_len}: "
                        "shorten the text or build the model with a larger max_text_positions"
                    )
                idx = torch.arange(POSITION_OFFSET + text_start, POSITION_OFFSET + end, device=x.device)
            else:
                idx = text_positions
            parts.append(x + positions.B(idx).to(x.dtype))
        num_vision = parts[0].shape[1] if image is not None else 0
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), num_vision

    def forward(
        self,
        image: torch.Tensor | None = None,  # (B, C, H, W)
        text: torch.Tensor | None = None,  # (B, Nt) token ids
        text_padding_mask: torch.Tensor | None = None,  # (B, Nt) bool, True = padding
        image_mask: torch.Tensor | None = None,  # (B, Np) bool, True = replace by the mask token
        attn_mask: torch.Tensor | None = None,  # (T, S) bool, True = may NOT attend (released semantics)
        text_positions: torch.Tensor | None = None,  # position indices (offset included), for decoding
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Encode an image, a text, or an image-text pair; returns (B, Nv + Nt, D), image tokens first.

        Routing: image tokens (CLS first) go through the vision experts, text tokens through the language
        experts, and in the paper layout both through the vision-language experts of the top layers when
        both are present. ``text_padding_mask`` keys are never attended to and padded positions enter the
        layers as zeros. ``attn_mask`` (T, S) uses the released semantics, True = blocked; with a ``cache``
        S counts the cached positions too, and ``text_padding_mask`` is ignored (as in the release, mask
        padded keys with ``attn_mask`` when decoding).
        """
        if image is None and text is None:
            raise ValueError("give an image, a text, or both")
        if cache is not None and image is not None and len(cache):
            raise ValueError("image tokens come first: feed the image in the first step of a cached decode")
        if len(self.accepts) < len(INPUT_MODES):
            self._check_input_mode(
                image is not None or (cache is not None and cache.num_vision > 0),
                text is not None or (cache is not None and cache.num_text > 0),
            )
        text_start = cache.num_text if cache is not None else 0
        x, num_vision = self.embed(image, text, image_mask, text_positions, text_start)
        b, t, _ = x.shape
        pad = None
        if text_padding_mask is not None:
            if text is None or text_padding_mask.shape != text.shape:
                raise ValueError("text_padding_mask must have the shape of text")
            pad = _padding(text_padding_mask)
        if pad is not None:
            if num_vision:
                pad = torch.cat([pad.new_zeros(b, num_vision), pad], dim=1)
            # As in the release: padded positions enter the layers as zero vectors.
            x = x.masked_fill(pad.unsqueeze(-1), 0.0)
        mask = self._attention_mask(pad if cache is None else None, attn_mask, _compute_dtype(x))
        # Image-text input (the paper layout's vision-language experts apply) counts cached tokens too.
        has_image = num_vision > 0 or (cache is not None and cache.num_vision > 0)
        has_text = t > num_vision or (cache is not None and cache.num_text > 0)
        paired = has_image and has_text
        for i, layer in enumerate(self.encoder.layers):
            part = self._recompute(i) if cache is None else None
            if part == "layer":
                x = checkpoint(layer, x, num_vision, mask, None, i, paired, use_reentrant=False)
            else:
                x = layer(x, num_vision, mask, cache, i, paired, recompute=part)
        if cache is not None:
            cache.advance(num_vision, t - num_vision)
        if self.encoder.layer_norm is not None:
            x = self.encoder.layer_norm(x, num_vision)
        return x  # (B, Nv + Nt, D)

    def forward_grid(
        self,
        image: torch.Tensor,  # (B, C, H, W), H and W multiples of the patch size
        windows: Sequence[int] | None = None,
        out_layers: Sequence[int] | None = None,
        cls_token: bool = True,
    ) -> list[torch.Tensor]:
        """Encode images of any size as patch grids: the hidden states (B, D, H / p, W / p) after each of
        ``out_layers`` (layer indices, default the last), for dense prediction (docs/model.md,
        "Dense-prediction backbone").

        The position table's grid is resized bicubically to the patch grid (:func:`resize_position_grid`;
        unchanged at the model's own size). ``windows``: per layer, the window size of its window
        attention (:class:`beit3.model.layers.WindowGrid`) or 0 for global attention (default: global in
        every layer). ``cls_token``: keep the CLS token (with its position) in the sequence, attending
        globally in every layer; it is not part of the returned grids. The final LayerNorm, where the model
        has it, applies to the last layer's output only. Activation checkpointing and stochastic depth as
        in :meth:`forward`. At the model's own size, global attention and the CLS token kept, the last
        grid is ``forward(image)``'s patch tokens.
        """
        depth = self.cfg.depth
        windows = [0] * depth if windows is None else list(windows)
        if len(windows) != depth or any(w < 0 for w in windows):
            raise ValueError(f"windows: one window size >= 0 per layer ({depth}), got {windows}")
        out_layers = [depth - 1] if out_layers is None else list(out_layers)
        if not out_layers or any(not 0 <= i < depth for i in out_layers):
            raise ValueError(f"out_layers {out_layers}: layer indices in [0, {depth})")
        if "image" not in self.accepts:
            self._check_input_mode(True, False)
        grid = self.vision_embed.patch_grid(image)  # (B, D, rows, cols)
        b, d, rows, cols = grid.shape
        table = self.encoder.embed_positions.A.weight  # (2 unused + CLS + S * S, D)
        x = grid.flatten(2).transpose(1, 2)  # (B, rows * cols, D)
        x = x + resize_position_grid(table[POSITION_OFFSET + 1 :], rows, cols).to(x.dtype)
        if cls_token:
            cls = self.vision_embed.cls_token + table[POSITION_OFFSET]
            x = torch.cat([cls.to(x.dtype).expand(b, -1, -1), x], dim=1)
        lead = int(cls_token)
        grids = {w: WindowGrid(rows, cols, w, lead) for w in set(windows) if w}
        last = max(out_layers)
        outs = {}
        for i, layer in enumerate(self.encoder.layers[: last + 1]):
            t = x.shape[1]
            window = grids.get(windows[i])
            part = self._recompute(i)
            if part == "layer":
                x = checkpoint(layer, x, t, None, None, i, False, window=window, use_reentrant=False)
            else:
                x = layer(x, t, None, None, i, False, recompute=part, window=window)
            if i in out_layers:
                outs[i] = x
        if self.encoder.layer_norm is not None and depth - 1 in outs:
            outs[depth - 1] = self.encoder.layer_norm(outs[depth - 1], outs[depth - 1].shape[1])
        return [outs[i][:, lead:].transpose(1, 2).reshape(b, d, rows, cols) for i in out_layers]

    def forward_mixed(
        self, subbatches: Mapping[str, Mapping[str, torch.Tensor | None]]
    ) -> dict[str, torch.Tensor]:
        """Encode several sub-batches in one pass: ``{name: inputs}`` -> ``{name: (B, Nv + Nt, D)}``.

        Each sub-batch's inputs are those of :meth:`forward` (of :data:`MIXED_INPUTS`: ``image``, ``text``,
        ``text_padding_mask``, ``image_mask``, ``attn_mask``; no cache, default positions), e.g. images, texts
        and image-text pairs of a pretraining micro-batch. The result equals one :meth:`forward` per
        sub-batch in the given order (to rounding), stochastic-depth draws included, but every module's
        parameters are used once: layer by layer, each Linear/LayerNorm expert runs once on the
        concatenation of all the tokens routed to it (image tokens of images and pairs through A, text
        tokens of texts and pairs through B, pair tokens through the vision-language C where a layer has
        it; shared modules on all tokens), the embeddings once each; only the attention (no parameters)
        runs per sub-batch, on its own tensors (no padding across sub-batches).
        """
        names = list(subbatches)
        if not names:
            raise ValueError("give at least one sub-batch")
        subs, shapes = [], []
        for name in names:
            sb = dict(subbatches[name])
            unknown = sorted(set(sb) - set(MIXED_INPUTS))
            if unknown:
                raise ValueError(f"sub-batch {name!r}: unknown inputs {unknown}; known: {list(MIXED_INPUTS)}")
            image, text = sb.get("image"), sb.get("text")
            if image is None and text is None:
                raise ValueError(f"sub-batch {name!r}: give an image, a text, or both")
            if len(self.accepts) < len(INPUT_MODES):
                self._check_input_mode(image is not None, text is not None)
            b = (image if image is not None else text).shape[0]
            nt = 0
            if text is not None:
                nt = text.shape[1]
                if image is not None and text.shape[0] != b:
                    raise ValueError(f"sub-batch {name!r}: {b} images but {text.shape[0]} texts")
                if nt > self.cfg.max_text_len:
                    raise ValueError(
                        f"sub-batch {name!r}: text positions up to {nt} exceed max_text_len "
                        f"{self.cfg.max_text_len}: shorten the text or build the model with a larger "
                        "max_text_positions"
                    )
            pad = sb.get("text_padding_mask")
            if pad is not None:
                if text is None or pad.shape != text.shape:
                    raise ValueError(f"sub-batch {name!r}: text_padding_mask must have the shape of text")
                sb["text_padding_mask"] = _padding(pad)
            subs.append(sb)
            shapes.append((b, self.cfg.num_vision_tokens if image is not None else 0, nt))
        packing = Packing(shapes)
        x = self._embed_packed(subs, packing)
        dtype = _compute_dtype(x)
        masks = []
        for sb, (b, nv, _) in zip(subs, shapes):
            pad = sb.get("text_padding_mask")
            if pad is not None and nv:
                pad = torch.cat([pad.new_zeros(b, nv), pad], dim=1)
            masks.append(self._attention_mask(pad, sb.get("attn_mask"), dtype))
        drops = self._drop_path_rows(packing, dtype, x.device)
        for i, layer in enumerate(self.encoder.layers):
            packed = (packing, masks, drops[i])
            part = self._recompute(i)
            if part == "layer":
                x = checkpoint(layer, x, packed=packed, use_reentrant=False)
            else:
                x = layer(x, packed=packed, recompute=part)
        pieces = [(0, x)]
        if self.encoder.layer_norm is not None:
            pieces = apply_packed([self.encoder.layer_norm], pieces, packing.groups())
        return dict(zip(names, packing.sequences(pieces)))

    def _recompute(self, i: int) -> str | None:
        """What activation checkpointing recomputes of layer ``i`` in this forward (None: nothing)."""
        if i in self.checkpoint_layers and torch.is_grad_enabled():
            return self.checkpoint_part
        return None

    def _embed_packed(self, subs: list[dict], packing: Packing) -> torch.Tensor:
        """Token plus position embeddings of every sub-batch as packed rows (N, D), padded text positions
        zero; the patch embedding, the text embedding and each position table called once."""
        positions = self.encoder.embed_positions
        rows = []
        if packing.vision_order:
            images = [subs[i]["image"] for i in packing.vision_order]
            masks = [subs[i].get("image_mask") for i in packing.vision_order]
            mask = None
            if any(m is not None for m in masks):
                np_ = self.cfg.num_patches
                mask = torch.cat(
                    [
                        m.bool()
                        if m is not None
                        else torch.zeros(img.shape[0], np_, dtype=torch.bool, device=img.device)
                        for img, m in zip(images, masks)
                    ]
                )
            x = self.vision_embed(_cat(images), mask)  # (sum B, Nv, D)
            idx = torch.arange(POSITION_OFFSET, POSITION_OFFSET + x.shape[1], device=x.device)
            rows.append((x + positions.A(idx).to(x.dtype)).flatten(0, 1))
        if packing.text_order:
            texts = [subs[i]["text"] for i in packing.text_order]
            ids = _cat([t.reshape(-1) for t in texts])
            emb = self.text_embed(ids)
            longest = max(t.shape[1] for t in texts)
            idx = torch.arange(POSITION_OFFSET, POSITION_OFFSET + longest, device=emb.device)
            table = positions.B(idx).to(emb.dtype)  # (longest, D)
            start = 0
            for i, t in zip(packing.text_order, texts):
                n, length = t.shape
                x = emb[start : start + n * length].view(n, length, -1) + table[:length]
                start += n * length
                pad = subs[i].get("text_padding_mask")
                if pad is not None:
                    # As in the release: padded positions enter the layers as zero vectors.
                    x = x.masked_fill(pad.unsqueeze(-1), 0.0)
                rows.append(x.flatten(0, 1))
        return _cat(rows)

    def _drop_path_rows(self, packing: Packing, dtype: torch.dtype, device: torch.device) -> list:
        """Per layer, ``(attention keep mask, FFN keep mask, keep probability)`` of its stochastic depth (None
        where off): (N, 1) per-row masks drawn in the order one forward per sub-batch would draw them
        (sub-batch by sub-batch, then layer by layer, attention before FFN), so that both give the same
        draws, and the keep probability as a 0-d tensor (see ``DropPath.keep_prob``)."""
        layers = self.encoder.layers
        active = [layer.drop_path is not None and layer.drop_path.training for layer in layers]
        draws: list[list[list[torch.Tensor]]] = [[[], []] for _ in layers]  # layer -> branch -> per sub
        for b, nv, nt in packing.shapes:
            for i, layer in enumerate(layers):
                if active[i]:
                    for branch in draws[i]:
                        branch.append(layer.drop_path.sample(b, dtype, device).expand(b, nv + nt, 1))
        return [
            (*(packing.pack(branch) for branch in d), layer.drop_path.keep_prob(device)) if on else None
            for d, on, layer in zip(draws, active, layers)
        ]

    @staticmethod
    def _attention_mask(
        pad: torch.Tensor | None, attn_mask: torch.Tensor | None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor | None:
        """One additive SDPA mask (0 = may attend, -inf = blocked) in the queries' dtype, built once per
        forward (SDPA would convert a boolean mask in every layer), or None so that SDPA may use its fastest
        (flash) kernel."""
        allowed = None
        if pad is not None:
            allowed = ~pad[:, None, None, :]  # (B, 1, 1, S)
        if attn_mask is not None:
            a = ~attn_mask.bool()[None, None]  # (1, 1, T, S)
            allowed = a if allowed is None else allowed & a
        if allowed is None:
            return None
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, float("-inf")
        )


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _padding(text_padding_mask: torch.Tensor) -> torch.Tensor | None:
    """The padding mask as bool, or None when it pads nothing and that is known without a device
    synchronisation (a CPU tensor): then SDPA gets no mask and may take its flash kernel. Callers with
    device tensors pass None themselves when nothing is padded (pretraining's prepare_batch does)."""
    pad = text_padding_mask.bool()
    # tolist: a host read of host data, no torch op (nothing an op trace of the step counts as a sync)
    if pad.device.type == "cpu" and not any(map(any, pad.tolist())):
        return None
    return pad


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layers' matmuls produce from ``x``: autocast's where it is on, else ``x``'s."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


# The modules Magneto's init scales up by sqrt(log 2L) (torchscale's Sub-LN rule), matched as whole names.
MAGNETO_SCALED = ("fc1", "fc2", "out_proj", "v_proj")


# Dynamo's per-function recompile limit while layers are compiled (torch's default is 8): the distinct
# layer structures times the padding-mask variants of the sub-batches, with room.
RECOMPILE_LIMIT = 32


class BEiT3Model(nn.Module):
    """Backbone plus the pretraining heads (``mlm_head`` over text ids, ``mim_head`` over visual tokens).

    ``forward`` returns the final hidden states (B, N, D), image tokens (CLS first) before text tokens.
    The heads are applied by the objective, at masked positions only.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.beit3 = BEiT3(cfg)
        if cfg.pretraining_heads:
            self.mlm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
            self.mim_head = nn.Linear(cfg.embed_dim, cfg.visual_vocab_size)
        else:
            self.mlm_head = self.mim_head = None
        self.compiled: str | None = None  # the torch.compile backend of the layers (compile_layers)
        self.init_weights()

    def forward(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_padding_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        text_positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, Nv + Nt, D); see :meth:`BEiT3.forward` for the arguments."""
        return self.beit3(
            image=image,
            text=text,
            text_padding_mask=text_padding_mask,
            image_mask=image_mask,
            attn_mask=attn_mask,
            text_positions=text_positions,
            cache=cache,
        )

    def forward_mixed(
        self, subbatches: Mapping[str, Mapping[str, torch.Tensor | None]]
    ) -> dict[str, torch.Tensor]:
        """Several sub-batches in one pass, each module once: see :meth:`BEiT3.forward_mixed`."""
        return self.beit3.forward_mixed(subbatches)

    def new_cache(self) -> KVCache:
        """An empty key/value cache for incremental decoding (pass it as ``cache=`` step after step)."""
        return KVCache(self.cfg.depth)

    def set_grad_checkpointing(
        self, enable: bool = True, layers: list[int] | None = None, part: str = "layer"
    ) -> None:
        """Recompute the activations of ``layers`` (all when None) in the backward pass: of each whole
        layer (``part="layer"``), or of its attention branch or FFN branch only (``"attention"``,
        ``"ffn"``: the other branch's activations are saved as without checkpointing)."""
        self.beit3.set_grad_checkpointing(enable, layers, part)

    def compile_layers(self, backend: str | None = "inductor", mode: str | None = None) -> None:
        """``torch.compile`` every layer's packed path (``MultiwayBlock.forward_packed``, what
        :meth:`forward_mixed` runs, directly or recomputed under activation checkpointing); ``backend=None``
        restores eager layers. Layers of one structure share their compiled graphs: nothing inside a layer
        reads a per-layer number (stochastic depth comes in as tensors), so 40 layers with drop path give
        about three graphs (the first layer without drop path, the others, those with vision-language
        experts), times the padding-mask variants of the sub-batches. Shapes are static (``dynamic=False``):
        give fixed text lengths, or each new length compiles again. Dynamo's recompile limit is raised to
        :data:`RECOMPILE_LIMIT` if lower; past it a variant runs eager and dynamo logs a warning. The
        sequence path (:meth:`forward`, decoding with a cache) stays eager.
        """
        layers = self.beit3.encoder.layers
        for layer in layers:
            layer.__dict__.pop("forward_packed", None)  # the eager method again
        self.compiled = backend
        if backend is None:
            return
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        for layer in layers:
            eager = type(layer).forward_packed.__get__(layer)
            layer.forward_packed = torch.compile(eager, backend=backend, mode=mode, dynamic=False)

    @staticmethod
    def compile_stats() -> dict[str, int]:
        """What torch.compile did in this process so far: ``graphs`` (distinct compiled graphs), ``frames``
        (functions compiled, recompiles included) and ``graph_breaks``."""
        from torch._dynamo.utils import counters

        return {
            "graphs": int(counters["stats"].get("unique_graphs", 0)),
            "frames": int(counters["frames"].get("ok", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
        }

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides 1-D ones (biases, norms)."""
        return {
            "beit3.vision_embed.cls_token",
            "beit3.vision_embed.mask_token",
            "beit3.encoder.embed_positions.A.weight",
            "beit3.encoder.embed_positions.B.weight",
        }

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation for pretraining from scratch (see docs/model.md, "Initialisation").

        ``beit`` (default, the paper's choice): truncated normal(0.02) for every Linear, then the output
        projections of layer l (attention ``out_proj``, FFN ``fc2``) divided by sqrt(2l).
        ``magneto`` (torchscale's Sub-LN rule): Xavier-uniform, then ``fc1``, ``fc2``, ``v_proj`` and
        ``out_proj`` multiplied by sqrt(log(2L)).
        """
        cfg = self.cfg
        std = 0.02
        for m in self.modules():
            if isinstance(m, nn.Linear):
                # A fused q/k/v projection block by block, as the three Linears it stands for: same fans,
                # same draws in the same order.
                blocks = [m.block(p) for p in QKV_DISK_ORDER] if isinstance(m, FusedQKV) else [m.weight]
                for w in blocks:
                    if cfg.init == "beit":
                        nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
                    else:
                        nn.init.xavier_uniform_(w)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        b3 = self.beit3
        nn.init.normal_(b3.text_embed.weight, std=std)
        for p in (
            b3.vision_embed.cls_token,
            b3.vision_embed.mask_token,
            b3.encoder.embed_positions.A.weight,
            b3.encoder.embed_positions.B.weight,
        ):
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
        for layer_id, layer in enumerate(b3.encoder.layers, start=1):
            for name, p in layer.named_parameters():
                if not name.endswith("weight") or p.dim() != 2:
                    continue
                if cfg.init == "beit" and (".out_proj" in f".{name}" or ".fc2" in name):
                    p.div_(math.sqrt(2.0 * layer_id))
                elif cfg.init == "magneto" and any(f".{k}." in f".{name}" for k in MAGNETO_SCALED):
                    p.mul_(math.sqrt(math.log(2 * cfg.depth)))
            fused = layer.self_attn.qkv_proj  # its name matches none of MAGNETO_SCALED: scale v's rows
            if cfg.init == "magneto" and fused is not None:
                fused.block("v_proj").mul_(math.sqrt(math.log(2 * cfg.depth)))
