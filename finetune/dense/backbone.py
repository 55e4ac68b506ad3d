"""The BEiT-3 vision encoder as a dense-prediction backbone: ViTDet's simple feature pyramid on its grid.

Following ViTDet (Li et al., 2022, "Exploring Plain Vision Transformer Backbones for Object Detection"),
the four maps ``p2``..``p5`` (4x, 2x, 1x and 1/2x the patch grid's resolution) are built from the last
layer's patch grid by deconvolutions, identity and max pooling, each then projected to ``out_channels`` by a
1x1 and a 3x3 convolution, each followed by a LayerNorm over channels; ``out_layers`` takes each level
from a chosen layer instead (BEiT's segmentation recipe feeds layers 3, 5, 7, 11 of a base model to the four
levels). The encoder may use window attention in most layers and global attention in a few
(:meth:`beit3.model.beit3.BEiT3.forward_grid`, :class:`beit3.model.layers.WindowGrid`).

Sizes: images (B, 3, H, W) with H and W multiples of the patch size p. ``p4`` is the patch grid
(H / p, W / p); ``p2`` and ``p3`` are 4x and 2x it, ``p5`` its max pooling by 2 (floor for an odd grid).
For patch 16 the strides are the usual 4, 8, 16, 32; a patch-14 model (the paper's giant) reports its true
strides 3.5, 7, 14, 28 (:attr:`DenseBackbone.strides`): the maps are not resampled to a stride-16 grid, so
nothing of the encoder's resolution is lost or invented. :attr:`DenseBackbone.size_divisibility` (2p) is
the side multiple at which every level is exactly H / stride (pad the images to it, as detectron2 does).

Weights: the backbone's encoder sits under ``beit3.`` (released key names), the pyramid under
``pyramid.``; so :func:`beit3.finetune.reload.load_pretrained` loads a released or project checkpoint into
it directly and reports the pyramid as fresh (a task spec's ``backbone`` hook may return this module).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from beit3.engine.config_io import bounded
from beit3.finetune.errors import FinetuneError
from beit3.model import BEiT3Model

LEVELS = ("p2", "p3", "p4", "p5")
SCALES = (4.0, 2.0, 1.0, 0.5)  # each level's resolution relative to the patch grid


class DenseBackboneError(FinetuneError, ValueError):
    """A dense backbone setting that cannot be built (window sizes, layers, channels)."""


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W) maps, as ViTDet normalises its pyramid. (timm has one,
    but importing timm imports torchvision, whose compiled ops do not load with the CPU build of torch.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def default_global_layers(depth: int) -> list[int]:
    """ViTDet's choice: global attention in the last layer of each quarter of the encoder (2, 5, 8, 11 of
    12 layers; 5, 11, 17, 23 of 24), window attention elsewhere."""
    return sorted({max(round((k + 1) * depth / 4) - 1, 0) for k in range(4)})


def window_sizes(depth: int, window_size: int, global_layers: Sequence[int] | None) -> list[int]:
    """Per layer, its window size (0 = global attention): ``window_size`` everywhere except
    ``global_layers`` (default :func:`default_global_layers`); all global when ``window_size`` is 0."""
    if window_size < 0:
        raise DenseBackboneError(f"window_size={window_size}: give 0 (global attention) or a positive size")
    if not window_size:
        return [0] * depth
    glob = default_global_layers(depth) if global_layers is None else list(global_layers)
    bad = [i for i in glob if not 0 <= i < depth]
    if bad:
        raise DenseBackboneError(f"global_layers {bad} out of range for an encoder of depth {depth}")
    return [0 if i in glob else window_size for i in range(depth)]


@dataclass
class BackboneSettings:
    """A dense task's backbone settings as recipe data: embed it in the task's recipe table (``backbone:
    BackboneSettings = field(default_factory=BackboneSettings)``, TOML ``[<task>.backbone]``), check it with
    :meth:`problem` and build with :meth:`build`, so every dense task reads the same keys."""

    window_size: int = bounded(0, "[0, inf)")  # window attention (0: global attention in every layer)
    global_layers: list[int] = bounded(interval="[0, inf)", factory=list)  # []: ViTDet's four, evenly spaced
    out_layers: list[int] = bounded(interval="[0, inf)", factory=list)  # []: every level from the last layer
    cls_token: bool = True  # keep the CLS token (global in every layer); False: drop it, as ViTDet

    def problem(self, depth: int, where: str = "backbone") -> str | None:
        """What is wrong with these settings for an encoder of ``depth`` layers (naming ``where.key`` and the
        fix), or None."""
        bad = [i for i in self.global_layers if i >= depth]
        if bad:
            return f"{where}.global_layers {bad} out of range: the model has {depth} layers (0..{depth - 1})"
        if self.out_layers and (len(self.out_layers) != len(LEVELS) or max(self.out_layers) >= depth):
            return (
                f"{where}.out_layers {self.out_layers}: give four layer indices in [0, {depth}), one per "
                "level p2..p5, or [] for the last layer"
            )
        return None

    def build(self, encoder: BEiT3Model, out_channels: int) -> DenseBackbone:
        """The :class:`DenseBackbone` of ``encoder`` with these settings."""
        return DenseBackbone(
            encoder,
            out_channels,
            window_size=self.window_size,
            global_layers=self.global_layers or None,
            out_layers=self.out_layers or None,
            cls_token=self.cls_token,
        )


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: from (B, D, h, w) grids to ``p2``..``p5`` maps of ``channels``."""

    def __init__(self, dim: int, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % 4:
            raise DenseBackboneError(f"the encoder width {dim} must be a multiple of 4 for the pyramid")
        half, quarter = dim // 2, dim // 4
        self.resample = nn.ModuleDict(
            {
                "p2": nn.Sequential(
                    nn.ConvTranspose2d(dim, half, 2, stride=2),
                    LayerNorm2d(half, eps=eps),
                    nn.GELU(),
                    nn.ConvTranspose2d(half, quarter, 2, stride=2),
                ),
                "p3": nn.ConvTranspose2d(dim, half, 2, stride=2),
                "p4": nn.Identity(),
                "p5": nn.MaxPool2d(2, stride=2),
            }
        )
        widths = {"p2": quarter, "p3": half, "p4": dim, "p5": dim}
        self.project = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Conv2d(widths[name], channels, 1, bias=False),
                    LayerNorm2d(channels, eps=eps),
                    nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                    LayerNorm2d(channels, eps=eps),
                )
                for name in LEVELS
            }
        )
        for m in self.project.modules():
            if isinstance(m, nn.Conv2d):  # detectron2's c2_xavier_fill, as ViTDet's pyramid
                nn.init.kaiming_uniform_(m.weight, a=1)

    def flops(self, rows: int, cols: int) -> float:
        """Training FLOPs of one image's pyramid from a ``rows`` x ``cols`` grid: 6 per multiply-add of every
        (transposed) convolution (forward, input and weight gradients)."""
        macs = 0
        for name in LEVELS:
            pixels = rows * cols  # at the input of each module in turn
            for m in self.resample[name].modules():
                if isinstance(m, nn.ConvTranspose2d):  # in x out x kernel area per input pixel
                    macs += pixels * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                    pixels *= m.stride[0] * m.stride[1]
                elif isinstance(m, nn.MaxPool2d):
                    pixels = (rows // 2) * (cols // 2)
            for m in self.project[name].modules():
                if isinstance(m, nn.Conv2d):
                    macs += pixels * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        return 6.0 * macs

    def forward(self, grids: Sequence[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """``grids``: one (B, D, h, w) grid per level (the same one four times for the last-layer pyramid)."""
        return OrderedDict(
            (name, self.project[name](self.resample[name](g))) for name, g in zip(LEVELS, grids)
        )


class DenseBackbone(nn.Module):
    """A pruned vision encoder (``build_encoder(name, "vision")``) plus a simple feature pyramid.

    ``forward(images)`` -> ``OrderedDict(p2=..., p3=..., p4=..., p5=...)``, each (B, ``out_channels``,
    H * s / p, W * s / p) for s in 4, 2, 1, 1/2 (torchvision's detection models take such a dict and read
    ``out_channels``). ``window_size`` > 0: window attention in every layer but ``global_layers``
    (default: ViTDet's four evenly spaced ones); ``windows`` gives the window size of every layer instead
    (0 = global). ``out_layers``: None (every level from the last layer) or four layer indices, one per
    level, p2 first. ``cls_token``: keep the CLS token in the encoder's sequence (a global token in every
    layer, as in pretraining) or drop it, as ViTDet does. Stochastic depth is the encoder's
    (``drop_path_rate`` when building it); activation checkpointing: :meth:`set_grad_checkpointing`.
    """

    def __init__(
        self,
        encoder: BEiT3Model,
        out_channels: int = 256,
        *,
        window_size: int = 0,
        global_layers: Sequence[int] | None = None,
        windows: Sequence[int] | None = None,
        out_layers: Sequence[int] | None = None,
        cls_token: bool = True,
    ) -> None:
        super().__init__()
        cfg = encoder.cfg
        if "image" not in encoder.beit3.accepts or encoder.beit3.vision_embed is None:
            raise DenseBackboneError(
                "the dense backbone needs a vision encoder: build it with build_encoder(name, 'vision')"
            )
        if out_channels <= 0:
            raise DenseBackboneError(f"out_channels={out_channels} must be positive")
        if windows is None:
            windows = window_sizes(cfg.depth, window_size, global_layers)
        elif len(windows) != cfg.depth or any(w < 0 for w in windows):
            raise DenseBackboneError(
                f"windows: one size >= 0 (0 = global) per layer ({cfg.depth}), got {windows}"
            )
        if out_layers is not None and (
            len(out_layers) != len(LEVELS) or any(not 0 <= i < cfg.depth for i in out_layers)
        ):
            raise DenseBackboneError(
                f"out_layers {list(out_layers)}: four layer indices in [0, {cfg.depth}), one per level "
                "p2..p5, or None for the last layer"
            )
        self.cfg = cfg
        self.beit3 = encoder.beit3
        self._no_weight_decay = encoder.no_weight_decay()
        self.windows = list(windows)
        self.out_layers = None if out_layers is None else list(out_layers)
        self.cls_token = cls_token
        self.out_channels = out_channels
        self.pyramid = SimpleFeaturePyramid(cfg.embed_dim, out_channels)
        self.strides = {name: cfg.patch_size / s for name, s in zip(LEVELS, SCALES)}
        self.size_divisibility = 2 * cfg.patch_size
        self._prune_unused()

    def _prune_unused(self) -> None:
        """Drop what the forward never uses, as the finetuning configurations do (under ZeRO-3 a parameter
        without a gradient gets its last one re-applied, docs/engine.md): the layers above the highest of
        ``out_layers`` and then the final LayerNorm, the CLS token when it is dropped. A checkpoint's keys
        for them are reported unused on reload."""
        encoder = self.beit3.encoder
        last = max(self.out_layers or [self.cfg.depth - 1])
        if last < self.cfg.depth - 1:
            del encoder.layers[last + 1 :]
            encoder.layer_norm = None
        if not self.cls_token:
            self.beit3.vision_embed.cls_token = None

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Feature maps ``p2``..``p5`` of (B, 3, H, W) images, H and W multiples of the patch size."""
        if images.dim() == 4 and min(images.shape[-2:]) < self.size_divisibility:
            raise ValueError(
                f"images of {tuple(images.shape[-2:])} pixels: p5 needs at least {self.size_divisibility} "
                "(two patches) per side; pad them to a multiple of backbone.size_divisibility"
            )
        layers = self.out_layers or [self.cfg.depth - 1]
        grids = self.beit3.forward_grid(images, self.windows, layers, cls_token=self.cls_token)
        if len(grids) == 1:
            grids = grids * len(LEVELS)
        return self.pyramid(grids)

    def training_flops(self, images: int, height: int, width: int) -> float:
        """Training FLOPs (forward and backward) of ``images`` images of ``height`` x ``width`` through the
        encoder and the pyramid, in the terms of :mod:`beit3.model.flops`: 6 per weight and position (the
        patch projection 4: the image needs no gradient), attention 12 x width per query-key pair (a window
        layer counts its padded windows, which it computes), each convolution 6 per multiply-add;
        recomputation under activation checkpointing not counted. For a task's ``batch_stats``; equal to
        torch's FlopCounterMode count (tested)."""
        cfg, p = self.cfg, self.cfg.patch_size
        rows, cols = height // p, width // p
        lead, n = int(self.cls_token), rows * cols
        tokens = lead + n
        depth = max(self.out_layers or [cfg.depth - 1]) + 1  # the layers forward runs
        d = cfg.embed_dim
        total = 4.0 * n * cfg.in_chans * p * p * d  # patch projection, per image
        total += depth * tokens * 6.0 * (4 * d * d + 2 * d * cfg.ffn_dim)
        for size in self.windows[:depth]:
            if size:
                padded = -(-rows // size) * size * -(-cols // size) * size
                total += 12.0 * d * (padded * (lead + size * size) + lead * tokens)
            else:
                total += 12.0 * d * tokens * tokens
        return images * (total + self.pyramid.flops(rows, cols))

    def set_grad_checkpointing(
        self, enable: bool = True, layers: list[int] | None = None, part: str = "layer"
    ) -> None:
        """Activation checkpointing of encoder layers, as :meth:`BEiT3Model.set_grad_checkpointing`."""
        self.beit3.set_grad_checkpointing(enable, layers, part)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) exempt from weight decay besides 1-D ones; a task that
        holds the backbone as ``backbone`` prefixes them with ``backbone.``."""
        return set(self._no_weight_decay)
