"""Host synchronisations of a training step, counted from the aten ops it dispatches, by phase and source.

A synchronising op makes the host wait for the device: reading a device value (``.item()``, ``bool(t)``:
``aten._local_scalar_dense``) or an op whose output size depends on the data (``nonzero``, boolean indexing,
``masked_select``, ``unique``...). The op stream is the same on CPU as on a GPU, so this counts on CPU what a
GPU step would wait for. (A device-to-host copy, ``tensor.cpu()`` / ``tolist()`` of a device tensor, also
waits; on CPU it is no op at all, so it is not seen: the trainer's one flag read per optimizer step is one.)

Runs the real engine (``beit3.engine.trainer.Trainer``) on one gloo rank with the real pretraining task
(``MaskedDataModeling`` over a tiny paper-layout model, synthetic micro-batches from ``bench/synthetic.py``)
for each shipped DeepSpeed config this machine can run, and counts per optimizer step (after the first
two, where ZeRO-3 records and checks its trace): the task's ``prepare_batch``, DeepSpeed's forward,
backward and step, each split into ops issued from the project's code and from DeepSpeed's (by the
innermost frame of either on the stack). Prints a table and writes ``bench/results/<name>.{md,json}``::

    python bench/step_syncs.py
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_results  # noqa: E402  (bench/report.py, beside this file)

# aten ops that read device memory on the host, or whose output size depends on the data (the host must
# learn it before it can go on).
SYNCING = frozenset(
    {
        "aten._local_scalar_dense.default",
        "aten.is_nonzero.default",
        "aten.item.default",
        "aten.nonzero.default",
        "aten.masked_select.default",
        "aten.unique_consecutive.default",
        "aten._unique2.default",
        "aten.unique_dim.default",
        "aten.equal.default",
        "aten.repeat_interleave.Tensor",
        "aten.bincount.default",
    }
)
PHASES = ("prepare_batch", "forward", "backward", "step")
# Steps not counted: ZeRO-3 checks its module trace across ranks at the end of the first two (INVALID ->
# RECORD -> COMPLETE, each check a broadcast read on the host), then reuses it.
WARMUP = 2


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in (indices or ()))


def is_syncing(name: str, args) -> bool:
    """Whether aten op ``name`` called with ``args`` synchronises (boolean indexing included)."""
    return name in SYNCING or (name.startswith(("aten.index.", "aten.index_put")) and _bool_index(args))


class OpTrace(TorchDispatchMode):
    """Records every aten op dispatched inside it; ``syncing`` lists those that would synchronise, and with
    ``where=True`` ``sources`` the innermost project or DeepSpeed frame each came from."""

    def __init__(self, where: bool = False) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.syncing: list[str] = []
        self.sources: list[str] = []
        self.where = where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops.append(name)
        if is_syncing(name, args):
            self.syncing.append(name)
            if self.where:
                self.sources.append(_source())
        return func(*args, **(kwargs or {}))


def _source() -> str:
    """``deepspeed/<file>:<function>``, ``beit3/<file>:<function>`` or ``torch/optim/<file>:<function>`` of
    the innermost such frame, or the innermost frame outside torch."""
    frames = traceback.extract_stack()[:-3]
    for f in reversed(frames):
        path = f.filename.replace(os.sep, "/")
        if "/torch/optim/" in path:  # the base optimizer's own step (AdamW's CPU step counters)
            return "torch/optim/" + path.split("/torch/optim/", 1)[1] + ":" + f.name
        if "/deepspeed/" in path:
            return "deepspeed/" + path.split("/deepspeed/", 1)[1] + ":" + f.name
        if path.startswith(str(ROOT).replace(os.sep, "/")) and "/bench/" not in path:
            return "beit3/" + path[len(str(ROOT)) + 1 :] + ":" + f.name
    for f in reversed(frames):
        if "/torch/" not in f.filename.replace(os.sep, "/"):
            return f"{Path(f.filename).name}:{f.name}"
    return "torch"


def run_config(name: str, steps: int, spec: dict, warmup: int = WARMUP) -> dict:
    """Train ``warmup`` + ``steps`` optimizer steps under ``name``; the mean syncs of the last ``steps`` by
    phase and source."""
    from zero_comm import SyntheticSource, ds_config_for

    from beit3.engine.launch import init_distributed
    from beit3.engine.trainer import Trainer, TrainerConfig
    from beit3.model import build_model
    from beit3.pretrain.objective import MaskedDataModeling

    dist = init_distributed()
    torch.manual_seed(0)
    model = build_model(spec["model"], drop_path_rate=0.1)
    task = MaskedDataModeling(model)
    ds = ds_config_for({**spec, "ds_config": name, "ranks_per_node": 1, "reuse": "shipped"}, dist.world_size)
    ds.pop("comms_logger")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainerConfig(output_dir=tmp, total_steps=warmup + steps, log_every=10**6, save_every=0,
                            resume="none", lr=1e-4, tensorboard=False, watchdog_s=0, shutdown_at_end=False,
                            handle_signals=False)  # fmt: skip
        trainer = Trainer(task, SyntheticSource(model.cfg, dist.rank, spec), ds, cfg, dist)
        trainer.save = lambda *a, **k: 0.0
        per_step: list[collections.Counter] = [collections.Counter()]
        engine = trainer.engine

        def traced(fn, phase: str):
            def inner(*args, **kwargs):
                with OpTrace(where=True) as trace:
                    result = fn(*args, **kwargs)
                for source in trace.sources:
                    per_step[-1][(phase, source)] += 1
                if phase == "step":
                    per_step.append(collections.Counter())
                return result

            return inner

        task.prepare_batch = traced(task.prepare_batch, "prepare_batch")
        engine.forward = traced(engine.forward, "forward")
        engine.backward = traced(engine.backward, "backward")
        engine.step = traced(engine.step, "step")
        trainer.fit()
    counted = per_step[warmup:-1]  # the last Counter is empty
    total: collections.Counter = collections.Counter()
    for c in counted:
        total.update(c)
    mean = {f"{phase} | {source}": n / len(counted) for (phase, source), n in sorted(total.items())}
    by_phase = {p: sum(v for k, v in mean.items() if k.startswith(p + " |")) for p in PHASES}
    project = sum(v for k, v in mean.items() if "| beit3/" in k)
    return {"config": name, "steps_counted": len(counted), "per_step": by_phase, "project_per_step": project,
            "deepspeed_per_step": sum(by_phase.values()) - project, "sources": mean}  # fmt: skip


def trainable_here(name: str) -> bool:
    raw = json.loads((ROOT / "ds_configs" / name).read_text())
    return not (raw.get("fp16", {}).get("enabled") and not torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs", nargs="*", default=None, help="DeepSpeed configs (default: every shipped one)"
    )
    p.add_argument("--model", default="beit3_tiny_paper_patch16_64")
    p.add_argument("--steps", type=int, default=3, help=f"steps counted (after {WARMUP} uncounted ones)")
    p.add_argument("--name", default="step_syncs")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    import deepspeed

    names = args.configs or sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    names = [n for n in names if trainable_here(n) and not n.startswith("vqkd")]
    spec = {"model": args.model, "images": 2, "texts": 2, "pairs": 2, "text_len": 16, "pair_text_len": 8}
    start = time.time()
    rows = [run_config(n, args.steps, spec) for n in names]
    lines = [
        f"# bench/step_syncs.py: {args.name}",
        "",
        f"Command: `{' '.join(['python bench/step_syncs.py', *(sys.argv[1:] if argv is None else argv)])}`",
        "",
        f"Device: CPU ({platform.machine()}, {os.cpu_count()} cores), gloo, 1 rank; python "
        f"{platform.python_version()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}; "
        f"{time.time() - start:.0f} s",
        "",
        f"Task: MaskedDataModeling over {args.model} (drop path 0.1), micro-batch 2 images + 2 texts of 16 "
        f"+ 2 pairs (caption 8); synchronising aten ops per optimizer step, mean of {args.steps} steps after "
        f"{WARMUP} uncounted ones. 'project' = issued from beit3 code (prepare_batch, the model, the "
        "objective, the trainer); 'DeepSpeed' = everything else: deepspeed/ and the base optimizer it "
        "steps (torch/optim/). On CPU every tensor is a host tensor: a DeepSpeed list read element by "
        "element after one copy to the host counts once per element here, once in all on a GPU.",
        "",
        "| config | prepare_batch | forward | backward | step | project | DeepSpeed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ph = r["per_step"]
        lines.append(f"| {r['config']} | " + " | ".join(f"{ph[x]:g}" for x in PHASES)
                     + f" | {r['project_per_step']:g} | {r['deepspeed_per_step']:g} |")  # fmt: skip
    lines += ["", "Sources (phase | innermost project or DeepSpeed frame: per step):", ""]
    for r in rows:
        for k, v in r["sources"].items():
            lines.append(f"- {r['config']}: {k}: {v:g}")
    write_results(args.results_dir, args.name, "\n".join(lines) + "\n", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
