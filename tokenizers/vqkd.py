"""VQ-KD visual tokenizer (BEiT v2): model, named configs, released-checkpoint loading, frozen wrapper.

``VQKD`` maps images in [0, 1] to a grid of codebook ids. Images are rescaled to [-1, 1] inside (BEiT v2's
``process_type='default'``), encoded by a ViT, projected to 32-d by ``encode_task_layer`` (fp32) and
quantized to the nearest of 8192 unit-norm codes. For training, a ViT decoder on the code map and
``decode_task_layer`` reconstruct a frozen teacher's patch features (cosine loss).

The pretraining objective uses only::

    tok = build_visual_tokenizer(name, checkpoint, device)   # frozen VisualTokenizer
    codes = tok.codes(images)                                  # (B, h*w) int64, images (B, 3, H, W) in [0, 1]

Patch-14 models (BEiT-3 giant, 16x16 patches at 224 px): the patch-16 tokenizer is given a 256 px view of
the same crop (``input_size=256``): its 16x16 code grid then covers the crop exactly like the model's 16x16
patch grid, code ``k`` (row-major) sitting on patch ``k``. Positions are bicubically interpolated from the
tokenizer's 14x14 table, as BEiT v2 does for other resolutions.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from beit3.tokenizers.errors import TokenizersError
from beit3.tokenizers.quantizer import NormEMAVectorQuantizer
from beit3.tokenizers.vit import VisionTransformer, ViTConfig

DROPPED_PREFIXES = ("loss", "teacher", "scaling")  # released checkpoints carry these; the tokenizer does not
OPTIONAL_KEYS = (
    "quantize.embedding.cluster_size",
    "quantize.embedding.embed_avg",
    "quantize.embedding.initted",
)


class VQKDConfigError(TokenizersError, ValueError):
    """Unknown tokenizer name, bad override or checkpoint that does not fit; the message names the fix."""


@dataclass(frozen=True)
class VQKDConfig:
    """Shape of a VQ-KD tokenizer. ``teacher_dim`` is the reconstruction target width (CLIP B/16: 512)."""

    img_size: int = 224
    patch_size: int = 16
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_dim: int = 768
    decoder_depth: int = 3
    decoder_heads: int = 12
    codebook_size: int = 8192
    code_dim: int = 32
    teacher_dim: int = 512
    decay: float = 0.99
    beta: float = 1.0

    @property
    def grid_size(self) -> int:
        """Codes per side at ``img_size``."""
        return self.img_size // self.patch_size

    def encoder(self) -> ViTConfig:
        """The encoder ViT's shape."""
        return ViTConfig(
            self.img_size, self.patch_size, 3, self.encoder_dim, self.encoder_depth, self.encoder_heads
        )

    def decoder(self) -> ViTConfig:
        """The decoder ViT's shape."""
        # The decoder reads the (code_dim, h, w) code map as an image with 1x1 patches.
        return ViTConfig(
            self.grid_size, 1, self.code_dim, self.decoder_dim, self.decoder_depth, self.decoder_heads
        )


_CONFIGS: dict[str, VQKDConfig] = {
    # Released BEiT v2 tokenizers (CLIP ViT-B/16 teacher -> 512-d targets, DINO ViT-B/16 -> 768-d).
    "vqkd_encoder_base_decoder_1x768x12_clip": VQKDConfig(decoder_depth=1),
    "vqkd_encoder_base_decoder_3x768x12_clip": VQKDConfig(decoder_depth=3),
    "vqkd_encoder_base_decoder_1x768x12_dino": VQKDConfig(decoder_depth=1, teacher_dim=768),
    # Tests and the CPU demo: 64 px -> 4x4 codes; teacher_dim 96 = the MobileNetV2 stride-16 stand-in.
    "vqkd_tiny_patch16_64": VQKDConfig(
        img_size=64,
        encoder_dim=64,
        encoder_depth=2,
        encoder_heads=2,
        decoder_dim=64,
        decoder_depth=1,
        decoder_heads=2,
        codebook_size=1024,
        teacher_dim=96,
    ),
    "vqkd_small_patch16_64": VQKDConfig(
        img_size=64,
        encoder_dim=192,
        encoder_depth=4,
        encoder_heads=3,
        decoder_dim=192,
        decoder_depth=1,
        decoder_heads=3,
        codebook_size=1024,
        teacher_dim=96,
    ),
}


def list_vqkd() -> list[str]:
    """Registered tokenizer names."""
    return sorted(_CONFIGS)


def get_vqkd_config(name: str, **overrides) -> VQKDConfig:
    """The named config with ``overrides`` (e.g. ``codebook_size=256``)."""
    if name not in _CONFIGS:
        raise VQKDConfigError(f"unknown visual tokenizer {name!r}; known: {', '.join(list_vqkd())}")
    try:
        return replace(_CONFIGS[name], **overrides)
    except TypeError as err:
        raise VQKDConfigError(f"bad override for {name}: {err}") from err


class VQKD(nn.Module):
    """The VQ-KD tokenizer with the released module names (``encoder``, ``quantize``, ``decoder``, ...)."""

    def __init__(self, cfg: VQKDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg.encoder())
        self.decoder = VisionTransformer(cfg.decoder())
        self.quantize = NormEMAVectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.decay)
        e, d = cfg.encoder_dim, cfg.decoder_dim
        self.encode_task_layer = nn.Sequential(nn.Linear(e, e), nn.Tanh(), nn.Linear(e, cfg.code_dim))
        self.decode_task_layer = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, cfg.teacher_dim))
        for layer in (*self.encode_task_layer, *self.decode_task_layer):
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    @staticmethod
    def pre_process(images: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> [-1, 1] (BEiT v2 ``process_type='default'``)."""
        return images * 2.0 - 1.0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantization code vectors (B, h*w, code_dim) in fp32 of images in [0, 1]."""
        h = self.encoder(self.pre_process(images))
        # The task layer runs in fp32 even under autocast (released behaviour: tanh and the 32-d projection
        # are sensitive to bf16/fp16 rounding).
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.encode_task_layer(h.float())

    def drop_decoder(self) -> VQKD:
        """Free the decoder and its task layer (about half the weights): a frozen tokenizer only encodes.
        ``decode`` and ``forward`` are unavailable afterwards."""
        self.decoder = None
        self.decode_task_layer = None
        return self

    def decode(self, z_q: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Teacher-feature reconstruction (B, h*w, teacher_dim) from quantized vectors (B, h*w, code_dim)."""
        if self.decoder is None:
            raise VQKDConfigError("this VQ-KD was made encoder-only (drop_decoder): it cannot reconstruct")
        B, _, C = z_q.shape
        code_map = z_q.transpose(1, 2).reshape(B, C, *grid)
        return self.decode_task_layer(self.decoder(code_map))

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Code ids (B, h*w), row-major over the patch grid, of images (B, 3, H, W) in [0, 1]."""
        return self.quantize.lookup(self.encode(images))

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training step outputs: ``loss`` (quant + rec), ``loss_rec``, ``loss_quant``, ``ids``, ``z``."""
        grid = (images.shape[-2] // self.cfg.patch_size, images.shape[-1] // self.cfg.patch_size)
        z = self.encode(images)
        z_q, loss_quant, ids = self.quantize(z)
        rec = self.decode(z_q, grid)
        loss_rec = cosine_reconstruction_loss(rec, targets)
        return {
            "loss": loss_quant + loss_rec,
            "loss_rec": loss_rec,
            "loss_quant": loss_quant,
            "ids": ids,
            "z": z,
        }


def cosine_reconstruction_loss(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(rec, target) (BEiT v2's ``rec_loss_type='cosine'``)."""
    if rec.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(rec.shape)} and teacher target {tuple(target.shape)} differ")
    return (1 - F.cosine_similarity(rec.float(), target.float(), dim=-1)).mean()


def build_vqkd(name: str, device: str | torch.device | None = None, seed: int = 0, **overrides) -> VQKD:
    """A seeded, randomly initialised VQ-KD of the named config."""
    cfg = get_vqkd_config(name, **overrides)
    place = torch.device(device) if device is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), place:
        torch.manual_seed(seed)
        return VQKD(cfg)


def clean_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The tokenizer weights of a checkpoint: ``["model"]`` (or ``["state_dict"]``, or the dict itself)
    without the keys starting with ``loss``, ``teacher`` or ``scaling`` (as the release's loader drops them).
    """
    sd = checkpoint.get("model", checkpoint.get("state_dict", checkpoint))
    return {k: v for k, v in sd.items() if not k.startswith(DROPPED_PREFIXES)}


def _read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise VQKDConfigError(f"tokenizer checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_vqkd_checkpoint(model: VQKD, checkpoint: str | Path | dict) -> None:
    """Load a released-layout checkpoint strictly (only the release's unused leftovers may be absent)."""
    if not isinstance(checkpoint, dict):
        checkpoint = _read_checkpoint(checkpoint)
    sd = clean_state_dict(checkpoint)
    own = model.state_dict()
    for key in OPTIONAL_KEYS:
        sd.setdefault(key, own[key])
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise VQKDConfigError(
            f"checkpoint does not fit tokenizer config {model.cfg}: {err}. Pick the registry name the "
            "checkpoint was trained with (list_vqkd())"
        ) from err


def save_vqkd_checkpoint(model: VQKD, path: str | Path, **extra) -> None:
    """Write ``{"model": state_dict, **extra}`` (released layout; no teacher keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model": sd, **extra}, path)


class VisualTokenizer(nn.Module):
    """A frozen VQ-KD: ``codes(images)`` -> (B, h*w) ids; eval mode, no gradients, batched."""

    def __init__(self, model: VQKD, input_size: int | None = None, batch_size: int = 256) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.input_size = int(input_size or model.cfg.img_size)
        if self.input_size % model.cfg.patch_size:
            raise VQKDConfigError(
                f"input_size {self.input_size} is not a multiple of the tokenizer patch "
                f"{model.cfg.patch_size}"
            )
        self.batch_size = batch_size

    @property
    def grid(self) -> tuple[int, int]:
        """Code grid (h, w) at ``input_size``."""
        n = self.input_size // self.model.cfg.patch_size
        return (n, n)

    @property
    def codebook_size(self) -> int:
        """Number of codes (ids are in [0, codebook_size))."""
        return self.model.cfg.codebook_size

    def train(self, mode: bool = True) -> VisualTokenizer:
        """Stays in eval mode whatever ``mode`` says."""
        # Frozen: never leaves eval mode, whatever a parent module asks.
        return super().train(False)

    @torch.no_grad()
    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """Ids (B, h*w) int64 of images (B, 3, input_size, input_size) in [0, 1], on the images' device."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            raise VQKDConfigError(
                f"tokenizer images are {tuple(images.shape[-2:])} but the tokenizer expects "
                f"{self.input_size} px: "
                "resize the tokenizer view of the crop (data tokenizer_img_size) or build with input_size"
            )
        weight = self.model.encoder.patch_embed.proj.weight
        # bf16 autocast for the ViT on CUDA; the task layer and the code search stay fp32 (VQKD.encode).
        use_bf16 = weight.is_cuda and torch.cuda.is_bf16_supported()
        out = []
        for chunk in images.split(self.batch_size):
            chunk = chunk.to(weight.device, torch.float32)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
            with autocast:
                out.append(self.model.get_codebook_indices(chunk))
        return torch.cat(out).to(images.device)


def build_visual_tokenizer(
    name: str,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    input_size: int | None = None,
    **overrides,
) -> VisualTokenizer:
    """The frozen tokenizer ``name`` with weights from ``checkpoint`` ({"model": sd}, released layout).

    A checkpoint's ``"overrides"`` entry (written by ``beit3-vqkd train``) is applied before ``overrides``.
    ``checkpoint=None`` gives a seeded random initialisation: its codes carry no meaning (smoke tests only;
    a warning says so). ``input_size`` (default the config's ``img_size``) sets the view size the tokenizer
    receives, e.g. 256 for 16x16 codes from a patch-16 tokenizer. The decoder is dropped once the weights are
    loaded: codes need the encoder alone, so only it goes to the device.
    """
    state = None
    if checkpoint is not None:
        state = checkpoint if isinstance(checkpoint, dict) else _read_checkpoint(checkpoint)
        # Checkpoints written by `beit3-vqkd train` record the config overrides they were trained with.
        overrides = {**state.get("overrides", {}), **overrides}
    model = build_vqkd(name, **overrides)
    if state is None:
        warnings.warn(
            f"visual tokenizer {name} has random weights (no checkpoint): its codes are only fit for smoke "
            "tests; train one with `beit3-vqkd train` or give the released BEiT v2 checkpoint",
            stacklevel=2,
        )
    else:
        load_vqkd_checkpoint(model, state)
    tok = VisualTokenizer(model.drop_decoder(), input_size)  # the step needs the encoder alone on the device
    return tok.to(device) if device is not None else tok


@torch.no_grad()
def precompute_codes(
    tokenizer: VisualTokenizer, images: Iterable[torch.Tensor], batch_size: int = 64
) -> torch.Tensor:
    """Codes (N, h*w) of a fixed-view image dataset: an iterable of (3, S, S) tensors or (B, 3, S, S) batches
    in [0, 1] at the tokenizer's ``input_size`` (e.g. a Dataset or DataLoader without augmentation).
    """
    out, pending = [], []

    def flush() -> None:
        if pending:
            out.append(tokenizer.codes(torch.cat(pending)).cpu())
            pending.clear()

    for item in images:
        item = item[0] if isinstance(item, tuple | list) else item
        pending.append(item if item.dim() == 4 else item.unsqueeze(0))
        if sum(p.shape[0] for p in pending) >= batch_size:
            flush()
    flush()
    if not out:
        return torch.empty(0, tokenizer.grid[0] * tokenizer.grid[1], dtype=torch.long)
    return torch.cat(out)
