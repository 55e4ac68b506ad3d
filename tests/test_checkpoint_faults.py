"""Faults around checkpoints (docs/reliability.md): a lost or damaged ``latest``, damaged checkpoint files,
a full disk, and TensorBoard after a resume. One in-process rank (gloo); two real ranks for agreement."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    full_parameters,
    make_trainer,
    read_losses,
    single_rank,  # noqa: F401  (a fixture)
    tensorboard_scalars,
    torchrun,
)

from beit3.engine.checkpoint import (
    MARKER,
    CheckpointError,
    CheckpointSpaceError,
    complete_tags,
    latest_checkpoint,
    resolve_resume,
)

pytestmark = [
    pytest.mark.usefixtures("single_rank"),
    pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*script_method.* is deprecated:DeprecationWarning"),
]
NO_DROPOUT = {"dropout": 0.0}


def _tags(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())


def _run_with_two_checkpoints(run: Path) -> None:
    make_trainer(run, "zero0_fp32.json", 4, save_every=2, task_kwargs=NO_DROPOUT).fit()
    assert _tags(run) == ["step00000002", "step00000004"]


@pytest.mark.parametrize("damage", ["missing", "empty", "dangling", "garbage"])
def test_unreadable_latest_resumes_from_the_newest_complete_checkpoint_and_keeps_all(
    tmp_path, damage, caplog
):
    run = tmp_path / "run"
    _run_with_two_checkpoints(run)
    pointer = run / "checkpoints" / "latest"
    if damage == "missing":
        pointer.unlink()
    elif damage == "empty":
        pointer.write_text("")
    elif damage == "dangling":
        pointer.write_text("step00000099")
    else:
        pointer.write_bytes(b"\xff\xfe\x00")
    resumed = make_trainer(run, "zero0_fp32.json", 6, save_every=2, task_kwargs=NO_DROPOUT)
    assert resumed.step == 4 and resumed.data.index == 4
    assert _tags(run) == ["step00000002", "step00000004"]  # nothing complete was removed
    assert pointer.read_text() == "step00000004"  # repaired
    assert "resuming from the newest complete checkpoint" in caplog.text
    assert resumed.fit().step == 6


def test_resume_none_refuses_a_dir_with_complete_checkpoints_even_without_latest(tmp_path):
    run = tmp_path / "run"
    _run_with_two_checkpoints(run)
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        resolve_resume("none", run)


def test_resume_naming_a_tag_dir_without_marker_is_an_error_not_a_fresh_start(tmp_path):
    """A DeepSpeed-only dir (a save that did not finish) is readable for consolidation, not for a resume."""
    make_trainer(tmp_path / "a", "zero0_fp32.json", 2, save_every=2).fit()
    tag = tmp_path / "a" / "checkpoints" / "step00000002"
    (tag / MARKER).unlink()
    with pytest.raises(CheckpointError, match="has no complete.json"):
        make_trainer(tmp_path / "b", "zero0_fp32.json", 4, resume=str(tag))


def test_resume_path_that_does_not_exist_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path / "run")


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":  # same size, one byte changed: only the checksum sees it
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :])
    else:
        path.unlink()


@pytest.mark.parametrize(
    "ds_name,file,how",
    [
        ("zero0_fp32.json", "mp_rank_00_model_states.pt", "truncate"),
        ("zero0_fp32.json", "trainer_rank00000.pt", "flip"),
        ("zero3_fp32.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "truncate"),
        ("zero3_fp32.json", "zero_pp_rank_0_mp_rank_00_model_states.pt", "missing"),
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, ds_name, file, how, caplog):
    run = tmp_path / "run"
    make_trainer(run, ds_name, 4, save_every=2, task_kwargs=NO_DROPOUT).fit()
    newest = run / "checkpoints" / "step00000004"
    assert file in json.loads((newest / MARKER).read_text())["files"]
    _damage(newest / file, how)
    resumed = make_trainer(run, ds_name, 4, save_every=2, task_kwargs=NO_DROPOUT)
    assert resumed.step == 2 and resumed.data.index == 2
    assert f"{file}" in caplog.text and "damaged" in caplog.text
    names = _tags(run)
    assert "step00000002" in names and "step00000004" not in names
    assert any(n.startswith("corrupt-step00000004-") for n in names)  # set aside, not deleted
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    resumed.fit()  # redoes steps 3-4 from the intact checkpoint
    straight = make_trainer(tmp_path / "straight", ds_name, 4, task_kwargs=NO_DROPOUT)
    straight.fit()
    got, want = full_parameters(resumed), full_parameters(straight)
    assert max((got[k] - want[k]).abs().max().item() for k in want) == 0.0


def test_damaged_checkpoint_named_explicitly_is_an_error_not_a_fallback(tmp_path):
    run = tmp_path / "run"
    make_trainer(run, "zero0_fp32.json", 4, save_every=2, task_kwargs=NO_DROPOUT).fit()
    tag = run / "checkpoints" / "step00000004"
    _damage(tag / "mp_rank_00_model_states.pt", "truncate")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt has"):
        make_trainer(tmp_path / "other", "zero0_fp32.json", 4, resume=str(tag), task_kwargs=NO_DROPOUT)
    assert (tag / MARKER).is_file()  # another run's files are never moved


def test_every_checkpoint_damaged_stops_instead_of_restarting_from_zero(tmp_path):
    run = tmp_path / "run"
    _run_with_two_checkpoints(run)
    for tag in ("step00000002", "step00000004"):
        _damage(run / "checkpoints" / tag / "trainer_rank00000.pt", "truncate")
    with pytest.raises(CheckpointError, match="failed verification"):
        make_trainer(run, "zero0_fp32.json", 4, save_every=2)


def test_tensorboard_keeps_the_checkpoint_step_after_a_resume(tmp_path):
    run = tmp_path / "run"
    make_trainer(run, "zero0_fp32.json", 3, save_every=2, log_every=1, task_kwargs=NO_DROPOUT).fit()
    first = list(tensorboard_scalars(run, "loss/total"))
    assert first == [1, 2, 3]
    (run / "checkpoints" / "step00000003" / MARKER).unlink()  # step 3's save "did not finish"
    make_trainer(run, "zero0_fp32.json", 4, save_every=2, log_every=1, task_kwargs=NO_DROPOUT).fit()
    # step 2 is kept, the lost step 3 replaced
    assert list(tensorboard_scalars(run, "loss/total")) == [1, 2, 3, 4]


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs mounted for the test (root only)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_says_no_space_left_and_keeps_the_last_good_checkpoint(small_fs):
    run = small_fs / "run"
    make_trainer(run, "zero3_fp32.json", 2, save_every=2, task_kwargs=NO_DROPOUT).fit()
    size = sum(f.stat().st_size for f in (run / "checkpoints" / "step00000002").iterdir())
    free = shutil.disk_usage(small_fs).free
    with open(small_fs / "filler", "wb") as f:  # leave a third of one checkpoint free
        f.write(b"\0" * (free - size // 3))
    trainer = make_trainer(run, "zero3_fp32.json", 4, save_every=2, task_kwargs=NO_DROPOUT)
    with pytest.raises(CheckpointSpaceError) as info:
        trainer.fit()
    message = str(info.value)
    assert message.startswith("no space left on device saving ") and "step00000004" in message
    assert "GiB" in message and "step00000002" in message
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    assert complete_tags(run / "checkpoints") == ["step00000002"]
    assert not (run / "checkpoints" / "step00000004").exists()  # the partial save was removed
    (small_fs / "filler").unlink()
    resumed = make_trainer(run, "zero3_fp32.json", 4, save_every=2, task_kwargs=NO_DROPOUT)
    assert resumed.step == 2


# ----- two real ranks -----
@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_agree_to_fall_back_when_one_ranks_shard_is_damaged(tmp_path):
    """A run killed by SIGKILL; rank 1's optimizer shard of its newest ZeRO-3 checkpoint is then truncated:
    both ranks resume from the previous checkpoint, and the losses equal an uninterrupted run's."""
    spec = {"ds_config": "zero3_fp32.json", "save_every": 3, "dropout": 0.0}
    straight = {**spec, "output_dir": str(tmp_path / "straight"), "steps": 8}
    killed = {
        **spec,
        "output_dir": str(tmp_path / "a"),
        "steps": 8,
        "kill_at_batch": 7,
    }  # after step 6's save
    out = torchrun([straight, killed], tmp_path / "l1", timeout=300)
    assert out.returncode != 0 and (tmp_path / "a" / "checkpoints" / "step00000006" / MARKER).is_file()
    shard = tmp_path / "a" / "checkpoints" / "step00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _damage(shard, "truncate")
    out = torchrun([{**spec, "output_dir": str(tmp_path / "a"), "steps": 8}], tmp_path / "l2", timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in out.stdout + out.stderr
    results = [json.loads((tmp_path / "l2" / f"results_rank{r}.json").read_text())[0] for r in (0, 1)]
    assert [r["step"] for r in results] == [8, 8]
    for rank in (0, 1):
        straight = read_losses(tmp_path / "straight" / "losses", rank)
        resumed = read_losses(tmp_path / "a" / "losses", rank)
        assert sorted(resumed) == list(range(8)) and all(resumed[i] == straight[i] for i in straight)
    assert latest_checkpoint(tmp_path / "a").name == "step00000008"
    assert any(p.name.startswith("corrupt-step00000006") for p in (tmp_path / "a" / "checkpoints").iterdir())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_rank_killed_inside_a_save_leaves_the_previous_checkpoint_and_resumes_exactly(tmp_path):
    """Rank 1 is SIGKILLed in the save of step 6, after DeepSpeed's files and before the marker: the half
    checkpoint is removed at the next start, the run resumes from step 3 and matches an uninterrupted run."""
    spec = {"ds_config": "zero3_fp32.json", "save_every": 3}
    straight = {**spec, "output_dir": str(tmp_path / "straight"), "steps": 8}
    killed = {**spec, "output_dir": str(tmp_path / "a"), "steps": 8, "kill_in_save_at_step": 6}
    out = torchrun([straight, killed], tmp_path / "l1", timeout=300)
    ckpts = tmp_path / "a" / "checkpoints"
    assert out.returncode != 0 and (ckpts / "latest").read_text() == "step00000003"
    assert (ckpts / "step00000006").is_dir() and not (ckpts / "step00000006" / MARKER).exists()
    out = torchrun([{**spec, "output_dir": str(tmp_path / "a"), "steps": 8}], tmp_path / "l2", timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "removed incomplete checkpoint dirs ['step00000006']" in out.stdout + out.stderr
    for rank in (0, 1):
        want = read_losses(tmp_path / "straight" / "losses", rank)
        got = read_losses(tmp_path / "a" / "losses", rank)
        assert sorted(got) == list(range(8)) and all(got[i] == want[i] for i in want)


def test_consolidation_finds_the_newest_complete_checkpoint_without_latest(tmp_path):
    from beit3.engine.consolidate import consolidate_checkpoint

    run = tmp_path / "run"
    _run_with_two_checkpoints(run)
    (run / "checkpoints" / "latest").unlink()
    newest = consolidate_checkpoint(run / "checkpoints" / "step00000004")
    got = consolidate_checkpoint(run)
    assert got.keys() == newest.keys() and all(torch.equal(got[k], newest[k]) for k in got)
    with pytest.raises(CheckpointError, match=r"no checkpoint 'step00000003' \(complete ones: step00000002"):
        consolidate_checkpoint(run, tag="step00000003")
