"""A toy task and a resumable toy dataset for the engine tests, and a script that runs training scenarios.

The toy model mimics Multiway routing: a shared embedding and head, two "experts" (one per modality);
every micro-batch carries an ``a`` and a ``b`` sub-batch forwarded in that fixed order, so every optimizer
step touches every parameter (the ZeRO-3 requirement). Run as a script under torchrun or with Slurm-like
env variables: ``python tests/engine_helpers.py --runs '<json list of run specs>'``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = REPO / "ds_configs"


class ToyMultiwayTask(nn.Module):
    """Shared embedding, two experts, shared head; loss = CE(a) + CE(b). Records per-batch losses if asked."""

    def __init__(
        self,
        in_dim: int = 8,
        dim: int = 16,
        classes: int = 4,
        dropout: float = 0.1,
        record_path: str | None = None,
        kill_at_batch: int = -1,
    ):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.expert_a = nn.Linear(dim, dim)
        self.expert_b = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)
        self.dropout = nn.Dropout(dropout)
        self.record_path, self.kill_at_batch = record_path, kill_at_batch

    def _branch(
        self, x: torch.Tensor, y: torch.Tensor, expert: nn.Linear
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.dropout(F.gelu(self.embed(x.to(self.embed.weight.dtype))))
        logits = self.head(h + expert(h)).float()
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Loss of both sub-batches and per-branch metrics."""
        loss_a, acc_a = self._branch(batch["xa"], batch["ya"], self.expert_a)
        loss_b, acc_b = self._branch(batch["xb"], batch["yb"], self.expert_b)
        loss = loss_a + loss_b
        self._record(batch["index"], loss)
        metrics = {"loss/a": loss_a, "loss/b": loss_b, "acc/a": acc_a, "acc/b": acc_b}
        if os.environ.get("RANK") == "1" and batch["index"] % 2:
            metrics["debug/rank1_odd_index"] = float(
                batch["index"]
            )  # a metric only some micro-batches report
        return loss, metrics

    def _record(self, index: int, loss: torch.Tensor) -> None:
        rank = int(os.environ.get("RANK", "0"))
        if self.kill_at_batch == index and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # a node failure: no handler, no flush, no save
        if self.record_path:
            Path(self.record_path).parent.mkdir(parents=True, exist_ok=True)
            with open(f"{self.record_path}_rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"index": index, "loss": float(loss.detach())}) + "\n")

    def prepare_batch(self, batch: dict, device: torch.device) -> dict:
        """Tensors to ``device``; the rest unchanged."""
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def param_groups(self) -> list[dict]:
        """Biases without weight decay; the head at half the learning rate (exercises lr_scale)."""
        decay = [p for n, p in self.named_parameters() if n.endswith("weight") and not n.startswith("head")]
        no_decay = [p for n, p in self.named_parameters() if n.endswith("bias")]
        return [
            {"params": decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": [self.head.weight], "lr_scale": 0.5},
        ]

    def batch_stats(self, batch: dict) -> dict:
        """Samples of both sub-batches, one token each, 6 x params FLOPs per token."""
        samples = len(batch["ya"]) + len(batch["yb"])
        params = sum(p.numel() for p in self.parameters())
        return {"samples": samples, "tokens": samples, "flops": 6.0 * params * samples}


class ToyData:
    """An endless, per-rank stream of mixed micro-batches; sample j depends only on (seed, rank, j).

    Micro-batch i holds samples [i*m, (i+1)*m), so 4 micro-batches of 1 see the same samples as one of 4.
    ``nan_batches`` fills the ``a`` inputs of those batch indices with NaN. Its one counter (the engine's
    data-source protocol) mimics a loader's cumulative skip count: ``(i + 1) // 3 + rank`` after batch ``i``.
    """

    counter_names = ("skipped/corrupt",)

    def __init__(
        self,
        micro_batch: int,
        rank: int = 0,
        seed: int = 0,
        in_dim: int = 8,
        classes: int = 4,
        nan_batches: tuple[int, ...] = (),
    ):
        self.micro_batch, self.rank, self.seed = micro_batch, rank, seed
        self.in_dim, self.classes, self.nan_batches = in_dim, classes, set(nan_batches)
        self.index = 0

    def _sample(self, j: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + j)
        xa, xb = torch.randn(2, self.in_dim, generator=gen)
        ya, yb = torch.randint(0, self.classes, (2,), generator=gen)
        return xa, ya, xb, yb

    def __iter__(self):
        # Like torch's DataLoader, which draws its workers' base seed from the global RNG in iter().
        torch.empty((), dtype=torch.int64).random_()
        return self._batches()

    def _batches(self):
        while True:
            i, m = self.index, self.micro_batch
            xa, ya, xb, yb = (
                torch.stack(t) for t in zip(*(self._sample(j) for j in range(i * m, (i + 1) * m)))
            )
            if i in self.nan_batches:
                xa = torch.full_like(xa, float("nan"))
            self.index += 1
            yield {"xa": xa, "ya": ya, "xb": xb, "yb": yb, "index": i}

    def state_dict(self) -> dict:
        """The next batch index."""
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position."""
        self.index = state["index"]

    def start_at(self, micro_batches: int) -> None:
        """Continue at batch ``micro_batches`` (a resume on another world size)."""
        self.index = micro_batches

    def counters(self) -> dict[str, float]:
        """The skip count after the batches handed out."""
        return {"skipped/corrupt": self.index // 3 + self.rank}


@pytest.fixture(scope="session")
def single_rank():
    """This pytest process as a one-rank gloo job (import this fixture into a test module)."""
    from beit3.engine.launch import init_distributed

    return init_distributed()


def tensorboard_run(run_dir: Path) -> dict[str, dict[int, float]]:
    """Tag -> step -> the last value written for it across every event file of the run (oldest file first),
    in step order: a step that a resumed run logs again has the resumed run's value
    (:func:`beit3.engine.metrics.read_scalars`, the project's one reader of event files)."""
    from beit3.engine.metrics import read_scalars

    return read_scalars(run_dir)


def tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """Step -> the last value written for ``tag`` (see :func:`tensorboard_run`); empty if never written."""
    return tensorboard_run(run_dir).get(tag, {})


def signal_loader_group(code: str, args: list[str], signals: tuple[int, ...]) -> tuple[str, str, list]:
    """Run ``code`` (a loader that prints ``ready <worker pids>`` once its workers run) in its own process
    group, as under torchrun or srun; send it ``signals`` group-wide; return its (stdout, stderr) once it
    exited with 0 and its worker processes (psutil), which must be gone too."""
    import psutil

    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        ready = child.stdout.readline().split()
        assert ready[:1] == ["ready"] and len(ready) >= 2, ready or child.stderr.read()
        workers = [psutil.Process(int(pid)) for pid in ready[1:]]
        for sig in signals:
            os.killpg(child.pid, sig)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 0, err[-2000:]
    assert "killed by signal" not in err
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    return out, err, workers


def free_port() -> int:
    """A TCP port nobody listens on right now (for a launcher's ``--master_port``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """This environment without the rendezvous the in-process tests set or a Slurm job's variables, one
    thread per rank, and ``extra``."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def launcher(nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N --master_port <a free port>``: the start of a
    multi-rank test command (the program and its arguments follow)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port())]  # fmt: skip


def torchrun(
    specs: list[dict], results: Path, nproc: int = 2, script: str = __file__, timeout: int = 240
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N script --runs <specs> --results <results>``; ``script``: this file."""
    Path(results).mkdir(parents=True, exist_ok=True)
    cmd = [*launcher(nproc), script, "--runs", json.dumps(specs), "--results", str(results)]
    return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def finetune_on_two_ranks(recipe: Path, run: Path, ds_config: str, micro_batch: int = 2, timeout: int = 300):
    """``torchrun --nproc_per_node 2 -m beit3.finetune.train`` (gloo) of ``recipe`` into ``run`` under
    ``ds_configs/<ds_config>``; fails the test with the launcher's stderr when it does not exit 0."""
    cmd = [*launcher(2), "-m", "beit3.finetune.train", "--config", str(recipe), "--ds-config",
           str(REPO / "ds_configs" / ds_config), "--output-dir", str(run),
           "--ds-set", f"train_micro_batch_size_per_gpu={micro_batch}"]  # fmt: skip
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


def read_loss_rows(record_path: str | Path, rank: int) -> list[tuple[int, float]]:
    """Every (batch index, loss) that ToyMultiwayTask recorded, in order (re-run batches appear twice)."""
    with open(f"{record_path}_rank{rank}.jsonl") as f:
        return [(row["index"], row["loss"]) for row in map(json.loads, f)]


def read_losses(record_path: str | Path, rank: int) -> dict[int, float]:
    """Batch index -> the first loss recorded for it."""
    out: dict[int, float] = {}
    for index, loss in read_loss_rows(record_path, rank):
        out.setdefault(index, loss)
    return out


def run_one(spec: dict, dist) -> dict:
    """Build the toy task and a Trainer from a run spec and fit; returns a JSON-able summary."""
    from beit3.engine.ds_config import load_ds_config
    from beit3.engine.trainer import Trainer, TrainerConfig

    torch.manual_seed(spec.get("init_seed", 0))  # identical initial weights in every run
    out = Path(spec["output_dir"])
    task = ToyMultiwayTask(
        dropout=spec.get("dropout", 0.1),
        record_path=str(out / "losses"),
        kill_at_batch=spec.get("kill_at_batch", -1),
    )
    ds = load_ds_config(DS_CONFIGS / spec["ds_config"], dist.world_size, spec.get("overrides", {}))
    data = ToyData(
        ds["train_micro_batch_size_per_gpu"], rank=dist.rank, nan_batches=spec.get("nan_batches", ())
    )
    cfg = TrainerConfig(
        output_dir=str(out),
        total_steps=spec["steps"],
        log_every=spec.get("log_every", 2),
        save_every=spec.get("save_every", 0),
        resume=spec.get("resume", "auto"),
        lr=1e-2,
        warmup_steps=2,
        max_nonfinite_in_row=spec.get("max_nonfinite_in_row", 3),
        shutdown_at_end=False,
    )
    if spec.get("kill_in_save_at_step") is not None and dist.rank == spec.get("kill_rank", 1):
        _kill_inside_save(spec["kill_in_save_at_step"])
    trainer = Trainer(task, data, ds, cfg, dist)
    result = trainer.fit()
    return {
        "name": spec.get("name", out.name),
        "step": result.step,
        "exit_reason": result.exit_reason,
        "exit_code": result.exit_code,
        "last_metrics": result.last_metrics,
    }


def _kill_inside_save(step: int) -> None:
    """SIGKILL this rank in the save of ``step``: after DeepSpeed wrote its files, before the marker."""
    from beit3.engine import checkpoint

    real = checkpoint.describe_files

    def describe_then_die(tag_dir, names):
        if tag_dir.name == checkpoint.tag_for_step(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tag_dir, names)

    checkpoint.describe_files = describe_then_die


def main(argv: list[str] | None = None) -> int:
    """Run the given specs in order in this process; write results_rank<r>.json next to the first run."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True, help="JSON list of run specs")
    parser.add_argument("--results", required=True, help="folder for results_rank<r>.json")
    from beit3.engine.launch import add_launcher_args, init_distributed, shutdown_distributed

    args = add_launcher_args(parser).parse_args(argv)
    dist = init_distributed(args.local_rank)
    specs, results = json.loads(args.runs), []
    code = 0
    for spec in specs:
        summary = run_one(spec, dist)
        results.append(summary)
        Path(args.results, f"results_rank{dist.rank}.json").write_text(json.dumps(results))
        code = summary["exit_code"]
        if code:
            break
    shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())


def make_trainer(
    out: Path,
    ds_name: str,
    steps: int,
    overrides: dict | None = None,
    task_kwargs: dict | None = None,
    data_kwargs: dict | None = None,
    data_cls: type | None = None,
    **cfg_kwargs,
):
    """An in-process one-rank Trainer on the toy task (the caller holds the ``single_rank`` fixture)."""
    from beit3.engine.ds_config import load_ds_config
    from beit3.engine.launch import init_distributed
    from beit3.engine.trainer import Trainer, TrainerConfig

    dist = init_distributed()
    torch.manual_seed(0)
    task = ToyMultiwayTask(**(task_kwargs or {}))
    ds = load_ds_config(DS_CONFIGS / ds_name, dist.world_size, overrides)
    data = (data_cls or ToyData)(ds["train_micro_batch_size_per_gpu"], rank=dist.rank, **(data_kwargs or {}))
    settings = {"log_every": 2, "save_every": 0, "lr": 1e-2, "warmup_steps": 2, "shutdown_at_end": False}
    cfg = TrainerConfig(output_dir=str(out), total_steps=steps, **{**settings, **cfg_kwargs})
    return Trainer(task, data, ds, cfg, dist)


def full_parameters(trainer) -> dict[str, torch.Tensor]:
    """The trained module's parameters as fp32 CPU copies (gathered under ZeRO-3)."""
    from beit3.engine.consolidate import _gathered

    module = trainer.engine.module
    with _gathered(module):
        return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}


def base_optimizer(trainer) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers."""
    opt = trainer.engine.optimizer
    while not isinstance(opt, torch.optim.AdamW):
        opt = opt.optimizer
    return opt
