"""Checkpoint files of unknown origin cannot run code (issue 11, defect 14).

A payload is a pickle whose ``__reduce__`` creates a file when it is unpickled (``pathlib.Path.touch`` bound
as the callable, or ``builtins.exec``); it sits inside an otherwise valid checkpoint, as a crafted file would.
Through every public loading path (the model's loader, the finetune reload and ``--eval-only``, trainer
resume from each kind of file, ``beit3-export``) the payload must be refused with a message naming the file
and the type, and the file must not exist afterwards. Real checkpoints of every ZeRO stage still load.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import DS_CONFIGS, make_trainer, single_rank  # noqa: F401  (a fixture)
from tiny_data import set_args, tiny_pretrain_settings, write_pretrain_data

from beit3.engine.checkpoint import MARKER, describe_files, latest_checkpoint
from beit3.engine.safe_load import UntrustedFileError, load_file, trusted_files
from beit3.model import build_model, load_checkpoint, read_state_dict
from beit3.model.checkpoint import UntrustedCheckpointError

REPO = Path(__file__).resolve().parents[1]
TINY = "beit3_tiny_patch16_64"
pytestmark = [
    pytest.mark.usefixtures("single_rank"),
    pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*script_method.* is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
]


class TouchPayload:
    """Unpickling it calls ``Path.touch(target)``."""

    type_name = "pathlib.Path"

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


class ExecPayload(TouchPayload):
    """Unpickling it runs ``open(target, "w")`` through ``builtins.exec``."""

    type_name = "builtins.exec"

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.target)!r}, 'w').close()",))


PAYLOADS = {"touch": TouchPayload, "exec": ExecPayload}


@pytest.fixture(params=sorted(PAYLOADS))
def payload(request, tmp_path):
    """A payload whose target file does not exist yet."""
    target = tmp_path / "payload-ran"
    return PAYLOADS[request.param](target)


def assert_refused(message: str, path: Path, payload: TouchPayload) -> None:
    assert str(path) in message and payload.type_name in message, message
    assert not payload.target.exists(), "the payload ran"


def plant(tag_dir: Path, name: str, payload: TouchPayload) -> Path:
    """Add ``payload`` to the checkpoint file ``name`` (otherwise unchanged) and record the new file in the
    marker as its writer would: a crafted checkpoint passes the size and checksum verification."""
    path = tag_dir / name
    with trusted_files():
        state = load_file(path)
    torch.save({**state, "note": payload}, path)
    marker = json.loads((tag_dir / MARKER).read_text())
    if "files" in marker:
        marker["files"].update(describe_files(tag_dir, [name]))
        (tag_dir / MARKER).write_text(json.dumps(marker))
    return path


def plant_old_trainer_file(tag_dir: Path) -> Path:
    """The trainer file as the engine wrote it before: numpy RNG state as arrays (beyond the allowlist)."""
    import numpy as np

    path = tag_dir / "trainer_rank00000.pt"
    state = load_file(path)
    state["rng"]["numpy"] = np.random.get_state()
    torch.save(state, path)
    marker = json.loads((tag_dir / MARKER).read_text())
    marker["files"].update(describe_files(tag_dir, [path.name]))
    (tag_dir / MARKER).write_text(json.dumps(marker))
    return path


# ----- the model's loader (released-format files) -----
def test_read_state_dict_refuses_a_payload_and_names_file_and_type(tmp_path, payload):
    path = tmp_path / "crafted.pth"
    torch.save({"model": build_model(TINY).state_dict(), "args": payload}, path)
    with pytest.raises(UntrustedCheckpointError) as err:
        read_state_dict(path)
    assert_refused(str(err.value), path, payload)


def test_load_checkpoint_refuses_a_payload(tmp_path, payload):
    path = tmp_path / "crafted.pth"
    torch.save({"model": build_model(TINY).state_dict(), "args": payload}, path)
    with pytest.raises(UntrustedCheckpointError) as err:
        load_checkpoint(build_model(TINY), path)
    assert_refused(str(err.value), path, payload)


# ----- the finetune reload, through its program -----
FINETUNE_RECIPE = """
[task]
name = "image_classification"
[model]
name = "beit3_tiny_patch16_64"
drop_path_rate = 0.0
{pretrained}
[data]
source = "shapes"
max_train = 12
max_eval = 6
[train]
total_steps = 2
warmup_steps = 1
log_every = 1
save_every = 0
"""


def finetune(tmp_path: Path, run: Path, *extra: str, pretrained: Path | None = None) -> int:
    from beit3.finetune.train import main

    recipe = tmp_path / "recipe.toml"
    line = f'pretrained = "{pretrained}"' if pretrained else ""
    recipe.write_text(FINETUNE_RECIPE.format(pretrained=line))
    args = ["--config", str(recipe), "--ds-config", str(DS_CONFIGS / "zero0_fp32.json"),
            "--ds-set", "train_micro_batch_size_per_gpu=2", "--output-dir", str(run), *extra]  # fmt: skip
    return main(args)


def crafted_pretrained(tmp_path: Path, payload: TouchPayload) -> Path:
    path = tmp_path / "pretrained.pth"
    torch.save({"model": build_model(TINY).state_dict(), "args": payload}, path)
    return path


def one_error_line(err: str, program: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"{program}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_finetune_refuses_a_crafted_pretrained_checkpoint_with_exit_2(tmp_path, capsys, payload):
    path = crafted_pretrained(tmp_path, payload)
    code = finetune(tmp_path, tmp_path / "run", "--set", f"model.pretrained={path}")
    assert code == 2
    assert_refused(one_error_line(capsys.readouterr().err, "beit3-finetune"), path, payload)


def test_finetune_eval_only_refuses_a_crafted_model_file_with_exit_2(tmp_path, capsys, payload):
    path = tmp_path / "model.pth"
    torch.save({"model": {"head.weight": torch.zeros(1)}, "args": payload}, path)
    assert finetune(tmp_path, tmp_path / "run", "--eval-only", str(path)) == 2
    assert_refused(one_error_line(capsys.readouterr().err, "beit3-finetune"), path, payload)


# ----- trainer resume: the engine's files and DeepSpeed's -----
# bf16 configs: a micro-batch the toy data fits, and small buckets (the shipped 2e8-element ones cost seconds)
SMALL_BATCH = {
    "train_batch_size": None,
    "train_micro_batch_size_per_gpu": 4,
    "zero_optimization.reduce_bucket_size": 10**5,
    "zero_optimization.allgather_bucket_size": 10**5,
}
RESUME_FILES = {
    "trainer file": ("zero0_fp32.json", {}, "trainer_rank00000.pt"),
    "model states": ("zero0_fp32.json", {}, "mp_rank_00_model_states.pt"),
    "zero-1 shard": (
        "zero0_fp32.json",
        {"zero_optimization.stage": 1},
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ),
    "bf16 shard": ("zero1_bf16.json", SMALL_BATCH, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    "zero-3 model states": ("zero3_fp32.json", {}, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
}


@pytest.mark.parametrize("kind", sorted(RESUME_FILES))
def test_resume_refuses_a_payload_in_any_checkpoint_file(tmp_path, kind):
    ds_name, overrides, name = RESUME_FILES[kind]
    make_trainer(tmp_path, ds_name, 2, overrides).fit()
    payload = TouchPayload(tmp_path / "payload-ran")
    path = plant(latest_checkpoint(tmp_path), name, payload)
    with pytest.raises(UntrustedFileError) as err:
        make_trainer(tmp_path, ds_name, 3, overrides)
    assert_refused(str(err.value), path, payload)


@pytest.mark.parametrize(
    "ds_name, overrides",
    [
        ("zero0_fp32.json", {}),
        ("zero0_fp32.json", {"zero_optimization.stage": 1}),
        ("zero0_fp32.json", {"zero_optimization.stage": 2}),
        ("zero3_fp32.json", {}),
        ("zero0_bf16.json", {}),
        ("zero1_bf16.json", {}),
        ("zero2_bf16.json", {}),
        ("zero3_bf16.json", {}),
    ],
    ids=["z0", "z1", "z2", "z3", "z0-bf16", "z1-bf16", "z2-bf16", "z3-bf16"],
)
def test_real_checkpoints_of_every_stage_load_without_trust(tmp_path, ds_name, overrides):
    overrides = {**SMALL_BATCH, **overrides}
    make_trainer(tmp_path, ds_name, 2, overrides).fit()
    tag_dir = latest_checkpoint(tmp_path)
    for path in sorted(tag_dir.glob("*.pt")):
        load_file(path)  # DeepSpeed's files need only the allowlisted types
    trainer_file = tag_dir / "trainer_rank00000.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(trainer_file) == []  # ours need none
    assert make_trainer(tmp_path, ds_name, 3, overrides).step == 2


def test_an_old_trainer_file_with_numpy_state_resumes_only_when_trusted(tmp_path):
    make_trainer(tmp_path, "zero0_fp32.json", 2).fit()
    plant_old_trainer_file(latest_checkpoint(tmp_path))
    with pytest.raises(UntrustedFileError, match=r"numpy.*--trust-checkpoint"):
        make_trainer(tmp_path, "zero0_fp32.json", 3)
    with trusted_files():
        assert make_trainer(tmp_path, "zero0_fp32.json", 3).step == 2


# ----- beit3-export -----
def export(capsys, *args: str) -> tuple[int, str]:
    """``beit3-export`` in this process: (exit code, stderr)."""
    from beit3.pretrain.export import main

    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "ds_name, overrides, name",
    [
        ("zero0_fp32.json", {}, "mp_rank_00_model_states.pt"),
        ("zero0_fp32.json", {"zero_optimization.stage": 2}, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        ("zero1_bf16.json", SMALL_BATCH, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ],
    ids=["stage0-model-states", "zero_to_fp32-shard", "bf16-optimizer-shard"],
)  # fmt: skip
def test_export_refuses_a_payload_shard_with_exit_2(tmp_path, capsys, ds_name, overrides, name):
    make_trainer(tmp_path / "run", ds_name, 2, overrides).fit()
    payload = TouchPayload(tmp_path / "payload-ran")
    path = plant(latest_checkpoint(tmp_path / "run"), name, payload)
    code, err = export(capsys, str(tmp_path / "run"), "--output", str(tmp_path / "out.pth"))
    assert code == 2
    assert_refused(one_error_line(err, "beit3-export"), path, payload)
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("where", ["missing", "no-checkpoints"])
def test_export_of_a_missing_checkpoint_exits_2_with_one_line(tmp_path, where):
    run = tmp_path / "run"
    if where == "no-checkpoints":
        run.mkdir()
    proc = program("beit3.pretrain.export", [str(run), "--output", str(tmp_path / "out.pth")])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(run) in one_error_line(proc.stderr, "beit3-export")
    assert proc.stderr.strip().count("\n") == 0, proc.stderr  # the console program prints nothing else


def test_a_trusted_export_loads_what_the_allowlist_refuses(tmp_path):
    """``--trust-checkpoint`` is the explicit way past the allowlist (a benign extra type here)."""
    from beit3.pretrain.export import export_run

    run = tmp_path / "run"
    make_trainer(run, "zero0_fp32.json", 2).fit()
    path = latest_checkpoint(run) / "mp_rank_00_model_states.pt"
    with trusted_files():
        state = load_file(path)
    state["module"] = {f"model.{k}": v for k, v in build_model(TINY).state_dict().items()}
    torch.save({**state, "note": Path("not/allowlisted")}, path)
    (run / "config.json").write_text(json.dumps({"recipe": {"model": {"name": TINY, "drop_path_rate": 0.0}}}))
    with pytest.raises(UntrustedFileError, match="pathlib"):
        export_run(run, tmp_path / "out.pth")
    export_run(run, tmp_path / "out.pth", trusted=True)
    assert read_state_dict(tmp_path / "out.pth").keys() == build_model(TINY).state_dict().keys()


# ----- resume through the programs: exit 2, unless --trust-checkpoint is given -----
def test_finetune_resume_refuses_a_payload_with_exit_2_and_trusts_only_on_request(tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    assert finetune(tmp_path, run) == 0
    shutil.copytree(run, other)
    payload = TouchPayload(tmp_path / "payload-ran")
    path = plant(latest_checkpoint(run), "trainer_rank00000.pt", payload)
    assert finetune(tmp_path, run, "--set", "train.total_steps=3") == 2
    assert_refused(one_error_line(capsys.readouterr().err, "beit3-finetune"), path, payload)
    run = other
    plant_old_trainer_file(latest_checkpoint(run))  # benign, but beyond the allowlist
    assert finetune(tmp_path, run, "--set", "train.total_steps=3") == 2
    assert "numpy" in one_error_line(capsys.readouterr().err, "beit3-finetune")
    assert finetune(tmp_path, run, "--set", "train.total_steps=3", "--trust-checkpoint") == 0
    assert latest_checkpoint(run).name == "step00000003"


def test_finetune_loads_a_released_style_file_with_its_argparse_namespace(tmp_path):
    import argparse

    path = tmp_path / "released.pth"
    args = argparse.Namespace(model="beit3_tiny_patch16_64", lr=5e-4, layer_decay=0.65, drop_path=0.1)
    torch.save({"model": build_model(TINY).state_dict(), "args": args}, path)
    assert finetune(tmp_path, tmp_path / "run", pretrained=path) == 0


@pytest.fixture(scope="module")
def pretrain_assets(tmp_path_factory) -> dict:
    return write_pretrain_data(tmp_path_factory.mktemp("pretrain_assets"), 12, 6)


def pretrain_args(assets: dict, run: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "pretrain/recipes/demo.toml"),
        "--ds-config", str(DS_CONFIGS / "zero0_fp32.json"),
        "--ds-set", "train_micro_batch_size_per_gpu=3", "--output-dir", str(run),
        *set_args(tiny_pretrain_settings(assets)), "--set", f"train.total_steps={steps}",
        "--set", "train.warmup_steps=1", "--set", "train.save_every=0", "--set", "data.num_workers=0",
        *extra,
    ]  # fmt: skip


def program(module: str, args: list[str]) -> subprocess.CompletedProcess:
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # this process's own
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=240,
                          env=env)  # fmt: skip


@pytest.mark.slow  # two short beit3-pretrain runs in subprocesses (a finished run ends its process group)
def test_pretrain_resume_refuses_a_payload_with_exit_2_and_trusts_only_on_request(
    tmp_path, capsys, pretrain_assets
):
    from beit3.pretrain.train import main

    run, other = tmp_path / "run", tmp_path / "other"
    proc = program("beit3.pretrain.train", pretrain_args(pretrain_assets, run, 1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    shutil.copytree(run, other)
    payload = ExecPayload(tmp_path / "payload-ran")
    path = plant(latest_checkpoint(run), "mp_rank_00_model_states.pt", payload)
    assert main(pretrain_args(pretrain_assets, run, 2)) == 2  # refused before training: in-process is fine
    assert_refused(one_error_line(capsys.readouterr().err, "beit3-pretrain"), path, payload)
    plant_old_trainer_file(latest_checkpoint(other))  # benign, but beyond the allowlist
    assert main(pretrain_args(pretrain_assets, other, 2)) == 2
    assert "numpy" in one_error_line(capsys.readouterr().err, "beit3-pretrain")
    proc = program("beit3.pretrain.train", pretrain_args(pretrain_assets, other, 2, "--trust-checkpoint"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert latest_checkpoint(other).name == "step00000002"


def test_a_universal_checkpoint_is_vetted_before_deepspeed_unpickles_it(tmp_path):
    """DeepSpeed's universal loader calls torch.load in full itself: guard_engine vets the dir first."""
    from beit3.engine.reshard import convert_to_universal

    zero1 = {"zero_optimization.stage": 1}
    make_trainer(tmp_path / "run", "zero0_fp32.json", 2, zero1).fit()
    universal = convert_to_universal(latest_checkpoint(tmp_path / "run"))
    fragment = sorted(universal.rglob("fp32.pt"))[0]
    payload = TouchPayload(tmp_path / "payload-ran")
    torch.save({"original": load_file(fragment), "note": payload}, fragment)
    trainer = make_trainer(
        tmp_path / "fresh", "zero0_fp32.json", 2, {**zero1, "checkpoint.load_universal": True}
    )
    with pytest.raises(UntrustedFileError) as err:
        trainer.engine.load_checkpoint(str(universal.parent), tag=universal.name)
    assert_refused(str(err.value), fragment, payload)


def test_a_resume_on_another_world_size_vets_the_shards_before_deepspeeds_converter(tmp_path):
    """ds_to_universal unpickles the source shards in full: they are vetted before it runs."""
    from beit3.engine.reshard import convert_to_universal, universal_dir

    make_trainer(tmp_path / "run", "zero0_fp32.json", 2, {"zero_optimization.stage": 1}).fit()
    tag_dir = latest_checkpoint(tmp_path / "run")
    payload = TouchPayload(tmp_path / "payload-ran")
    path = plant(tag_dir, "zero_pp_rank_0_mp_rank_00_optim_states.pt", payload)
    with pytest.raises(UntrustedFileError) as err:
        convert_to_universal(tag_dir)
    assert_refused(str(err.value), path, payload)
    assert not universal_dir(tag_dir).exists()
