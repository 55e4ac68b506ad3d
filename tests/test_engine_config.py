"""Specification of the engine's pure parts: DeepSpeed config loading, LR schedules, rendezvous resolution."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from engine_helpers import single_rank  # noqa: F401,F811  (a fixture)

from beit3.engine.ds_config import EngineConfigError, load_ds_config, precision_of
from beit3.engine.launch import LaunchError, add_launcher_args, resolve_rendezvous, slurm_master_port
from beit3.engine.lr import lr_at
from beit3.engine.metrics import MetricAccumulator, device_peak_flops, format_console

DS_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))
BASE = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}


class _DataParallel:
    """The one mpu method DeepSpeedConfig asks for: lets its batch checks run for any world size."""

    def __init__(self, world: int):
        self.world = world

    def get_data_parallel_world_size(self) -> int:
        return self.world


def test_the_project_ships_every_named_config():
    names = {p.name for p in DS_CONFIGS}
    assert {
        "zero3_bf16.json",
        "zero2_bf16.json",
        "zero1_bf16.json",
        "zero0_bf16.json",
        "zero3_fp32.json",
        "zero0_fp32.json",
        "zero2_fp16.json",
    } <= names


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("world", [1, 256])
def test_every_config_passes_our_loader_and_deepspeeds_parser(path, world, single_rank):  # noqa: F811
    from deepspeed.runtime.config import DeepSpeedConfig

    config = load_ds_config(path, world)
    parsed = DeepSpeedConfig(config, mpu=_DataParallel(world))
    assert parsed.train_batch_size == config["train_batch_size"]
    assert (
        parsed.train_micro_batch_size_per_gpu * parsed.gradient_accumulation_steps * world
        == parsed.train_batch_size
    )
    assert parsed.zero_optimization_stage == config["zero_optimization"]["stage"]


def test_giant_config_is_global_6144_as_24_per_gpu_on_256_gpus():
    path = Path(DS_CONFIGS[0]).with_name("zero3_bf16.json")
    config = load_ds_config(path, 256)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (6144, 24)
    assert config["gradient_accumulation_steps"] == 1
    assert config["bf16"]["enabled"] and config["data_types"]["grad_accum_dtype"] == "fp32"
    assert config["gradient_clipping"] == 3.0 and config["zero_optimization"]["overlap_comm"]
    # Half the GPUs keep the global batch by accumulating twice.
    assert load_ds_config(path, 128)["gradient_accumulation_steps"] == 2


def test_missing_batch_key_is_derived_from_the_other_two():
    assert load_ds_config(BASE, 8)["train_batch_size"] == 32
    both = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4}
    assert load_ds_config(both, 8)["gradient_accumulation_steps"] == 2
    glob = {"train_batch_size": 64, "gradient_accumulation_steps": 2}
    assert load_ds_config(glob, 8)["train_micro_batch_size_per_gpu"] == 4


def test_global_batch_not_divisible_by_world_times_micro_names_the_fix():
    with pytest.raises(EngineConfigError, match="multiple of 12"):
        load_ds_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4}, 3)


def test_inconsistent_triple_is_rejected():
    with pytest.raises(EngineConfigError, match="drop one"):
        load_ds_config({**BASE, "train_batch_size": 10, "gradient_accumulation_steps": 1}, 2)


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_blocks_are_rejected(block):
    with pytest.raises(EngineConfigError, match=f"remove the '{block}' block"):
        load_ds_config({**BASE, block: {"type": "AdamW"}}, 1)


def test_bf16_and_fp16_together_are_rejected():
    with pytest.raises(EngineConfigError, match="both enabled"):
        load_ds_config({**BASE, "bf16": {"enabled": True}, "fp16": {"enabled": True}}, 1)


def test_fp32_accumulation_without_zero_is_rejected_before_deepspeed_fails():
    config = {
        **BASE,
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": True},
        "data_types": {"grad_accum_dtype": "fp32"},
    }
    with pytest.raises(EngineConfigError, match="ZeRO stage 1-3"):
        load_ds_config(config, 1)


def test_dotted_overrides_set_nested_keys_and_none_removes(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**BASE, "train_batch_size": 8}))
    config = load_ds_config(
        path, 2, {"zero_optimization.stage": 3, "bf16.enabled": True, "train_batch_size": None}
    )
    assert config["zero_optimization"]["stage"] == 3 and precision_of(config) == "bf16"
    assert config["train_batch_size"] == 8 and json.loads(path.read_text())["zero_optimization"]["stage"] == 2


def test_unreadable_config_names_the_folder(tmp_path):
    with pytest.raises(EngineConfigError, match="ds_configs"):
        load_ds_config(tmp_path / "missing.json", 1)


def test_lr_warmup_is_linear_then_cosine_reaches_min_lr():
    lrs = [lr_at(s, 1.0, 4, 14, 0.1) for s in range(16)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[9] == pytest.approx(0.55) and lrs[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[15] == pytest.approx(0.1)


def test_lr_linear_and_constant_schedules():
    assert lr_at(7, 2.0, 2, 12, 0.0, "linear") == pytest.approx(1.0)
    assert lr_at(100, 2.0, 2, 12, 0.0, "constant") == 2.0
    assert math.isclose(lr_at(0, 2.0, 0, 10, 0.0, "cosine"), 2.0)
    with pytest.raises(ValueError, match="cosine"):
        lr_at(0, 1.0, 0, 10, schedule="step")


def test_torchrun_env_is_used_as_is():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    assert resolve_rendezvous(env) == env


def test_deepspeed_launcher_local_rank_argument_fills_local_rank():
    args = add_launcher_args(__import__("argparse").ArgumentParser()).parse_args(["--local_rank=1"])
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert resolve_rendezvous(env, args.local_rank)["LOCAL_RANK"] == "1"


def test_slurm_step_env_gives_rank_world_and_a_job_derived_port():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_JOB_ID": "123456",
        "MASTER_ADDR": "node7",
    }
    out = resolve_rendezvous(env)
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"], out["MASTER_ADDR"]) == ("5", "8", "1", "node7")
    assert out["MASTER_PORT"] == str(slurm_master_port(123456)) and 20000 <= int(out["MASTER_PORT"]) < 40000


def test_slurm_without_scontrol_or_master_addr_says_to_export_it(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        resolve_rendezvous({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"})


def test_bare_process_gets_a_local_single_rank_rendezvous():
    out = resolve_rendezvous({})
    assert (out["RANK"], out["WORLD_SIZE"], out["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert out["MASTER_PORT"] == "0"  # bound by the kernel's choice: no probe-then-bind race
    assert resolve_rendezvous({"MASTER_PORT": "29123"})["MASTER_PORT"] == "29123"


def test_metric_means_count_only_the_micro_batches_that_reported_each_metric():
    step = MetricAccumulator(torch.device("cpu"))
    step.add({"loss/total": torch.tensor(2.0), "acc/mim": 0.5})
    step.add({"loss/total": torch.tensor(4.0)})
    window = MetricAccumulator(torch.device("cpu"))
    window.merge(step)
    window.add({"loss/total": 6.0, "acc/mim": torch.tensor(1.0)})
    means, sums = window.reduce(["acc/itc", "acc/mim", "loss/total"], {"perf/samples": 12})
    assert means == {"acc/mim": 0.75, "loss/total": 4.0} and sums == {"perf/samples": 12.0}


def test_peak_flops_table_and_override():
    assert device_peak_flops(torch.device("cpu")) is None
    assert device_peak_flops(torch.device("cpu"), override=5e12) == 5e12


def test_console_line_shows_step_and_every_scalar():
    line = format_console(3, 10, {"loss/total": 2.345678, "optim/lr": 1e-4})
    assert line == "step 3/10 | loss/total 2.346 | optim/lr 0.0001"


def test_console_line_sums_the_data_skip_counters_into_one_total():
    scalars = {"loss/total": 1.0, "data/skipped/image_decode": 2.0, "data/skipped/text_empty": 3.0,
               "data/samples/image": 40.0}  # fmt: skip
    assert format_console(5, 10, scalars) == "step 5/10 | loss/total 1 | data/skipped 5"


def test_engine_package_and_pure_modules_import_without_deepspeed():
    import subprocess
    import sys

    code = (
        "import sys, beit3.engine, beit3.engine.ds_config, beit3.engine.lr, beit3.engine.task;"
        "assert 'deepspeed' not in sys.modules, sorted(m for m in sys.modules if m.startswith('deepspeed'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_trainer_config_for_a_run_is_the_recipe_table_plus_the_run_fields():
    import dataclasses

    from beit3.engine.trainer_config import TrainerConfig, TrainSettings

    settings = TrainSettings(total_steps=7, lr=3e-4, betas=(0.9, 0.95))
    cfg = TrainerConfig.for_run(settings, "out", resume="none", shutdown_at_end=False)
    assert (cfg.total_steps, cfg.lr, cfg.betas, cfg.output_dir, cfg.resume) == (
        7,
        3e-4,
        (0.9, 0.95),
        "out",
        "none",
    )
    assert not cfg.shutdown_at_end
    assert cfg.settings() == settings  # the recipe's table comes back without the run fields
    run_fields = {f.name for f in dataclasses.fields(TrainerConfig)} - {
        f.name for f in dataclasses.fields(TrainSettings)
    }
    assert run_fields == {"output_dir", "resume", "run_info", "handle_signals", "shutdown_at_end"}


# ----- ranges: every numeric setting is checked, with a message that names it -----


@pytest.mark.parametrize(
    "text,inside,outside,shown",
    [
        ("[0, 1)", [0, 0.5], [1, -0.1, float("nan")], "in [0, 1)"),
        ("(0, inf)", [1e-12, 3], [0, -1, float("inf"), float("nan")], "> 0"),
        ("[1, inf)", [1, 10**9], [0, 0.99], ">= 1"),
        ("(0, 1]", [1, 0.1], [0, 1.01], "in (0, 1]"),
        ("(-inf, inf)", [-5.0, 0, 7], [float("nan"), float("inf"), -float("inf")], "finite"),
    ],
)
def test_a_range_holds_its_values_and_says_what_it_accepts(text, inside, outside, shown):
    from beit3.engine.config_io import Range

    allowed = Range.parse(text)
    assert all(v in allowed for v in inside) and not any(v in allowed for v in outside)
    assert str(allowed) == shown


def test_range_problem_names_the_setting_checks_each_element_and_refuses_bools():
    import dataclasses

    from beit3.engine.config_io import range_problem

    @dataclasses.dataclass
    class Section:
        lr: float = 1e-3
        betas: tuple = (0.9, 0.98)
        steps: int = 3

    rules = {"lr": "(0, inf)", "betas": "[0, 1)", "steps": "[1, inf)"}
    assert range_problem(Section(), "train", rules) is None
    assert range_problem(Section(lr=-1.0), "train", rules) == "train.lr=-1.0 is out of range: must be > 0"
    message = range_problem(Section(betas=(0.9, 1.0)), "train", rules)
    assert message == "train.betas=[0.9, 1.0] is out of range: each value must be in [0, 1)"
    assert "train.steps=True" in range_problem(Section(steps=True), "train", rules)


def test_a_fixed_length_tuple_in_a_recipe_needs_exactly_that_many_values():
    import dataclasses

    from beit3.engine.config_io import ConfigError, from_dict

    @dataclasses.dataclass
    class Section:
        crop_scale: tuple[float, float] = (0.2, 1.0)
        sizes: tuple[int, ...] = (1,)

    assert from_dict(Section, {"crop_scale": [0.5, 1], "sizes": [1, 2, 3]}).crop_scale == (0.5, 1.0)
    with pytest.raises(ConfigError, match=r"crop_scale: expected 2 values, got 1 \(\[0.5\]\)"):
        from_dict(Section, {"crop_scale": [0.5]})
    with pytest.raises(ConfigError, match="crop_scale: expected 2 values, got 3"):
        from_dict(Section, {"crop_scale": [0.1, 0.5, 1.0]})
    with pytest.raises(ConfigError, match="crop_scale: expected float"):
        from_dict(Section, {"crop_scale": ["a", 1.0]})


def _outside(text: str, value):
    """A value just outside the range ``text`` (below its low end, or above its high end)."""
    from beit3.engine.config_io import Range

    r = Range.parse(text)
    step = 1 if isinstance(value, int) else 0.5
    below = r.low - (0 if r.low_open else step)
    return type(value)(below) if not math.isinf(below) else type(value)(r.high + (0 if r.high_open else step))


def _train_ranges() -> dict[str, str]:
    from beit3.engine.config_io import declared_ranges
    from beit3.engine.trainer_config import TrainSettings

    return declared_ranges(TrainSettings)


@pytest.mark.parametrize("name", sorted(_train_ranges()))
def test_every_trainer_setting_out_of_range_is_refused_by_name(name, tmp_path):
    import dataclasses

    from beit3.engine.trainer_config import TrainerConfig

    ranges = _train_ranges()
    cfg = TrainerConfig(
        output_dir=str(tmp_path), total_steps=10, lr=1e-3, min_lr=0.0, peak_flops=1e12, watchdog_s=30.0
    )
    cfg.validate()
    value = getattr(cfg, name)
    bad = (
        tuple(_outside(ranges[name], v) for v in value)
        if isinstance(value, tuple)
        else _outside(ranges[name], value)
    )
    with pytest.raises(EngineConfigError, match=f"TrainerConfig.{name}="):
        dataclasses.replace(cfg, **{name: bad}).validate()


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"min_lr": 1.0}, "min_lr=1.0 exceeds lr=0.001"),
        ({"schedule": "step"}, "schedule='step' is unknown"),
        ({"optimizer": "sgd"}, "optimizer='sgd' is unknown"),
        ({"betas": (0.9,)}, "betas=[0.9] needs two values"),
    ],
)
def test_trainer_settings_that_contradict_each_other_are_refused(changes, expected, tmp_path):
    """(warmup_steps > total_steps is refused by the recipes; the engine runs it on its warmup ramp.)"""
    from beit3.engine.trainer_config import TrainerConfig

    with pytest.raises(EngineConfigError, match=re.escape(expected)):
        TrainerConfig(output_dir=str(tmp_path), total_steps=10, lr=1e-3, **changes).validate()


def test_an_output_dir_that_is_or_lies_below_a_file_is_refused(tmp_path):
    from beit3.engine.trainer_config import check_output_dir

    check_output_dir(str(tmp_path / "new" / "run"))  # creatable: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(EngineConfigError, match="is a file, not a directory"):
        check_output_dir(str(tmp_path / "file"))
    with pytest.raises(EngineConfigError, match="cannot be created"):
        check_output_dir(str(tmp_path / "file" / "run"))


def test_a_precision_the_device_cannot_train_in_is_refused(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    from beit3.engine.trainer_config import check_precision_supported

    accelerator = get_accelerator()
    monkeypatch.setattr(type(accelerator), "is_fp16_supported", lambda self: False)
    monkeypatch.setattr(type(accelerator), "is_bf16_supported", lambda self: False)
    check_precision_supported({"train_micro_batch_size_per_gpu": 1})  # fp32 runs anywhere
    with pytest.raises(
        EngineConfigError, match="fp16.enabled=true .* cannot train in fp16: use a bf16 or fp32"
    ):
        check_precision_supported({"fp16": {"enabled": True}})
    with pytest.raises(EngineConfigError, match="bf16.enabled=true .* cannot train in bf16"):
        check_precision_supported({"bf16": {"enabled": True}})
    monkeypatch.setattr(type(accelerator), "is_fp16_supported", lambda self: True)
    check_precision_supported({"fp16": {"enabled": True}})


def test_deepspeeds_own_parser_refuses_a_misspelt_key_in_one_line():
    from beit3.engine.trainer_config import check_with_deepspeed_parser

    config = load_ds_config(DS_CONFIGS[0].with_name("zero2_bf16.json"), 8)
    check_with_deepspeed_parser(config, 8)
    config["zero_optimization"]["reduce_scater"] = True
    with pytest.raises(EngineConfigError) as err:
        check_with_deepspeed_parser(config, 8)
    assert "reduce_scater" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "expected,world,unit,fix",
    [
        (128, 8, 1, "micro_batch_size_per_gpu=16 --ds-set gradient_accumulation_steps=1"),
        (6144, 64, 3, "micro_batch_size_per_gpu=24 --ds-set gradient_accumulation_steps=4"),
        (100, 8, 1, "change the ranks"),
        (192, 8, 1, None),
        (0, 8, 1, None),
    ],
)  # fmt: skip
def test_a_global_batch_the_config_does_not_give_is_refused_with_the_options_that_do(
    expected, world, unit, fix
):
    from beit3.engine.ds_config import global_batch_problem

    config = {"train_micro_batch_size_per_gpu": 24}
    resolved = load_ds_config(config, world)
    problem = global_batch_problem(resolved, expected, world, unit)
    if fix is None:
        assert problem is None
        return
    assert fix in problem
    if "--ds-set" in problem:
        from beit3.engine.config_io import dotted_overrides

        fixed = load_ds_config({**config, **dotted_overrides(re.findall(r"--ds-set (\S+)", problem))}, world)
        assert fixed["train_batch_size"] == expected and fixed["train_micro_batch_size_per_gpu"] % unit == 0
