"""Process-group setup for every way this project is launched.

Reads the rendezvous from, in order: torchrun or the ``deepspeed`` launcher (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` or ``--local_rank``), a Slurm ``srun`` step (``SLURM_PROCID``, ``SLURM_LOCALID``,
``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``), or a bare single process (a local rendezvous on a port the
kernel picks, so DeepSpeed never tries MPI discovery). CUDA ranks use NCCL and bind their device; CPU ranks
use gloo, and DeepSpeed's shared-memory op is not JIT-compiled (45 s per machine, used only by inference
all-reduce).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from beit3.engine.errors import EngineError
from beit3.engine.supervise import register_rank


class LaunchError(EngineError, RuntimeError):
    """The environment does not describe a usable rendezvous."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the rank that writes shared files and logs."""
        return self.rank == 0


_CURRENT: DistInfo | None = None

# DeepSpeed 0.19.8 calls torch's collectives by their deprecated names at every ZeRO step; the warning
# is DeepSpeed's to fix and says nothing about this code.
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`",
    category=FutureWarning,
)


def add_launcher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept the ``--local_rank``/``--local-rank`` argument the ``deepspeed`` launcher passes to scripts."""
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        dest="local_rank",
        type=int,
        default=-1,
        help="set by the deepspeed launcher; leave unset otherwise",
    )
    return parser


def add_run_args(parser: argparse.ArgumentParser, config_help: str) -> argparse.ArgumentParser:
    """The options every training program shares: recipe, DeepSpeed JSON, run directory, resume, overrides,
    and the launcher's ``--local_rank``."""
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--ds-config", required=True,
                        help="DeepSpeed JSON (ds_configs/*.json); batch sizes live there")  # fmt: skip
    parser.add_argument("--output-dir", required=True,
                        help="run directory: config.json, checkpoints/, tensorboard/")  # fmt: skip
    parser.add_argument("--resume", default="auto",
                        help="'auto' (latest checkpoint if any), 'none', or a checkpoint dir")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value, e.g. --set train.lr=5e-4 (repeatable)")  # fmt: skip
    parser.add_argument("--ds-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a DeepSpeed value, e.g. zero_optimization.stage=2")  # fmt: skip
    add_trust_arg(parser)
    return add_launcher_args(parser)


def add_trust_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--trust-checkpoint``: unpickle checkpoint files in full; without it, files holding types beyond the
    loaders' allowlists are refused (engine/safe_load.py, model/checkpoint.py)."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load checkpoint files in full, although unpickling can run code: only for "
                        "files you trust (default: refuse types a weights file does not need)")  # fmt: skip
    return parser


def slurm_master_port(job_id: str | int, base: int = 20000, span: int = 20000) -> int:
    """A rendezvous port derived from the job id, so that two jobs sharing a node do not collide."""
    return base + int(job_id) % span


def _slurm_master_addr(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise LaunchError(
            f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol ({err}); "
            "export MASTER_ADDR in the sbatch script"
        ) from err
    hosts = out.split()
    if not hosts:
        raise LaunchError(f"scontrol returned no host for {nodelist!r}; export MASTER_ADDR")
    return hosts[0]


def resolve_rendezvous(env: dict[str, str], local_rank_arg: int = -1) -> dict[str, str]:
    """The torch.distributed env variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    Pure except for the Slurm node-list expansion.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        local = env.get("LOCAL_RANK", str(max(local_rank_arg, 0)))
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise LaunchError(
                "RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not; "
                "launch with torchrun or deepspeed, or export both"
            )
        return {
            "RANK": env["RANK"],
            "WORLD_SIZE": env["WORLD_SIZE"],
            "LOCAL_RANK": local,
            "MASTER_ADDR": env["MASTER_ADDR"],
            "MASTER_PORT": env["MASTER_PORT"],
        }
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        world = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
        addr = env.get("MASTER_ADDR") or _slurm_master_addr(env.get("SLURM_JOB_NODELIST", "localhost"))
        port = env.get("MASTER_PORT") or str(slurm_master_port(env.get("SLURM_JOB_ID", "0")))
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": world,
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": addr,
            "MASTER_PORT": port,
        }
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": str(max(local_rank_arg, 0)),
        "MASTER_ADDR": "127.0.0.1",
        # Port 0: the store binds a port the kernel picks, at bind time (a probed "free" port can be taken
        # by another process before the bind: EADDRINUSE). No other rank needs to know it.
        "MASTER_PORT": env.get("MASTER_PORT") or "0",
    }


def _skip_shm_op_build() -> None:
    """Trap 1: replace DeepSpeed's per-init build of its CPU shared-memory op (inference-only) by a no-op."""
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)

    # `import deepspeed.comm.torch as m` would bind torch itself (a star import shadows the name):
    # the module object must come from sys.modules.
    module = sys.modules["deepspeed.comm.torch"]
    module.build_shm_op = lambda: None


INIT_TIMEOUT_ENV, COLLECTIVE_TIMEOUT_ENV = "BEIT3_INIT_TIMEOUT_S", "BEIT3_COLLECTIVE_TIMEOUT_S"
DEFAULT_INIT_TIMEOUT_S = DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0


def timeout_from_env(name: str, default: float, env: dict[str, str] | None = None) -> float:
    """Seconds from the environment variable ``name`` (``default`` when unset or empty); LaunchError naming
    the variable when it is not a positive number."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise LaunchError(f"{name}={raw!r} must be a number of seconds > 0 (default {default:g})")
    return value


def init_distributed(
    local_rank: int = -1, timeout_s: float | None = None, collective_timeout_s: float | None = None
) -> DistInfo:
    """Initialise torch.distributed and DeepSpeed's comm layer once; later calls return the same DistInfo.

    ``timeout_s`` bounds the rendezvous and process-group set-up (else ``BEIT3_INIT_TIMEOUT_S``, default
    1800 s), ``collective_timeout_s`` every collective afterwards (else ``BEIT3_COLLECTIVE_TIMEOUT_S``,
    default 1800 s): a collective that waits longer raises on gloo, aborts the communicator on NCCL. Keep
    it above the hang watchdog's limit (engine/watchdog.py) so that a hang ends in stack dumps.
    """
    global _CURRENT
    if _CURRENT is not None and torch_dist.is_initialized():
        return _CURRENT
    if timeout_s is None:
        timeout_s = timeout_from_env(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT_S)
    if collective_timeout_s is None:
        collective_timeout_s = timeout_from_env(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S)
    rendezvous = resolve_rendezvous(dict(os.environ), local_rank)
    os.environ.update(rendezvous)
    rank, world, local = (int(rendezvous[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
        backend = "gloo"
    import deepspeed

    if device.type == "cpu":
        _skip_shm_op_build()
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            verbose=False,
            timeout=timedelta(seconds=timeout_s),
            rank=rank,
            world_size=world,
        )
        if collective_timeout_s != timeout_s:
            _set_collective_timeout(collective_timeout_s)
    else:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    _CURRENT = DistInfo(rank=rank, world_size=world, local_rank=local, device=device)
    register_rank(rank)  # under beit3-launch: signals are forwarded to this pid, its exit code is collected
    return _CURRENT


def _set_collective_timeout(seconds: float) -> None:
    """The default group's timeout after set-up (torch's ``_set_pg_timeout``, present since torch 2.3)."""
    from torch.distributed import distributed_c10d

    setter = getattr(distributed_c10d, "_set_pg_timeout", None)
    if setter is None:
        warnings.warn(
            f"this torch cannot change a process group's timeout: collectives keep the set-up timeout "
            f"({COLLECTIVE_TIMEOUT_ENV} ignored)",
            stacklevel=2,
        )
        return
    setter(timedelta(seconds=seconds))


def shutdown_distributed() -> None:
    """Barrier, then destroy the process group (avoids the occasional SIGABRT at interpreter exit)."""
    global _CURRENT
    if torch_dist.is_initialized():
        torch_dist.barrier()
        # DeepSpeed's own call: it also drops the groups DeepSpeed cached, so that a later init_distributed
        # and Trainer in the same process get fresh ones ("Group ... is not registered" otherwise).
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    _CURRENT = None
