"""Frozen teachers: patch-aligned feature shapes, weight loading, CLIP weight formats, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beit3.tokenizers.teachers import (
    CLIPVisionTeacher,
    MobileNetV2Teacher,
    TeacherError,
    build_teacher,
    load_clip_teacher,
    mobilenet_weights_path,
)


@pytest.fixture(scope="module")
def mobilenet():
    return MobileNetV2Teacher()


def test_mobilenet_gives_one_96d_vector_per_16px_patch(mobilenet):
    assert mobilenet(torch.rand(2, 3, 64, 64)).shape == (2, 16, 96)
    assert mobilenet(torch.rand(1, 3, 224, 224)).shape == (1, 196, 96)


def test_mobilenet_holds_the_packaged_imagenet_weights(mobilenet):
    sd = torch.load(mobilenet_weights_path(), weights_only=True)
    ours = mobilenet.state_dict()
    assert torch.equal(ours["features_.0.0.weight"], sd["features.0.0.weight"])
    assert torch.equal(ours["features_.13.conv.3.running_var"], sd["features.13.conv.3.running_var"])
    assert "features_.14.conv.0.0.weight" not in ours  # stops at the stride-16 stage


def test_mobilenet_stays_frozen_in_train_mode(mobilenet):
    mobilenet.train()
    assert not mobilenet.training and not any(p.requires_grad for p in mobilenet.parameters())
    x = torch.rand(2, 3, 64, 64)
    running = mobilenet.features_[1].conv[0][1].running_mean.clone()
    assert torch.equal(mobilenet(x), mobilenet(x))
    assert torch.equal(running, mobilenet.features_[1].conv[0][1].running_mean)


def test_mobilenet_patch_feature_depends_on_its_own_region(mobilenet):
    # The receptive field is local: changing the bottom-right 16x16 patch leaves the top-left feature alone.
    x = torch.rand(1, 3, 224, 224)
    y = x.clone()
    y[..., 208:, 208:] = torch.rand(3, 16, 16)
    fx, fy = mobilenet(x), mobilenet(y)
    assert torch.allclose(fx[0, 0], fy[0, 0]) and not torch.allclose(fx[0, -1], fy[0, -1])


def test_mobilenet_stand_in_is_the_real_imagenet_network(mobilenet):
    """Completed with the package's remaining layers, our rebuilt trunk classifies real photos correctly
    (ImageNet classes 285 "Egyptian cat" for scikit-image's cat, 967 "espresso" for its coffee)."""
    import skimage.data
    from PIL import Image

    from beit3.tokenizers.teachers import InvertedResidual, _conv_bn

    sd = torch.load(mobilenet_weights_path(), weights_only=True)
    head = torch.nn.Sequential(
        *(InvertedResidual(96 if i == 0 else 160, 160, 2 if i == 0 else 1, 6) for i in range(3)),
        InvertedResidual(160, 320, 1, 6),
        _conv_bn(320, 1280, 1, 1),
    ).eval()
    rest = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("features.")}
    head.load_state_dict({f"{int(k.split('.')[0]) - 14}.{k.split('.', 1)[1]}": v for k, v in rest.items()
                          if int(k.split(".")[0]) >= 14})  # fmt: skip
    classes = []
    for name in ("chelsea", "coffee"):
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((224, 224), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            trunk = mobilenet.features_((x - mobilenet.mean) / mobilenet.std)
            logits = head(trunk).mean((2, 3)) @ sd["classifier.1.weight"].t() + sd["classifier.1.bias"]
        classes.append(int(logits.argmax()))
    assert classes == [285, 967]


def _clip_state_dict(width=64, layers=2, patch=16, grid=4, out=32) -> dict:
    """A state dict with OpenAI CLIP's key names (visual tower plus a stray text-tower key)."""
    teacher = CLIPVisionTeacher(width, layers, width // 64, patch, grid, out)
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.05)
    sd = {f"visual.{k}": v for k, v in teacher.state_dict().items()}
    sd["token_embedding.weight"] = torch.zeros(10, width)
    return sd


def test_clip_state_dict_file_loads_and_gives_projected_patch_tokens(tmp_path):
    sd = _clip_state_dict()
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in sd and "visual.proj" in sd
    torch.save({"state_dict": sd}, tmp_path / "clip.pt")
    teacher = load_clip_teacher(tmp_path / "clip.pt")
    assert teacher.dim == 32 and not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher.proj, sd["visual.proj"])
    assert teacher(torch.rand(2, 3, 64, 64)).shape == (2, 16, 32)
    assert teacher(torch.rand(1, 3, 96, 96)).shape == (1, 36, 32)  # interpolated positions


def test_clip_teacher_normalises_with_clip_statistics(tmp_path):
    torch.save(_clip_state_dict(), tmp_path / "clip.pt")
    teacher = load_clip_teacher(tmp_path / "clip.pt")
    seen = {}
    teacher.conv1.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    x = torch.full((1, 3, 64, 64), 0.5)
    teacher(x)
    expected = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    assert torch.allclose(seen["x"][0, :, 0, 0], expected)


def test_clip_teacher_errors_name_the_fix(tmp_path):
    with pytest.raises(TeacherError, match="--teacher-weights"):
        build_teacher("clip")
    with pytest.raises(TeacherError, match="do not exist"):
        build_teacher("clip", tmp_path / "none.pt")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(TeacherError, match="conv1"):
        build_teacher("clip", tmp_path / "bad.pt")
    with pytest.raises(TeacherError, match="unknown teacher"):
        build_teacher("dino")
