"""Specification of the Trainer on one in-process rank (gloo): accumulation, non-finite steps, checkpoints,
TensorBoard tags, consolidation, preemption. Multi-rank behaviour: test_engine_multirank.py."""

import json
import os
import signal
import time

import pytest
import torch
from engine_helpers import (
    ToyData,
    ToyMultiwayTask,
    base_optimizer,
    full_parameters,
    make_trainer,
    read_losses,
    single_rank,  # noqa: F401  (a fixture)
    tensorboard_run,
)

from beit3.engine.checkpoint import MARKER, CheckpointError, CheckpointManager, latest_checkpoint
from beit3.engine.consolidate import ConsolidationError, consolidate_checkpoint, verify_against_module
from beit3.engine.lr import lr_at
from beit3.engine.trainer import EXIT_PREEMPTED

pytestmark = [
    pytest.mark.usefixtures("single_rank"),
    # DeepSpeed 0.19.8 calls deprecated torch names (collectives, torch.jit.script_method): not ours to fix.
    pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*script_method.* is deprecated:DeprecationWarning"),
]
NO_DROPOUT = {"dropout": 0.0}


def _adam_state(trainer) -> list[dict]:
    """AdamW's per-parameter states in creation order (of the flat fp32 partitions under ZeRO)."""
    return list(base_optimizer(trainer).state.values())


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("ds_name", ["zero0_fp32.json", "zero3_fp32.json"])
def test_four_micro_batches_of_one_equal_one_batch_of_four(tmp_path, ds_name):
    accumulated = make_trainer(tmp_path / "4x1", ds_name, 3, {"train_micro_batch_size_per_gpu": 1,
                               "gradient_accumulation_steps": 4}, NO_DROPOUT)  # fmt: skip
    single = make_trainer(tmp_path / "1x4", ds_name, 3, {"train_micro_batch_size_per_gpu": 4}, NO_DROPOUT)
    assert accumulated.fit().exit_reason == single.fit().exit_reason == "finished"
    assert _max_diff(full_parameters(accumulated), full_parameters(single)) <= 1e-6


@pytest.mark.parametrize(
    "ds_name", ["zero0_fp32.json", "zero0_bf16.json", "zero1_bf16.json", "zero2_bf16.json", "zero3_bf16.json"]
)
def test_nonfinite_loss_skips_the_step_leaving_parameters_and_optimizer_state(tmp_path, ds_name):
    batch = {"train_batch_size": None, "train_micro_batch_size_per_gpu": 2}
    clean = make_trainer(tmp_path / "clean", ds_name, 2, batch)
    clean.fit()
    poisoned = make_trainer(tmp_path / "nan", ds_name, 3, batch, data_kwargs={"nan_batches": (2,)})
    result = poisoned.fit()
    assert result.exit_reason == "finished" and poisoned.skipped_steps == 1 and poisoned.step == 3
    assert _max_diff(full_parameters(poisoned), full_parameters(clean)) == 0.0
    clean_state, poisoned_state = (_adam_state(t) for t in (clean, poisoned))
    assert len(poisoned_state) == len(clean_state) > 0
    assert {float(s["step"]) for s in poisoned_state} == {2.0}  # AdamW's own step count did not advance
    for before, after in zip(clean_state, poisoned_state):
        assert torch.equal(before["exp_avg"], after["exp_avg"]) and torch.equal(
            before["exp_avg_sq"], after["exp_avg_sq"]
        )


def test_nonfinite_losses_in_a_row_stop_the_run_after_a_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, "zero0_fp32.json", 10, data_kwargs={"nan_batches": (1, 2, 3)},
                           max_nonfinite_in_row=3)  # fmt: skip
    result = trainer.fit()
    assert (result.exit_reason, result.step, result.exit_code) == ("nonfinite", 4, 3)
    assert latest_checkpoint(tmp_path).name == "step00000004"
    after_first = make_trainer(tmp_path / "one", "zero0_fp32.json", 1)
    after_first.fit()
    assert _max_diff(full_parameters(trainer), full_parameters(after_first)) == 0.0


def test_save_interrupted_between_marker_and_pointer_resumes_from_the_complete_checkpoint(
    tmp_path, monkeypatch
):
    trainer = make_trainer(tmp_path, "zero0_fp32.json", 4, save_every=2, task_kwargs=NO_DROPOUT)
    real_commit, calls = CheckpointManager.commit, []

    def crash_on_second_commit(self, tag):
        calls.append(tag)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash between the tag write and the pointer")
        real_commit(self, tag)

    monkeypatch.setattr(CheckpointManager, "commit", crash_on_second_commit)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.setattr(CheckpointManager, "commit", real_commit)
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "step00000004" / MARKER).is_file()  # complete, never committed
    assert (ckpts / "latest").read_text() == "step00000002"
    (ckpts / "step00000009").mkdir()  # a save killed inside DeepSpeed's write: no marker

    resumed = make_trainer(tmp_path, "zero0_fp32.json", 4, save_every=2, task_kwargs=NO_DROPOUT)
    assert resumed.step == 4 and resumed.data.index == 4  # the complete checkpoint is used, not dropped
    left = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step"))
    assert left == ["step00000002", "step00000004"]
    assert (ckpts / "latest").read_text() == "step00000004"  # the pointer is repaired
    resumed.fit()
    straight = make_trainer(tmp_path / "straight", "zero0_fp32.json", 4, task_kwargs=NO_DROPOUT)
    straight.fit()
    assert _max_diff(full_parameters(resumed), full_parameters(straight)) == 0.0


def test_keep_last_prunes_old_checkpoints(tmp_path):
    make_trainer(tmp_path, "zero0_fp32.json", 5, save_every=1, keep_last=2).fit()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step"))
    assert kept == ["step00000004", "step00000005"] and latest_checkpoint(tmp_path).name == "step00000005"


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    return {tag: list(steps.items()) for tag, steps in tensorboard_run(log_dir.parent).items()}


class _SlowData(ToyData):
    """ToyData whose every batch takes 50 ms to arrive: a loader that cannot keep up."""

    def _batches(self):
        for batch in super()._batches():
            time.sleep(0.05)
            yield batch


def test_data_wait_is_the_share_of_step_time_spent_waiting_for_batches(tmp_path):
    """perf/data_wait_pct x perf/step_time_s is the time a step waited for its batches: about 0 for an
    in-memory stream, at least the 50 ms per micro-batch of a loader that sleeps that long (whatever the
    toy step itself costs on a loaded machine), in TensorBoard."""
    per_step = {}
    for name, data_cls in (("fast", None), ("slow", _SlowData)):
        trainer = make_trainer(tmp_path / name, "zero0_fp32.json", 4, data_cls=data_cls)
        trainer.fit()
        scalars = _scalars(tmp_path / name / "tensorboard")
        pct, step_s = ([v for _, v in scalars[f"perf/{k}"]] for k in ("data_wait_pct", "step_time_s"))
        assert len(pct) == 2 and all(0 <= p <= 100 for p in pct), pct
        per_step[name] = [p / 100 * t / trainer.gas for p, t in zip(pct, step_s)]  # seconds per micro-batch
    assert all(w < 0.02 for w in per_step["fast"]), per_step
    assert all(0.05 <= w < 0.5 for w in per_step["slow"]), per_step


def test_tensorboard_tags_read_back_match_the_run(tmp_path, capsys):
    recording = {"record_path": str(tmp_path / "losses")}
    trainer = make_trainer(
        tmp_path, "zero0_fp32.json", 4, task_kwargs=recording, warmup_steps=3, peak_flops=1e9
    )
    trainer.fit()
    scalars = _scalars(tmp_path / "tensorboard")
    expected = {"loss/total", "loss/a", "loss/b", "acc/a", "acc/b", "optim/lr", "optim/grad_norm",
                "optim/loss_scale", "optim/skipped_steps", "perf/samples_per_sec", "perf/tokens_per_sec",
                "perf/step_time_s", "perf/data_wait_pct", "perf/mfu_pct", "data/skipped/corrupt"}  # fmt: skip
    assert expected <= scalars.keys() and "memory/max_allocated_gib" not in scalars  # CPU: no device memory
    assert [s for s, _ in scalars["loss/total"]] == [2, 4]
    losses = read_losses(tmp_path / "losses", 0)
    assert scalars["loss/total"][0][1] == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-6)
    assert scalars["optim/lr"][1][1] == pytest.approx(lr_at(3, 1e-2, 3, 4), rel=1e-6)
    assert scalars["data/skipped/corrupt"][1][1] == (3 + 1) // 3
    assert scalars["optim/loss_scale"][0][1] == 1.0 and scalars["optim/skipped_steps"][1][1] == 0.0
    assert all(v > 0 for _, v in scalars["perf/samples_per_sec"] + scalars["optim/grad_norm"])
    flops_per_sample = 6.0 * sum(p.numel() for p in ToyMultiwayTask().parameters())  # the toy's batch_stats
    for (_, samples_per_sec), (_, mfu) in zip(scalars["perf/samples_per_sec"], scalars["perf/mfu_pct"]):
        assert mfu == pytest.approx(100 * samples_per_sec * flops_per_sample / 1e9, rel=1e-5)
    # the toy pads nothing and says no unpadded figure: the unpadded MFU is the same
    assert scalars["perf/mfu_unpadded_pct"] == pytest.approx(scalars["perf/mfu_pct"], rel=1e-6)
    # nor any recomputation: the HFU is the MFU
    assert scalars["perf/hfu_pct"] == pytest.approx(scalars["perf/mfu_pct"], rel=1e-6)
    groups = trainer.engine.optimizer.param_groups
    assert all(g["lr"] == pytest.approx(lr_at(3, 1e-2, 3, 4) * g["lr_scale"]) for g in groups)
    assert {g["lr_scale"] for g in groups} == {1.0, 0.5}
    assert "step 4/4 | " in capsys.readouterr().out


class CountingData(ToyData):
    """Adding a data counter: declared in ``counter_names``, counted in ``counters()``; no engine change."""

    counter_names = (*ToyData.counter_names, "samples/toy")

    def counters(self) -> dict[str, float]:
        return {**super().counters(), "samples/toy": self.index * self.micro_batch}


def test_a_counter_the_data_source_declares_is_logged_as_data_name_and_checkpointed(tmp_path):
    trainer = make_trainer(tmp_path, "zero0_fp32.json", 4, data_cls=CountingData)
    trainer.fit()
    per_step = trainer.gas * trainer.data.micro_batch
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["data/samples/toy"] == [(2, 2.0 * per_step), (4, 4.0 * per_step)]
    assert scalars["data/skipped/corrupt"][-1] == (4, float((4 * trainer.gas) // 3))
    state = torch.load(latest_checkpoint(tmp_path) / "trainer_rank00000.pt", weights_only=False)
    assert state["data_counters"] == {
        "skipped/corrupt": float((4 * trainer.gas) // 3),
        "samples/toy": 4.0 * per_step,
    }


class _NoStartAt(ToyData):
    start_at = None


class _UndeclaredCounter(ToyData):
    def counters(self) -> dict[str, float]:
        return {**super().counters(), "extra": 1.0}


def test_a_data_source_outside_the_protocol_is_refused_naming_what_it_lacks(tmp_path):
    from beit3.engine.data_source import DataSource, check_data_source

    check_data_source(ToyData(2))
    assert isinstance(ToyData(2), DataSource)
    with pytest.raises(
        TypeError, match="list lacks state_dict, load_state_dict, start_at, counters, counter_names"
    ):
        check_data_source([{"xa": torch.zeros(1, 8)}])
    with pytest.raises(TypeError, match=r"undeclared: \['extra'\], not returned: \[\]"):
        check_data_source(_UndeclaredCounter(2))
    with pytest.raises(TypeError, match="_NoStartAt lacks start_at"):
        make_trainer(tmp_path, "zero0_fp32.json", 2, data_cls=_NoStartAt)


def test_mfu_is_omitted_on_cpu_without_a_peak_override(tmp_path):
    make_trainer(tmp_path, "zero0_fp32.json", 2).fit()
    assert "perf/mfu_pct" not in _scalars(tmp_path / "tensorboard")


@pytest.mark.parametrize(
    "ds_name",
    [
        "zero0_fp32.json",
        "zero0_bf16.json",
        "zero1_bf16.json",
        "zero2_bf16.json",
        "zero3_fp32.json",
        "zero3_bf16.json",
    ],
)
def test_consolidated_checkpoint_matches_the_live_module(tmp_path, ds_name):
    overrides = {"train_batch_size": None, "train_micro_batch_size_per_gpu": 2}
    trainer = make_trainer(tmp_path, ds_name, 2, overrides)
    trainer.fit()
    state = consolidate_checkpoint(tmp_path)
    assert all(t.dtype == torch.float32 for t in state.values())
    verify_against_module(state, trainer.engine.module)
    if "bf16" in ds_name and not ds_name.startswith("zero0"):  # fp32 masters, not the bf16 weights widened
        assert any(not torch.equal(v, v.bfloat16().float()) for v in state.values())
    plain = ToyMultiwayTask()
    plain.load_state_dict(state)  # strict: every key of a plain module, nothing else
    tampered = {**state, "head.bias": state["head.bias"] + 1e-3}
    with pytest.raises(ConsolidationError, match="head.bias"):
        verify_against_module(tampered, trainer.engine.module)
    with pytest.raises(ConsolidationError, match="missing"):
        verify_against_module({k: v for k, v in state.items() if k != "embed.weight"}, trainer.engine.module)


class _SignalAt(ToyData):
    """Sends this process ``sig`` while yielding batch ``at`` (a Slurm pre-emption warning or time limit)."""

    def __init__(self, *args, at: int, sig: int = signal.SIGUSR1, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.sig = at, sig

    def _batches(self):
        for batch in super()._batches():
            if batch["index"] == self.at:
                os.kill(os.getpid(), self.sig)
            yield batch


class _ClosingData(_SignalAt):
    """A source with worker processes to end (the optional ``close()``): counts the calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize("stop_at", [None, 2], ids=["finished", "preempted"])
def test_the_trainer_closes_a_data_source_that_has_close_when_training_ends(tmp_path, stop_at):
    at = {"at": stop_at} if stop_at is not None else {"at": -1}
    trainer = make_trainer(tmp_path, "zero0_fp32.json", 6, data_cls=_ClosingData, data_kwargs=at)
    assert trainer.data.closed == 0
    result = trainer.fit()
    assert result.exit_reason == ("finished" if stop_at is None else "preempted")
    assert trainer.data.closed == 1


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_preemption_signal_saves_and_reports_preempted_then_resume_continues(tmp_path, sig):
    trainer = make_trainer(
        tmp_path, "zero0_fp32.json", 50, data_cls=_SignalAt, data_kwargs={"at": 3, "sig": sig}
    )
    previous = signal.getsignal(sig)
    result = trainer.fit()
    assert (result.exit_reason, result.step, result.exit_code) == ("preempted", 4, EXIT_PREEMPTED)
    assert signal.getsignal(sig) is previous  # handlers restored
    assert latest_checkpoint(tmp_path).name == "step00000004"
    resumed = make_trainer(tmp_path, "zero0_fp32.json", 6)
    assert (resumed.step, resumed.data.index) == (4, 4)
    assert resumed.fit().exit_reason == "finished"


def test_preempted_and_resumed_run_repeats_the_uninterrupted_losses_with_dropout(tmp_path):
    """Dropout RNG and data position survive a save/resume; the data draws from the RNG in iter() like a
    DataLoader, so the RNG must be restored after the iterator is made."""
    straight = make_trainer(
        tmp_path / "straight", "zero0_fp32.json", 6, task_kwargs={"record_path": str(tmp_path / "a")}
    )
    straight.fit()
    recording = {"record_path": str(tmp_path / "b")}
    first = make_trainer(tmp_path / "run", "zero0_fp32.json", 6, None, recording,
                         data_cls=_SignalAt, data_kwargs={"at": 2})  # fmt: skip
    assert first.fit().exit_reason == "preempted" and first.step == 3
    second = make_trainer(tmp_path / "run", "zero0_fp32.json", 6, task_kwargs=recording)
    assert second.step == 3 and second.fit().exit_reason == "finished"
    assert read_losses(tmp_path / "b", 0) == read_losses(tmp_path / "a", 0)


def test_fp16_dynamic_loss_scale_is_logged(tmp_path, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)  # Trap 2
    overrides = {"train_micro_batch_size_per_gpu": 2, "fp16.initial_scale_power": 8}
    make_trainer(tmp_path, "zero2_fp16.json", 2, overrides).fit()
    scale = _scalars(tmp_path / "tensorboard")["optim/loss_scale"]
    assert scale[-1][1] in (2.0**8, 2.0**7)  # initial scale, or halved once on an overflow


def test_eval_fn_runs_every_eval_every_steps_in_eval_mode_and_its_scalars_are_logged(tmp_path):
    calls = []

    def evaluate(step: int) -> dict[str, float]:
        calls.append((step, trainer.engine.module.training, torch.is_grad_enabled()))
        return {"eval/score": float(step)}

    trainer = make_trainer(tmp_path, "zero0_fp32.json", 5, eval_every=2)
    trainer.eval_fn = evaluate
    trainer.fit()
    assert calls == [(2, False, False), (4, False, False), (5, False, False)]
    assert trainer.engine.module.training
    assert [v for _, v in _scalars(tmp_path / "tensorboard")["eval/score"]] == [2.0, 4.0, 5.0]


def test_resume_from_an_explicit_tag_dir_into_a_new_run(tmp_path):
    make_trainer(tmp_path / "a", "zero0_fp32.json", 4, save_every=2).fit()
    tag_dir = tmp_path / "a" / "checkpoints" / "step00000002"
    assert make_trainer(tmp_path / "b", "zero0_fp32.json", 4, resume=str(tag_dir)).step == 2
    assert make_trainer(tmp_path / "c", "zero0_fp32.json", 4, resume="none").step == 0
    with pytest.raises(CheckpointError, match="--resume auto"):
        make_trainer(tmp_path / "a", "zero0_fp32.json", 4, resume="none")
    with pytest.raises(CheckpointError, match="pass auto, none"):
        make_trainer(tmp_path / "d", "zero0_fp32.json", 4, resume=str(tmp_path / "nowhere"))


def test_init_distributed_is_idempotent():
    from beit3.engine.launch import init_distributed

    first = init_distributed()
    assert init_distributed() is first and (first.rank, first.world_size, first.device.type) == (0, 1, "cpu")


class RepositionableData(ToyData):
    """A toy stream that, like the pretraining loader, can re-seed from a position (``start_at``)."""

    started_at: list[int] = []

    def start_at(self, batches: int) -> None:
        RepositionableData.started_at.append(batches)
        self.index = 10_000 + batches  # a fresh region of the stream, not its first batches


def test_resume_on_another_world_size_repositions_the_data_instead_of_replaying_it(tmp_path):
    """Per-rank data states cannot be mapped to another world size: the loader continues at the position."""
    out = tmp_path / "run"
    first = make_trainer(out, "zero0_fp32.json", steps=3, data_cls=RepositionableData, save_every=3)
    assert first.fit().exit_reason == "finished"
    marker = out / "checkpoints" / "step00000003" / "complete.json"
    state = json.loads(marker.read_text())
    marker.write_text(
        json.dumps({**state, "world_size": state["world_size"] + 1})
    )  # as if written by 2 ranks
    RepositionableData.started_at.clear()
    second = make_trainer(out, "zero0_fp32.json", steps=4, data_cls=RepositionableData, resume="auto")
    assert second.step == 3 and RepositionableData.started_at == [3]
    assert second.fit().step == 4 and second.data.index == 10_000 + 3 + 1
