"""Released-format checkpoints: round trips, wrappers, dtypes, strict-load errors, resolution change, and
the types a file may hold (payloads that would run code: test_untrusted_files.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import PurePosixPath

import pytest
import torch
from safetensors.torch import load_file

from beit3.model import (
    WeightsFileError,
    build_model,
    interpolate_vision_positions,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from beit3.model.beit3 import BEiT3Model
from beit3.model.checkpoint import UntrustedCheckpointError, read_config, trusted_files
from beit3.model.config import ModelConfig, ModelConfigError
from beit3.model.registry import get_config, list_models

TINY = "beit3_tiny_patch16_64"


def _model(seed: int, name: str = TINY, **overrides):
    torch.manual_seed(seed)
    return build_model(name, **overrides).eval()


def _assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", ["beit3_tiny_patch16_64", "beit3_tiny_paper_patch16_64"])
def test_save_then_strict_load_restores_every_tensor(tmp_path, name):
    src, dst = _model(0, name), _model(1, name)
    path = save_checkpoint(src, tmp_path / "ckpt.pth")
    assert set(torch.load(path, weights_only=True)) == {"model"}  # the released wrapper
    report = load_checkpoint(dst, path)
    assert not report.missing and not report.unexpected and not report.interpolated
    _assert_same_weights(src, dst)


def test_deepspeed_style_module_wrapper_loads(tmp_path):
    src, dst = _model(0), _model(1)
    torch.save({"module": src.state_dict(), "global_steps": 7}, tmp_path / "ds.pt")
    load_checkpoint(dst, tmp_path / "ds.pt")
    _assert_same_weights(src, dst)


def test_in_memory_dicts_load_wrapped_or_bare():
    src = _model(0)
    for source in ({"model": src.state_dict()}, src.state_dict()):
        dst = _model(1)
        load_checkpoint(dst, source)
        _assert_same_weights(src, dst)


def test_safetensors_round_trip(tmp_path):
    src, dst = _model(0), _model(1)
    path = save_checkpoint(src, tmp_path / "ckpt.safetensors")
    assert set(load_file(str(path))) == set(src.state_dict())
    load_checkpoint(dst, path)
    _assert_same_weights(src, dst)


def test_bf16_save_halves_precision_and_loads_into_fp32(tmp_path):
    src, dst = _model(0), _model(1)
    path = save_checkpoint(src, tmp_path / "bf16.pth", dtype=torch.bfloat16)
    stored = read_state_dict(path)
    assert all(v.dtype == torch.bfloat16 for v in stored.values() if v.is_floating_point())
    load_checkpoint(dst, path)
    w = "beit3.encoder.layers.0.ffn.A.fc1.weight"
    assert dst.state_dict()[w].dtype == torch.float32
    torch.testing.assert_close(dst.state_dict()[w], src.state_dict()[w].bfloat16().float(), rtol=0, atol=0)


def test_loaded_model_computes_the_same_outputs(tmp_path):
    src, dst = _model(0), _model(1)
    load_checkpoint(dst, save_checkpoint(src, tmp_path / "c.pth"))
    text = torch.randint(3, 64000, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(src(text=text), dst(text=text))


def test_strict_load_names_missing_and_unexpected_keys():
    sd = _model(0).state_dict()
    del sd["beit3.encoder.layers.1.ffn.B.fc2.bias"]
    sd["beit3.encoder.layers.9.ffn.A.fc1.weight"] = torch.zeros(1)
    with pytest.raises(WeightsFileError) as err:
        load_checkpoint(_model(1), sd)
    assert "missing (1): beit3.encoder.layers.1.ffn.B.fc2.bias" in str(err.value)
    assert "unexpected (1): beit3.encoder.layers.9.ffn.A.fc1.weight" in str(err.value)


def test_non_strict_load_reports_instead_of_raising():
    sd = _model(0).state_dict()
    del sd["mim_head.weight"]
    report = load_checkpoint(_model(1), sd, strict=False)
    assert report.missing == ["mim_head.weight"]
    assert "missing (1)" in str(report)


def test_shape_mismatch_names_the_key_and_both_shapes():
    sd = _model(0).state_dict()
    sd["mlm_head.weight"] = torch.zeros(10, 64)
    expected = r"mlm_head.weight: checkpoint \(10, 64\) vs model \(64010, 64\)"
    with pytest.raises(WeightsFileError, match=expected):
        load_checkpoint(_model(1), sd)


def test_ignore_drops_key_prefixes_before_loading():
    sd = _model(0).state_dict()
    sd["head.weight"] = torch.zeros(3, 64)  # e.g. a finetuning head the backbone does not have
    report = load_checkpoint(_model(1), sd, ignore=("head.",))
    assert not report.unexpected


def test_unreadable_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(WeightsFileError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsFileError, match="cannot read"):
        read_state_dict(tmp_path / "junk.pth")
    torch.save({"optimizer": 1}, tmp_path / "noweights.pth")
    with pytest.raises(WeightsFileError, match="'model' or 'module'"):
        read_state_dict(tmp_path / "noweights.pth")


def test_a_released_finetuned_file_with_its_argparse_namespace_loads(tmp_path):
    src, dst = _model(0), _model(1)
    args = argparse.Namespace(model="beit3_base_patch16_224", lr=3e-5, layer_decay=0.9, input_size=224)
    torch.save({"model": src.state_dict(), "args": args}, tmp_path / "released.pth")
    load_checkpoint(dst, tmp_path / "released.pth")
    _assert_same_weights(src, dst)


def test_other_types_are_refused_unless_the_file_is_trusted(tmp_path):
    path = tmp_path / "extra.pth"
    torch.save({"model": _model(0).state_dict(), "source": PurePosixPath("runs/x")}, path)
    with pytest.raises(UntrustedCheckpointError, match=r"extra\.pth: it holds pathlib\.PurePosixPath"):
        read_state_dict(path)
    assert read_state_dict(path, trusted=True).keys() == _model(0).state_dict().keys()
    with trusted_files():
        load_checkpoint(_model(1), path)
    with pytest.raises(UntrustedCheckpointError):  # the trust ends with its context
        read_state_dict(path)


def test_interpolation_keeps_leading_rows_and_resizes_the_grid():
    table = torch.randn(3 + 4 * 4, 8)
    out = interpolate_vision_positions(table, 3 + 8 * 8)
    assert out.shape == (3 + 64, 8)
    assert torch.equal(out[:3], table[:3])  # two unused fairseq rows and the CLS row


def test_interpolation_keeps_a_constant_grid_constant():
    table = torch.cat([torch.randn(3, 8), torch.full((16, 8), 0.37)])
    out = interpolate_vision_positions(table, 3 + 36)
    torch.testing.assert_close(out[3:], torch.full((36, 8), 0.37))


def test_interpolation_rejects_tables_that_are_not_a_square_grid():
    with pytest.raises(WeightsFileError, match="square grid"):
        interpolate_vision_positions(torch.randn(3 + 15, 8), 3 + 64)


def test_checkpoint_at_64px_loads_strictly_into_a_128px_model(tmp_path):
    src = _model(0)
    dst = _model(1, img_size=128)
    report = load_checkpoint(dst, save_checkpoint(src, tmp_path / "c.pth"))
    assert report.interpolated == ["beit3.encoder.embed_positions.A.weight"]
    pos = dst.beit3.encoder.embed_positions.A.weight
    assert pos.shape == (3 + 64, 64)
    assert torch.equal(pos[:3], src.beit3.encoder.embed_positions.A.weight[:3])
    with torch.no_grad():
        assert dst(image=torch.randn(1, 3, 128, 128)).shape == (1, 65, 64)


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path):
    save_checkpoint(_model(0), tmp_path / "sub" / "c.pth")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["c.pth"]


# ----- files that describe their architecture: {"model": sd, "config": ModelConfig.to_dict()} -----
@pytest.mark.parametrize("name", list_models())
def test_a_model_config_round_trips_through_a_dict_and_json(name):
    cfg = get_config(name, drop_path_rate=0.1)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"depthh": 2}, r"unknown model config field\(s\) \['depthh'\]"),
        ({"depth": "2"}, "depth='2' is not of type int"),
        ({"subln": 1}, "subln=1 is not of type bool"),
        ({"num_heads": 3}, "not divisible by num_heads"),
    ],
)
def test_a_bad_model_config_dict_names_the_field(bad, message):
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig.from_dict({**get_config(TINY).to_dict(), **bad})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_file_with_its_config_builds_the_model_it_holds(tmp_path, suffix):
    src = _model(0, drop_path_rate=0.1, vocab_size=48)
    path = save_checkpoint(src, tmp_path / f"m{suffix}", config=src.cfg)
    cfg = ModelConfig.from_dict(read_config(path))
    assert cfg == src.cfg
    dst = BEiT3Model(cfg)
    load_checkpoint(dst, path, strict=True)
    _assert_same_weights(src, dst)
    if suffix == ".pth":  # what the released readers see: a plain state dict under "model"
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert set(raw) == {"model", "config"} and raw["model"].keys() == src.state_dict().keys()


def test_a_released_format_file_carries_no_config_and_still_loads(tmp_path):
    src = _model(0)
    path = save_checkpoint(src, tmp_path / "released.pth")
    assert set(torch.load(path, map_location="cpu", weights_only=True)) == {"model"}
    assert read_config(path) is None and read_config({"model": src.state_dict()}) is None
    dst = _model(1)
    load_checkpoint(dst, path, strict=True)
    _assert_same_weights(src, dst)
