"""Communication of one optimizer step under each shipped ZeRO config, counted from DeepSpeed's collectives.

Runs the real engine (``beit3.engine.trainer.Trainer``, the real pretraining task module
``MaskedDataModeling``, synthetic mixed micro-batches from ``bench/synthetic.py``) on CPU gloo ranks started
by torchrun, with a scaled giant: the giant preset's widths (d=1408, FFN 6144, 16 heads, its vocabularies)
with few layers (default 2, the top one with the vision-language expert) and small images (the sequence
length does not change what is communicated). Every collective DeepSpeed issues goes through its backend
object (``deepspeed.comm.comm.cdb``); the program wraps that object's methods and records, per call, the op,
the bytes it moves (all-gather: the gathered output; reduce-scatter, all-reduce, reduce: the input) and its
process group. DeepSpeed's own comms logger (``comms_logger`` in the DeepSpeed config) runs alongside and
its call counts and message sizes are kept in the JSON as a cross-check. Under ZeRO-3 each parameter's
``all_gather_coalesced`` is also wrapped, which gives how often each parameter is gathered per step; mapped
onto the full giant's parameter list (40 layers, the top 3 with VL experts) that projects its gathered bytes
and all-gather calls per step without running it; only with ``--reuse none`` (every parameter released after
each use, no prefetch), since the 2-layer model's whole step lies within the shipped reuse distance, the
giant's does not.

An optimizer step is what lies between two returns of ``engine.step()`` (one micro-batch per step); the
first step (ZeRO-3 records its module trace there) is run but not counted. ``--nodes 2`` runs
``2 x --ranks-per-node`` ranks as simulated nodes (ranks ``[0, r)``, ``[r, 2r)``), with
``zero_hpz_partition_size`` set to the ranks per node where a config asks for hierarchical partitioning;
bytes of collectives whose group spans both simulated nodes are reported as cross-node.

Prints a table and writes ``bench/results/<name>.{md,json}``::

    python bench/zero_comm.py        # every shipped ZeRO config this machine can train, 2 ranks
    python bench/zero_comm.py --nodes 2 --reuse none --configs zero3_bf16_hpz.json zero3_bf16.json \\
        zero2_bf16.json --name zero_comm_2nodes   # 2 simulated nodes of 2 ranks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DS_DIR = ROOT / "ds_configs"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/synthetic.py when run as a worker

# Gathering ops report the gathered (output) bytes; reducing and broadcasting ops their input.
GATHERS = ("all_gather_into_tensor", "all_gather", "all_gather_base", "all_gather_coalesced")
REDUCES = ("reduce_scatter_tensor", "reduce_scatter", "all_reduce", "all_reduce_coalesced", "reduce")
OTHERS = ("broadcast", "all_to_all_single")
LAYER = re.compile(r"\.layers\.(\d+)\.")


def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CollectiveRecorder:
    """Wraps the methods of DeepSpeed's communication backend object; ``calls`` lists (op, bytes, group
    ranks) in order. Nested calls (an op implemented through another) are recorded once, as the outer op."""

    def __init__(self, ranks_per_node: int):
        self.calls: list[tuple[str, int, tuple[int, ...]]] = []
        self.ranks_per_node, self._depth = ranks_per_node, 0

    def install(self) -> None:
        import deepspeed.comm.comm as ds_comm

        backend = ds_comm.cdb
        for op in GATHERS + REDUCES + OTHERS:
            if hasattr(backend, op):
                setattr(backend, op, self._wrap(op, getattr(backend, op)))

    def _wrap(self, op: str, fn):
        def recorded(*args, **kwargs):
            if self._depth == 0:
                self.calls.append((op, self._bytes(op, args, kwargs), self._group(args, kwargs)))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return recorded

    @staticmethod
    def _bytes(op: str, args: tuple, kwargs: dict) -> int:
        if op in GATHERS:  # (output, input, ...): what lands on this rank
            return _nbytes(kwargs.get("output_tensor", kwargs.get("tensor_list", args[0] if args else None)))
        if op in ("reduce_scatter_tensor", "reduce_scatter", "all_to_all_single"):  # (output, input, ...)
            key = {"reduce_scatter_tensor": "input_tensor", "reduce_scatter": "input_list"}.get(op, "input")
            return _nbytes(kwargs.get(key, args[1] if len(args) > 1 else None))
        return _nbytes(kwargs.get("tensor", kwargs.get("tensors", args[0] if args else None)))

    @staticmethod
    def _group(args: tuple, kwargs: dict) -> tuple[int, ...]:
        import torch.distributed as dist

        group = kwargs.get("group")
        if group is None:
            group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
        if group is None:
            return tuple(range(dist.get_world_size()))
        return tuple(dist.get_process_group_ranks(group))

    def summary(self, start: int, end: int) -> dict:
        """Calls and bytes per op over ``calls[start:end]``; cross-node bytes where a group spans nodes."""
        out: dict[str, dict] = {}
        for op, nbytes, ranks in self.calls[start:end]:
            row = out.setdefault(op, {"calls": 0, "bytes": 0, "cross_node_bytes": 0, "group_sizes": []})
            row["calls"] += 1
            row["bytes"] += nbytes
            if len({r // self.ranks_per_node for r in ranks}) > 1:
                row["cross_node_bytes"] += nbytes
            if len(ranks) not in row["group_sizes"]:
                row["group_sizes"].append(len(ranks))
        return out


def comms_logger_totals() -> dict:
    """DeepSpeed's comms logger so far: op -> (calls, sum of its message sizes)."""
    from deepspeed.comm.comm import comms_logger

    return {
        op: [sum(v[0] for v in sizes.values()), sum(size * v[0] for size, v in sizes.items())]
        for op, sizes in comms_logger.comms_dict.items()
    }


class ParameterGathers:
    """ZeRO-3: which parameters each all-gather call carries (each parameter's ``all_gather_coalesced``,
    the entry the parameter coordinator calls, wrapped)."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[tuple[str, ...]] = []
        self.names = {id(p): n for n, p in module.named_parameters()}
        for p in module.parameters():
            if hasattr(p, "all_gather_coalesced"):
                p.all_gather_coalesced = self._wrap(p.all_gather_coalesced)

    def _wrap(self, fn):
        def recorded(params, *args, **kwargs):
            params = list(params)
            self.calls.append(tuple(self.names[id(p)] for p in params))
            return fn(params, *args, **kwargs)

        return recorded

    def per_parameter(self, start: int, end: int) -> dict[str, list[float]]:
        """name -> [gathers, share of calls] over ``calls[start:end]`` (a call counts 1/len toward each of
        its parameters, so the shares sum to the number of calls)."""
        out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for names in self.calls[start:end]:
            for n in names:
                out[n][0] += 1
                out[n][1] += 1 / len(names)
        return dict(out)


class SyntheticSource:
    """Endless synthetic mixed micro-batches (the engine's data-source protocol, no counters)."""

    counter_names: tuple[str, ...] = ()

    def __init__(self, cfg, rank: int, spec: dict):
        self.cfg, self.rank, self.spec, self.index = cfg, rank, spec, 0

    def __iter__(self):
        from synthetic import synthetic_batch

        while True:
            s = self.spec
            batch = synthetic_batch(
                self.cfg,
                s["images"],
                s["texts"],
                s["pairs"],
                s["text_len"],
                s["pair_text_len"],
                seed=1000 * self.rank + self.index,
            )
            self.index += 1
            yield batch

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]

    def start_at(self, micro_batches: int) -> None:
        self.index = micro_batches

    def counters(self) -> dict[str, float]:
        return {}


def model_overrides(spec: dict) -> dict:
    return {"depth": spec["depth"], "vl_expert_layers": spec["vl_layers"], "img_size": spec["img_size"]}


def ds_config_for(spec: dict, world: int) -> dict:
    """The shipped config at one micro-batch per step, hpZ set to the ranks per (simulated) node, with
    DeepSpeed's comms logger on."""
    from beit3.engine.ds_config import load_ds_config

    raw = json.loads((DS_DIR / spec["ds_config"]).read_text())
    micro = spec["images"] + spec["texts"] + spec["pairs"]
    overrides = {
        "train_batch_size": None,
        "gradient_accumulation_steps": 1,
        "train_micro_batch_size_per_gpu": micro,
    }
    zero = raw["zero_optimization"]
    if zero.get("zero_hpz_partition_size", 1) > 1:
        overrides["zero_optimization.zero_hpz_partition_size"] = spec["ranks_per_node"]
    if spec["reuse"] == "none" and zero["stage"] == 3:
        # Release every gathered parameter after each use (an upper bound): what the giant's coordinator
        # does wherever the next use lies beyond stage3_max_reuse_distance (1e9 parameters, about one pass
        # of the giant; the scaled model's whole step is nearer: as shipped, each parameter is gathered once).
        # Without prefetch too: in a 2-layer model the next pass's first layers lie inside the prefetch
        # window and stay gathered, which in the giant's 40-layer trace they are not.
        overrides["zero_optimization.stage3_max_reuse_distance"] = 0
        overrides["zero_optimization.stage3_prefetch_bucket_size"] = 0
    config = load_ds_config(raw, world, overrides)
    config["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    return config


def run_worker(spec: dict, dist, out: Path) -> dict:
    """One config: build the task and Trainer, fit ``steps`` steps, return what each step communicated."""
    from beit3.engine.trainer import Trainer, TrainerConfig
    from beit3.model import build_model
    from beit3.pretrain.objective import MaskedDataModeling

    torch.manual_seed(0)
    model = build_model(spec["model"], **model_overrides(spec))
    task = MaskedDataModeling(model, layer_gathering=spec.get("gather_units", "layers") == "layers")
    ds = ds_config_for(spec, dist.world_size)
    data = SyntheticSource(model.cfg, dist.rank, spec)
    cfg = TrainerConfig(
        output_dir=str(out),
        total_steps=spec["steps"] + 1,
        log_every=10**6,
        save_every=0,
        resume="none",
        lr=1e-4,
        tensorboard=False,
        watchdog_s=0,
        shutdown_at_end=False,
        handle_signals=False,
    )
    recorder = CollectiveRecorder(spec["ranks_per_node"])
    recorder.install()
    trainer = Trainer(task, data, ds, cfg, dist)
    trainer.save = lambda *a, **k: 0.0  # the final checkpoint is not what is measured (GBs of disk)
    stage = trainer.engine.zero_optimization_stage()
    gathers = ParameterGathers(trainer.engine.module) if stage == 3 else None
    marks = [(len(recorder.calls), comms_logger_totals(), len(gathers.calls) if gathers else 0, time.time())]
    engine_step = trainer.engine.step

    def step_and_mark(*args, **kwargs):
        result = engine_step(*args, **kwargs)
        marks.append(
            (len(recorder.calls), comms_logger_totals(), len(gathers.calls) if gathers else 0, time.time())
        )
        return result

    trainer.engine.step = step_and_mark
    trainer.fit()
    params = {
        n: p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        for n, p in trainer.engine.module.named_parameters()
    }
    dtype = next(trainer.engine.module.parameters()).dtype
    steps = []
    for (c0, log0, g0, t0), (c1, log1, g1, t1) in zip(marks[1:-1], marks[2:]):
        logged = {
            op: [v[0] - log0.get(op, [0, 0])[0], v[1] - log0.get(op, [0, 0])[1]] for op, v in log1.items()
        }
        steps.append(
            {
                "ops": recorder.summary(c0, c1),
                "comms_logger": {op: v for op, v in logged.items() if v[0]},
                "param_gathers": gathers.per_parameter(g0, g1) if gathers else None,
                "seconds": t1 - t0,
            }
        )
    return {
        "ds_config": spec["ds_config"],
        "stage": stage,
        "world_size": dist.world_size,
        "ranks_per_node": spec["ranks_per_node"],
        "dtype": str(dtype).removeprefix("torch."),
        "hpz": ds["zero_optimization"].get("zero_hpz_partition_size", 1),
        "params": params,
        "persistent": [
            n for n, p in trainer.engine.module.named_parameters() if getattr(p, "ds_persist", False)
        ],
        "steps": steps,
    }


def worker_main(argv: list[str]) -> int:
    from beit3.engine.launch import add_launcher_args, init_distributed, shutdown_distributed

    p = add_launcher_args(argparse.ArgumentParser())
    p.add_argument("--runs", required=True)
    p.add_argument("--results", required=True)
    args = p.parse_args(argv)
    dist = init_distributed(args.local_rank)
    results = []
    for spec in json.loads(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run_worker(spec, dist, Path(tmp)))
        Path(args.results, f"rank{dist.rank}.json").write_text(json.dumps(results))
    shutdown_distributed()
    return 0


# ---------------------------------------------------------------- the parent: launch, aggregate, report


def launch(specs: list[dict], nproc: int, results: Path, timeout: int) -> list[list[dict]]:
    """torchrun ``nproc`` CPU ranks (one thread each) over ``specs``; every rank's results."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(port),
        str(Path(__file__).resolve()),
        "--worker",
        "--runs",
        json.dumps(specs),
        "--results",
        str(results),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(nproc)]


def giant_projection(
    run: dict,
    gather_calls: float,
    giant_names: dict[str, int],
    depth: int,
    giant_depth: int,
    vl: int,
    giant_vl: int,
) -> dict:
    """ZeRO-3: the full giant's gathered bytes and all-gather calls per step from the scaled run's
    per-parameter gathers (layer i of the giant takes the gathers of the scaled layer of its kind).
    Persistent parameters (under the persistence threshold: the same in both, the widths being equal) are
    gathered once per step, after the optimizer step; the all-gather calls the parameter coordinator did
    not make (that one) are taken as they were measured."""

    def scaled_name(name: str) -> str:
        m = LAYER.search(name)
        if not m:
            return name
        i = int(m.group(1))
        j = depth - 1 if i >= giant_depth - giant_vl else max(depth - vl - 1, 0)
        return name[: m.start(1)] + str(j) + name[m.end(1) :]

    per_param, persistent = mean_param_gathers(run), set(run["persistent"])
    gathered = calls = 0.0
    for name, numel in giant_names.items():
        count, share = per_param.get(scaled_name(name), (0.0, 0.0))
        gathered += (count + (scaled_name(name) in persistent)) * numel
        calls += share
    other = gather_calls - sum(share for _, share in per_param.values())
    return {"gathered_x_params": gathered / sum(giant_names.values()), "all_gather_calls": calls + other}


def mean_param_gathers(run: dict) -> dict[str, tuple[float, float]]:
    steps = [s["param_gathers"] for s in run["steps"]]
    names = {n for s in steps for n in s}
    return {n: tuple(sum(s.get(n, [0, 0])[k] for s in steps) / len(steps) for k in (0, 1)) for n in names}


def summarize(run: dict, giant: dict | None) -> dict:
    """Per-step means of rank 0's counts, as multiples of the parameter bytes in the training dtype."""
    steps = run["steps"]
    bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2}[run["dtype"]]
    param_bytes = sum(run["params"].values()) * bytes_per
    ops = sorted({op for s in steps for op in s["ops"]})

    def mean(op: str, key: str) -> float:
        return sum(s["ops"].get(op, {}).get(key, 0) for s in steps) / len(steps)

    gather_ops = [op for op in ops if op in GATHERS]
    reduce_ops = [op for op in ops if op in REDUCES]
    # What a ring algorithm moves per rank, relative to the bytes counted (about (n-1)/n of it, taken as 1):
    # an all-reduce is a reduce-scatter plus an all-gather of its tensor, twice the bytes.
    wire = {op: 2.0 if op in ("all_reduce", "all_reduce_coalesced") else 1.0 for op in ops}
    row = {
        "ds_config": run["ds_config"],
        "stage": run["stage"],
        "dtype": run["dtype"],
        "ranks": run["world_size"],
        "ranks_per_node": run["ranks_per_node"],
        "hpz": run["hpz"],
        "params": sum(run["params"].values()),
        "param_bytes": param_bytes,
        "gathered_x": sum(mean(op, "bytes") for op in gather_ops) / param_bytes,
        "reduced_x": sum(mean(op, "bytes") for op in reduce_ops) / param_bytes,
        "gather_calls": sum(mean(op, "calls") for op in gather_ops),
        "reduce_calls": {op: mean(op, "calls") for op in reduce_ops},
        "wire_x": sum(wire[op] * mean(op, "bytes") for op in gather_ops + reduce_ops) / param_bytes,
        "cross_node_x": sum(wire[op] * mean(op, "cross_node_bytes") for op in ops) / param_bytes,
        "ops": {
            op: {
                "calls": mean(op, "calls"),
                "bytes": mean(op, "bytes"),
                "cross_node_bytes": mean(op, "cross_node_bytes"),
                "group_sizes": sorted(
                    {g for s in steps for g in s["ops"].get(op, {}).get("group_sizes", [])}
                ),
            }
            for op in ops
        },
        "comms_logger": {
            op: [sum(s["comms_logger"].get(op, [0, 0])[k] for s in steps) / len(steps) for k in (0, 1)]
            for op in sorted({op for s in steps for op in s["comms_logger"]})
        },
        "steps_measured": len(steps),
        "steps_identical": all(s["ops"] == steps[0]["ops"] for s in steps),
        "seconds_per_step": sum(s["seconds"] for s in steps) / len(steps),
    }
    if run["stage"] == 3 and giant is not None:
        row["giant"] = giant_projection(run, row["gather_calls"], **giant)
    if run["stage"] == 3:  # gathers per step of each parameter by the coordinator (+1: persistent)
        row["param_gathers"] = {
            n: c + (n in run["persistent"]) for n, (c, _) in mean_param_gathers(run).items()
        }
        row["param_gathers"].update({n: 1.0 for n in run["persistent"] if n not in row["param_gathers"]})
    return row


def format_table(rows: list[dict]) -> str:
    cols = [
        "config",
        "ranks",
        "dtype",
        "params",
        "gathered (x param bytes)",
        "all-gather calls",
        "reduced (x param bytes)",
        "reduce calls",
        "ring volume (x)",
        "cross-node (x)",
        "giant: gathered (x)",
        "giant: all-gather calls",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        nodes = r["ranks"] // r["ranks_per_node"]
        giant = r.get("giant")
        cells = [
            r["ds_config"] + (f" (hpz {r['hpz']})" if r["hpz"] > 1 else ""),
            f"{r['ranks']}" + (f" ({nodes} nodes of {r['ranks_per_node']})" if nodes > 1 else ""),
            r["dtype"],
            f"{r['params'] / 1e6:.1f}M",
            f"{r['gathered_x']:.2f}",
            f"{r['gather_calls']:g}",
            f"{r['reduced_x']:.2f}",
            ", ".join(f"{op} {c:g}" for op, c in r["reduce_calls"].items()) or "-",
            f"{r['wire_x']:.2f}",
            f"{r['cross_node_x']:.2f}" if nodes > 1 else "-",
            f"{giant['gathered_x_params']:.2f}" if giant else "-",
            f"{giant['all_gather_calls']:.0f}" if giant else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trainable_here(name: str) -> bool:
    """Whether this machine's accelerator can train the config's precision (fp16 is refused on most CPUs)."""
    from deepspeed.accelerator import get_accelerator

    from beit3.engine.ds_config import precision_of

    precision = precision_of(json.loads((DS_DIR / name).read_text()))
    accel = get_accelerator()
    return {"fp16": accel.is_fp16_supported, "bf16": accel.is_bf16_supported}.get(precision, lambda: True)()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/zero_comm.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help="ds_configs/ file names (default: every zero*.json this machine can train)",
    )
    p.add_argument("--model", default="beit3_giant_patch14_224")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--vl-layers", type=int, default=1, help="top layers with the vision-language expert")
    p.add_argument("--img-size", type=int, default=56, help="image size (patches of the preset's size)")
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--texts", type=int, default=1)
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--pair-text-len", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="steps counted (after one uncounted first step)")
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--nodes", type=int, default=1, help="simulated nodes (ranks = nodes x ranks per node)")
    p.add_argument(
        "--reuse",
        choices=("shipped", "none"),
        default="shipped",
        help="ZeRO-3: the config's stage3_max_reuse_distance, or 0 (release after every use)",
    )
    p.add_argument(
        "--gather-units",
        choices=("layers", "submodules"),
        default="layers",
        help="ZeRO-3: each encoder layer gathered as one unit (the default of MaskedDataModeling), or "
        "DeepSpeed's per-submodule gathering (layer_gathering=False, as before)",
    )
    p.add_argument("--timeout", type=int, default=1800, help="seconds for each torchrun launch")
    p.add_argument("--name", default="zero_comm", help="results file stem under --results-dir")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        return worker_main([a for a in argv if a != "--worker"])
    args = build_parser().parse_args(argv)

    from beit3.model import build_model

    configs = args.configs or [p.name for p in sorted(DS_DIR.glob("zero*.json"))]
    skipped = [c for c in configs if not trainable_here(c)]
    configs = [c for c in configs if c not in skipped]
    ranks = args.nodes * args.ranks_per_node
    base = {
        "model": args.model,
        "depth": args.depth,
        "vl_layers": args.vl_layers,
        "img_size": args.img_size,
        "images": args.images,
        "texts": args.texts,
        "pairs": args.pairs,
        "text_len": args.text_len,
        "pair_text_len": args.pair_text_len,
        "steps": args.steps,
        "ranks_per_node": args.ranks_per_node,
    }
    base["reuse"] = args.reuse
    base["gather_units"] = args.gather_units
    giant_model = build_model(args.model, device="meta")
    specs = [{**base, "ds_config": c} for c in configs]
    start = time.time()
    giant = {
        "giant_names": {f"model.{n}": p.numel() for n, p in giant_model.named_parameters()},
        "depth": args.depth,
        "giant_depth": giant_model.cfg.depth,
        "vl": args.vl_layers,
        "giant_vl": giant_model.cfg.vl_expert_layers,
    }
    rows = []
    for spec in specs:  # one launch per config: each starts with the memory of one engine only
        with tempfile.TemporaryDirectory() as tmp:
            (run, *others) = (runs[0] for runs in launch([spec], ranks, Path(tmp), args.timeout))
        # The projection needs the giant's reuse pattern: on the scaled model only "--reuse none" has it.
        projects = args.depth < giant_model.cfg.depth and args.reuse == "none"
        rows.append(summarize(run, giant if projects else None))
        # the same counts on every rank (recorded per rank)
        rows[-1]["other_ranks_gathered_x"] = [summarize(o, None)["gathered_x"] for o in others]
        write_report(args, argv, base, rows, skipped, time.time() - start)
    return 0


def write_report(args, argv: list[str], base: dict, rows: list[dict], skipped: list[str], wall_s: float):
    """Print the table; write ``<name>.json`` and ``<name>.md`` (rewritten after every config)."""
    import deepspeed

    ranks = args.nodes * args.ranks_per_node
    table = format_table(rows)
    command = " ".join(["python bench/zero_comm.py", *argv])
    device = (
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), gloo, {ranks} ranks"
    )
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
    }
    print(table)
    if skipped:
        print(f"not run (precision not supported on this device): {', '.join(skipped)}")
    result = {
        "command": command,
        "device": device,
        "versions": versions,
        "setup": base,
        "nodes": args.nodes,
        "skipped": skipped,
        "wall_s": wall_s,
        "rows": rows,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.results_dir / f"{args.name}.md").write_text(
        f"# bench/zero_comm.py: {args.name}\n\n"
        f"Command: `{command}`\n\nDevice: {device}; python {versions['python']}, torch {versions['torch']}, "
        f"deepspeed {versions['deepspeed']}\n\n"
        f"Model: {args.model} widths, {args.depth} layers ({args.vl_layers} with the VL expert), "
        f"{args.img_size} px; micro-batch {args.images} image + {args.texts} text of {args.text_len} + "
        f"{args.pairs} pair (caption {args.pair_text_len}); per optimizer step, mean of {args.steps} steps "
        f"after the first, rank 0 (bytes landing on / leaving one rank); ZeRO-3 reuse distance "
        f"{'as shipped' if args.reuse == 'shipped' else '0 (every parameter released after each use)'}."
        f"\n\n{table}\n"
        + (f"\nNot run (precision not supported on this device): {', '.join(skipped)}\n" if skipped else "")
    )


if __name__ == "__main__":
    sys.exit(main())
