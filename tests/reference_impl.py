"""The reference implementation (torchscale 0.3.0 ``BEiT3``) as a test oracle, and how to reach it.

torchscale is never a runtime dependency: ``scripts/install.sh --tests`` installs it with ``--no-deps`` into
``.cache/reference`` (next to fairscale 0.4.0, which it imports). Its only use of timm is ``drop_path``
(and, in other torchscale versions, ``trunc_normal_``); timm 0.6.13 would drag in torchvision and a CUDA
torch, so this module registers a small stand-in ``timm`` package in ``sys.modules`` before importing it.

Used by ``tests/test_model_parity.py`` and ``bench/model_vs_reference.py``.
"""

from __future__ import annotations

import math
import os
import sys
import types
from pathlib import Path

import torch

from beit3.model import BEiT3Model, ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT / ".cache" / "reference"
INSTALL_HINT = (
    "run `bash scripts/install.sh --tests` (it runs `pip install --no-deps --target .cache/reference "
    "torchscale==0.3.0 fairscale==0.4.0`)"
)


class ReferenceUnavailable(RuntimeError):
    """torchscale is not installed under ``.cache/reference``."""


def reference_available() -> bool:
    """Whether the reference implementation is installed where the tests look for it."""
    return (REFERENCE_DIR / "torchscale" / "model" / "BEiT3.py").is_file() and (
        REFERENCE_DIR / "fairscale"
    ).is_dir()


def running_in_ci() -> bool:
    """CI sets CI=true; there a missing reference is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth with timm's signature: zero whole samples with probability ``drop_prob``."""
    if drop_prob is None or drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return x * x.new_empty(shape).bernoulli_(keep) / keep


def _trunc_normal_(
    tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
) -> torch.Tensor:
    """timm's signature over torch's own truncated normal (cut-offs ``a``/``b`` are absolute values)."""
    return torch.nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def _install_timm_shim() -> None:
    """Register ``timm``, ``timm.models`` and ``timm.models.layers`` holding the functions torchscale uses."""
    if "timm" in sys.modules and not getattr(sys.modules["timm"], "_beit3_shim", False):
        return  # a real timm is already imported: leave it alone
    layers = types.ModuleType("timm.models.layers")
    layers.drop_path = _drop_path
    layers.trunc_normal_ = _trunc_normal_
    models = types.ModuleType("timm.models")
    models.layers = layers
    timm = types.ModuleType("timm")
    timm.models = models
    timm._beit3_shim = True
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})


def import_reference() -> tuple[type, type]:
    """``(BEiT3, EncoderConfig)`` from torchscale 0.3.0; raises :class:`ReferenceUnavailable` if missing."""
    if not reference_available():
        raise ReferenceUnavailable(f"torchscale is not installed in {REFERENCE_DIR}: {INSTALL_HINT}")
    if str(REFERENCE_DIR) not in sys.path:
        # Appended, not prepended: packages of the real environment win over anything in the cache.
        sys.path.append(str(REFERENCE_DIR))
    _install_timm_shim()
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3

    return BEiT3, EncoderConfig


def build_reference(cfg: ModelConfig) -> torch.nn.Module:
    """The torchscale model configured exactly as the released ``BEiT3Wrapper`` does, with ``cfg``'s sizes."""
    if cfg.layout != "released":
        raise ValueError("the reference implements the released layout only")
    ref_cls, config_cls = import_reference()
    args = config_cls(
        vocab_size=cfg.vocab_size,
        multiway=True,
        layernorm_embedding=False,
        normalize_output=cfg.normalize_output,
        no_output_layer=True,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        encoder_embed_dim=cfg.embed_dim,
        encoder_attention_heads=cfg.num_heads,
        encoder_ffn_embed_dim=cfg.ffn_dim,
        encoder_layers=cfg.depth,
        max_source_positions=cfg.max_text_positions,
        layernorm_eps=cfg.layernorm_eps,
        drop_path_rate=cfg.drop_path_rate,
        subln=cfg.subln,
    )
    return ref_cls(args)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter distinct, non-trivial values (LayerNorm affine included) from a seeded generator.

    Default inits leave LayerNorm weights at 1 and biases at 0, which would hide a swapped or skipped norm.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        else:
            scale = 0.02 if p.dim() == 1 else 1.0 / math.sqrt(max(p.shape[-1], 1))
            if p.dim() == 4:  # patch embedding conv
                scale = 1.0 / math.sqrt(p[0].numel())
            p.copy_(scale * torch.randn(p.shape, generator=gen))


def copy_reference_into(ours: BEiT3Model, reference: torch.nn.Module) -> None:
    """Load the reference's weights into our released-layout model (its keys are ours without ``beit3.``)."""
    sd = {f"beit3.{k}": v for k, v in reference.state_dict().items()}
    ours.beit3.load_state_dict({k[len("beit3.") :]: v for k, v in sd.items()}, strict=True)


def reference_forward(
    reference: torch.nn.Module,
    image: torch.Tensor | None = None,
    text: torch.Tensor | None = None,
    text_padding_mask: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference's final hidden states, arguments named as in our forward."""
    out = reference(
        textual_tokens=text,
        visual_tokens=image,
        text_padding_position=text_padding_mask,
        vision_masked_position=image_mask,
        attn_mask=attn_mask,
    )
    return out["encoder_out"]
