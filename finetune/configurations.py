"""The five finetuning configurations of a BEiT-3 backbone, each holding only the parameters it uses.

A configuration is the full :mod:`beit3.model` model with the expert copies its inputs never reach removed.
Keeping unused parameters is not merely wasteful: under ZeRO-3 a parameter that receives no gradient in a
step gets its previous gradient re-applied (docs/engine.md), so a vision-only classifier that still held
the language experts would keep drifting them. Pruning is safe because Multiway routing never calls the
removed copies for the inputs the configuration feeds:

============  ==========================  =====================================================
name          inputs                      keeps
============  ==========================  =====================================================
vision        images                      A experts, vision embedding, vision positions
language      texts                       B experts, text embedding, text positions
fusion        image-text pairs            A and B (+ C experts; A/B dropped where C takes over)
dual          images and texts, apart     A and B experts, both embeddings, no C experts
seq2seq       image-text pairs, masked    as fusion, plus ``mlm_head`` (captioning)
============  ==========================  =====================================================

No configuration keeps ``mim_head`` or the vision ``mask_token``: finetuning never masks image patches.
A pruned model given an input its configuration does not take (an image for ``language``, a pair for
``dual``) raises :class:`beit3.model.ModalityError` saying which inputs it takes.
"""

from __future__ import annotations

from dataclasses import dataclass

from beit3.finetune.errors import FinetuneError
from beit3.model import BEiT3Model, build_model
from beit3.model.layers import Multiway, MultiwayBlock


class ConfigurationError(FinetuneError, ValueError):
    """An unknown configuration name or an input the configuration cannot take."""


@dataclass(frozen=True)
class Configuration:
    """Which parts of the backbone a configuration uses."""

    name: str
    vision: bool  # A experts, vision embedding
    language: bool  # B experts, text embedding
    pairs: bool  # image-text input in one sequence: C experts (paper layout) replace A/B in their layers
    mlm_head: bool = False

    @property
    def modes(self) -> tuple[str, ...]:
        """The kinds of forward pass the configuration makes: ``image``, ``text`` and/or ``pair``."""
        if self.pairs:
            return ("pair",)
        return tuple(m for m, used in (("image", self.vision), ("text", self.language)) if used)


CONFIGURATIONS: dict[str, Configuration] = {
    "vision": Configuration("vision", vision=True, language=False, pairs=False),
    "language": Configuration("language", vision=False, language=True, pairs=False),
    "fusion": Configuration("fusion", vision=True, language=True, pairs=True),
    "dual": Configuration("dual", vision=True, language=True, pairs=False),
    "seq2seq": Configuration("seq2seq", vision=True, language=True, pairs=True, mlm_head=True),
}


def get_configuration(name: str) -> Configuration:
    """The configuration called ``name``."""
    if name not in CONFIGURATIONS:
        raise ConfigurationError(f"unknown configuration {name!r}; choose one of {sorted(CONFIGURATIONS)}")
    return CONFIGURATIONS[name]


def build_encoder(
    model_name: str, configuration: str, normalize_output: bool = True, **overrides
) -> BEiT3Model:
    """Build ``model_name`` and prune it to ``configuration`` (see the module docstring).

    ``normalize_output=False`` drops the final LayerNorm, as the released classification and VQA models do.
    Other keyword arguments override the preset (``img_size=384``, ``drop_path_rate=0.1``).
    """
    conf = get_configuration(configuration)
    model = build_model(model_name, normalize_output=normalize_output, pretraining_heads=True, **overrides)
    model.mim_head = None
    if not conf.mlm_head:
        model.mlm_head = None
    prune(model, conf)
    return model


def prune(model: BEiT3Model, conf: Configuration) -> None:
    """Remove, in place, the expert copies and embeddings ``conf`` never uses."""
    b3 = model.beit3
    for layer in b3.encoder.layers:
        _prune_block(layer, conf)
    for module in (b3.encoder.embed_positions, b3.encoder.layer_norm):
        if module is not None:
            _prune_multiway(module, keep_a=conf.vision, keep_b=conf.language, keep_c=False)
    if conf.vision:
        b3.vision_embed.mask_token = None  # only masked image modeling replaces patches by it
    else:
        b3.vision_embed = None
    if not conf.language:
        b3.text_embed = None
    b3.restrict_inputs(conf.name, conf.modes)  # another input fails with a ModalityError naming these


def _prune_block(layer: MultiwayBlock, conf: Configuration) -> None:
    for module in list(layer.modules()):
        if not isinstance(module, Multiway):
            continue
        # In a layer with a vision-language expert, pair input goes through C only (paper section 2.1).
        vl_takes_over = conf.pairs and module.C is not None
        _prune_multiway(
            module,
            keep_a=conf.vision and not vl_takes_over,
            keep_b=conf.language and not vl_takes_over,
            keep_c=conf.pairs,
        )


def _prune_multiway(module: Multiway, keep_a: bool, keep_b: bool, keep_c: bool) -> None:
    if not keep_a:
        module.A = None
    if not keep_b:
        module.B = None
    if not keep_c:
        module.C = None


def full_model_keys(model_name: str, **overrides) -> set[str]:
    """Every state-dict key of the unpruned model with both pretraining heads (built on the meta device)."""
    overrides = {k: v for k, v in overrides.items() if k not in ("normalize_output", "pretraining_heads")}
    full = build_model(model_name, device="meta", normalize_output=True, pretraining_heads=True, **overrides)
    return set(full.state_dict())
