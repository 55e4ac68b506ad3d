"""Finetuning configurations hold exactly the parameters their inputs use, and reload released checkpoints."""

from __future__ import annotations

import re

import pytest
import torch

from beit3.finetune.configurations import CONFIGURATIONS, ConfigurationError, build_encoder, full_model_keys
from beit3.finetune.reload import ReloadError, checkpoint_overrides, load_pretrained
from beit3.finetune.tasks.base import FinetuneTask
from beit3.finetune.tasks.captioning import Captioning
from beit3.finetune.tasks.classification import ImageClassification
from beit3.model import ModalityError, build_model, save_checkpoint

SMALL = {"vocab_size": 40, "max_text_positions": 20}  # keep the tiny text tables tiny
MODELS = ("beit3_tiny_patch16_64", "beit3_tiny_paper_patch16_64")


def _forward_all_modes(model, configuration: str) -> torch.Tensor:
    """Sum of the outputs of every kind of pass the configuration makes."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 64, 64, generator=g)
    text = torch.randint(4, 40, (2, 6), generator=g)
    total = torch.zeros(())
    for mode in CONFIGURATIONS[configuration].modes:
        if mode == "image":
            out = model(image=image)
        elif mode == "text":
            out = model(text=text)
        else:
            out = model(image=image, text=text)
        if model.mlm_head is not None:
            out = model.mlm_head(out)
        total = total + out.square().mean()
    return total


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_every_parameter_of_a_configuration_receives_a_gradient(model_name, configuration):
    model = build_encoder(model_name, configuration, **SMALL)
    _forward_all_modes(model, configuration).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []


@pytest.mark.parametrize("model_name", MODELS)
def test_vision_encoder_holds_no_language_or_vl_parameters(model_name):
    names = list(build_encoder(model_name, "vision", **SMALL).state_dict())
    assert not [n for n in names if ".B." in n or ".C." in n or "text_embed" in n or "_head" in n]
    assert "beit3.vision_embed.mask_token" not in names
    assert any(".A." in n for n in names)


@pytest.mark.parametrize("model_name", MODELS)
def test_language_encoder_holds_no_vision_parameters(model_name):
    names = list(build_encoder(model_name, "language", **SMALL).state_dict())
    assert not [n for n in names if ".A." in n or ".C." in n or "vision_embed" in n]


def test_dual_encoder_drops_vl_experts_and_fusion_keeps_them():
    dual = build_encoder("beit3_tiny_paper_patch16_64", "dual", **SMALL).state_dict()
    fusion = build_encoder("beit3_tiny_paper_patch16_64", "fusion", **SMALL).state_dict()
    assert not [n for n in dual if ".C." in n]
    assert [n for n in fusion if ".C." in n]
    # In the top (VL) layer a pair never reaches the modality FFN experts.
    assert not [n for n in fusion if "layers.2.ffn.A." in n or "layers.2.ffn.B." in n]


def test_only_seq2seq_keeps_the_mlm_head():
    for name in CONFIGURATIONS:
        keys = build_encoder("beit3_tiny_patch16_64", name, **SMALL).state_dict()
        assert ("mlm_head.weight" in keys) == (name == "seq2seq")
        assert "mim_head.weight" not in keys


def test_unknown_configuration_names_the_choices():
    with pytest.raises(ConfigurationError, match="dual"):
        build_encoder("beit3_tiny_patch16_64", "duel")


WRONG_INPUTS = [  # (configuration, input it holds no weights for, what the message must say it takes)
    ("language", "image", "takes texts"),
    ("vision", "text", "takes images"),
    ("vision", "pair", "takes images"),
    ("dual", "pair", "takes images (image=...) or texts"),
    ("fusion", "image", "takes image-text pairs"),
    ("fusion", "text", "takes image-text pairs"),
    ("seq2seq", "text", "takes image-text pairs"),
]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize(("configuration", "given", "takes"), WRONG_INPUTS)
def test_an_input_the_configuration_does_not_take_is_a_clear_error(model_name, configuration, given, takes):
    """Not "TypeError: 'NoneType' object is not callable" from a pruned expert: the accepted inputs."""
    model = build_encoder(model_name, configuration, **SMALL)
    inputs = {"image": torch.randn(2, 3, 64, 64), "text": torch.randint(4, 40, (2, 6))}
    if given != "pair":
        inputs = {given: inputs[given]}
    expected = rf"'{configuration}' configuration, which {re.escape(takes)}.*given"
    with pytest.raises(ModalityError, match=expected) as err:
        model(**inputs)
    assert isinstance(err.value, ValueError)


def test_cached_decoding_counts_the_cached_image_as_part_of_the_pair():
    model = build_encoder("beit3_tiny_patch16_64", "seq2seq", **SMALL).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(image=torch.randn(1, 3, 64, 64), text=torch.randint(4, 40, (1, 2)), cache=cache)
        out = model(text=torch.randint(4, 40, (1, 1)), cache=cache)  # text alone, the image in the cache
    assert out.shape[1] == 1
    with pytest.raises(ModalityError, match="image-text pairs"):
        model(text=torch.randint(4, 40, (1, 3)))  # no cache: a text-only pass


@pytest.fixture(scope="module")
def released_file(tmp_path_factory):
    """A released-format pretrained checkpoint: full model, final LayerNorm, both pretraining heads."""
    torch.manual_seed(1)
    full = build_model("beit3_tiny_patch16_64", **SMALL)
    path = tmp_path_factory.mktemp("ckpt") / "pretrained.pth"
    save_checkpoint(full, path)
    return path, full.state_dict()


def test_vision_classifier_loads_a_released_checkpoint_with_expected_drops(released_file):
    path, full = released_file
    task = ImageClassification(
        build_encoder("beit3_tiny_patch16_64", "vision", normalize_output=False, **SMALL), 5
    )
    report = load_pretrained(task, path, full_model_keys("beit3_tiny_patch16_64", **SMALL))
    assert sorted(report.fresh) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "mim_head.weight" in report.unused and "mlm_head.weight" in report.unused
    assert "beit3.encoder.layers.0.ffn.B.fc1.weight" in report.unused
    assert "beit3.encoder.layer_norm.A.weight" in report.unused  # released classifiers drop the final LN
    assert "not used by this configuration" in str(report)
    own = task.state_dict()
    for key in report.loaded:
        assert torch.equal(own[key], full[key])


def test_captioning_reuses_the_pretrained_mlm_head(released_file):
    path, full = released_file
    task = Captioning(build_encoder("beit3_tiny_patch16_64", "seq2seq", **SMALL))
    report = load_pretrained(task, path, full_model_keys("beit3_tiny_patch16_64", **SMALL))
    assert report.fresh == []
    assert torch.equal(task.mlm_head.weight, full["mlm_head.weight"])
    assert report.unused == ["beit3.vision_embed.mask_token", "mim_head.bias", "mim_head.weight"]


def test_loading_at_a_new_resolution_interpolates_vision_positions(released_file):
    path, _ = released_file
    encoder = build_encoder("beit3_tiny_patch16_64", "vision", img_size=96, **SMALL)
    task = FinetuneTask(encoder)
    report = load_pretrained(task, path, full_model_keys("beit3_tiny_patch16_64", **SMALL))
    assert report.interpolated == ["beit3.encoder.embed_positions.A.weight"]
    assert task.beit3.encoder.embed_positions.A.weight.shape[0] == 36 + 3


def test_a_checkpoint_of_another_layout_is_an_error(tmp_path):
    paper = build_model("beit3_tiny_paper_patch16_64", **SMALL)
    save_checkpoint(paper, tmp_path / "paper.pth")
    task = FinetuneTask(build_encoder("beit3_tiny_patch16_64", "dual", **SMALL))
    with pytest.raises(ReloadError, match="architecture"):
        load_pretrained(task, tmp_path / "paper.pth", full_model_keys("beit3_tiny_patch16_64", **SMALL))


def test_a_checkpoint_missing_backbone_weights_is_an_error(released_file):
    _, full = released_file
    partial = {k: v for k, v in full.items() if "layers.1." not in k}
    task = FinetuneTask(build_encoder("beit3_tiny_patch16_64", "dual", **SMALL))
    with pytest.raises(ReloadError, match="lacks backbone parameters"):
        load_pretrained(task, {"model": partial}, full_model_keys("beit3_tiny_patch16_64", **SMALL))


def test_checkpoint_overrides_read_vocabulary_and_text_positions(released_file):
    path, _ = released_file
    assert checkpoint_overrides(path) == {
        "vocab_size": 40,
        "max_text_positions": 20,
        "visual_vocab_size": 8192,
    }


def test_a_file_that_records_another_architecture_is_refused_naming_both(tmp_path):
    from beit3.finetune.reload import check_architecture
    from beit3.model import get_config

    full = build_model("beit3_tiny_patch16_64", **SMALL)
    path = save_checkpoint(full, tmp_path / "exported.pth", config=full.cfg)
    # Resolution, regularisation and kept heads may differ from the file's: positions interpolate.
    same = get_config("beit3_tiny_patch16_64", img_size=128, drop_path_rate=0.1, normalize_output=False)
    check_architecture(same, path, "model.name=beit3_tiny_patch16_64")
    base = get_config("beit3_base_patch16_224")
    with pytest.raises(ReloadError) as err:
        check_architecture(base, path, "model.name=beit3_base_patch16_224")
    message = str(err.value)
    assert "model.name=beit3_base_patch16_224" in message and "depth 12 (the file: 2)" in message
    assert "embed_dim 768 (the file: 64)" in message and "set model.name=beit3_tiny_patch16_64" in message


def test_a_released_file_without_a_config_is_checked_key_by_key_only(released_file):
    from beit3.finetune.reload import check_architecture
    from beit3.model import get_config

    path, _ = released_file
    check_architecture(get_config("beit3_base_patch16_224"), path, "model.name=beit3_base_patch16_224")
