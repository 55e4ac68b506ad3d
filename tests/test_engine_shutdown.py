"""``shutdown_distributed`` leaves a process able to train again: a second ``init_distributed`` and Trainer
(another ZeRO stage) in the same process work (DeepSpeed's cached groups are released with the world)."""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from engine_helpers import DS_CONFIGS, ToyData, ToyMultiwayTask
from beit3.engine.ds_config import load_ds_config
from beit3.engine.launch import init_distributed
from beit3.engine.trainer import Trainer, TrainerConfig

for i, name in enumerate(["zero3_fp32.json", "zero1_bf16.json"]):
    dist = init_distributed()
    batch = {{"train_batch_size": None, "train_micro_batch_size_per_gpu": 3}}
    ds = load_ds_config(DS_CONFIGS / name, dist.world_size, batch)
    cfg = TrainerConfig(output_dir={out!r} + str(i), total_steps=2, log_every=1, warmup_steps=1)
    print("run", i, Trainer(ToyMultiwayTask(), ToyData(3), ds, cfg, dist).fit().exit_reason, flush=True)
"""


def test_a_second_trainer_after_shutdown_trains_in_the_same_process(tmp_path):
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    code = SCRIPT.format(tests=str(HERE), out=str(tmp_path / "run"))
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("finished") == 2, proc.stdout
