"""Finetune the small demo model on the offline dense-prediction sets: detection (COCO mAP) and semantic
segmentation (mIoU), from random init and from the quickstart checkpoint, against an untrained head.

The data is ``beit3-dense-data`` (beit3.finetune.dense.synthetic, docs/finetune.md "Offline dense data"):
Tux Paint stamps pasted on scikit-image photos, as COCO instances and in the ADE20K layout, and easy-VQA's
shapes in the ADE20K layout; validation photos (and, by category, stamps) unseen in training. Every run is
``beit3-finetune`` in a subprocess (one CPU process, ZeRO-0 fp32) on the task's small recipe with the data
folders set (evaluated once, at the end); the untrained-head column is the same command with one step at
``train.lr=1e-12`` (the model as built: the checkpoint's backbone, random weights without one, and a fresh
head), so its scores are what the metric gives before any learning. Writes ``bench/results/dense_small.md``
+ ``.json`` (device, versions, commands)::

    python bench/dense_small.py --pretrained runs/quickstart/export/model.pth --label stamp
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_small import _losses  # noqa: E402  (beside this file)
from report import environment_lines, write_results  # noqa: E402

# task -> (recipe, the data --set overrides under the data folder, metrics reported)
TASKS = {
    "detection": ("coco_detection_small", lambda d: [f"data.root={d / 'coco'}"],
                  ("eval/bbox_ap", "eval/bbox_ap50", "eval/segm_ap")),
    "segmentation": ("ade20k_small", lambda d: [f"data.root={d / 'ade' / 'ADEChallengeData2016'}"],
                     ("eval/miou", "eval/pixel_acc")),
    "shapes": ("ade20k_small", lambda d: [f"data.root={d / 'shapes' / 'ADEChallengeData2016'}"],
               ("eval/miou", "eval/pixel_acc")),
}  # fmt: skip


def build_data(args) -> tuple[Path, list[str]]:
    """The dense sets under ``<work>/data`` (rewritten only when the arguments changed) and the
    ``beit3-dense-data`` arguments that wrote them."""
    from beit3.finetune.dense import synthetic

    out = args.work / "data"
    data_args = [str(out), "--sets", "coco,ade,shapes", "--train", str(args.train), "--val", str(args.val),
                 "--size", str(args.size), "--seed", str(args.seed)]  # fmt: skip
    if args.label == "stamp":
        data_args += ["--label", "stamp", "--stamps-per-category", str(args.stamps_per_category)]
    if args.background_class:
        data_args.append("--background-class")
    marker = out / "arguments.json"
    if not marker.is_file() or json.loads(marker.read_text()) != data_args:
        if synthetic.main(data_args) != 0:
            raise SystemExit("beit3-dense-data failed")
        marker.write_text(json.dumps(data_args))
    return out, data_args


def command(task: str, start: str, args, data: Path) -> list[str]:
    """The ``beit3-finetune`` command of one run (``start``: scratch, pretrained, or untrained: the checkpoint
    (random init without one) and a fresh head, one step at a learning rate of 1e-12)."""
    recipe, data_sets, _ = TASKS[task]
    out = args.work / "runs" / f"{task}_{start}"
    untrained = start.startswith("untrained")
    steps = 1 if untrained else args.steps
    warmup = 0 if untrained else max(1, steps // 10)
    sets = [f"train.total_steps={steps}", f"train.warmup_steps={warmup}", "train.eval_every=0",
            f"train.log_every={max(1, steps // 6)}", f"model.name={args.model}",
            f"model.img_size={args.size}", *data_sets(data), *args.set]  # fmt: skip
    if untrained:
        sets += ["train.lr=1e-12", "train.min_lr=0"]
    if start == "pretrained" or (untrained and args.pretrained):
        sets.append(f"model.pretrained={args.pretrained}")
    cmd = [sys.executable, "-m", "beit3.finetune.train",
           "--config", str(ROOT / "finetune/recipes" / f"{recipe}.toml"),
           "--ds-config", str(ROOT / "ds_configs/zero0_fp32.json"), "--output-dir", str(out),
           "--resume", "none", "--ds-set", f"train_micro_batch_size_per_gpu={args.batch}"]  # fmt: skip
    for item in sets:
        cmd += ["--set", item]
    return cmd


def run_one(task: str, start: str, args, data: Path) -> dict:
    """One run: its eval scores, first/last logged loss, wall time and command."""
    cmd = command(task, start, args, data)
    out = Path(cmd[cmd.index("--output-dir") + 1])
    shutil.rmtree(out, ignore_errors=True)  # the benchmark's own run folder: every run starts fresh
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{task}_{start}.log").write_text(proc.stdout + proc.stderr)
    shown = "beit3-finetune " + _relative(cmd[3:])
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": f"exit {proc.returncode}", "wall_s": wall, "command": shown}
    scores = json.loads((out / "eval.json").read_text())
    losses = _losses(out)
    return {**scores, "loss_first": losses[0], "loss_last": losses[-1], "wall_s": wall, "command": shown}


def _relative(args: list[str]) -> str:
    """A command line with the repository's path left out (the results are read from the repository)."""
    return shlex.join(a.replace(str(ROOT) + "/", "") for a in args)


def format_table(results: dict, starts: list[str]) -> str:
    """Rows task x metric, a column per starting point; losses and wall times of the trained runs."""
    rows = ["| task | metric | " + " | ".join(starts) + " | loss first -> last | wall s |",
            "|" + "---|" * (4 + len(starts))]  # fmt: skip
    for task, (_, _, metrics) in TASKS.items():
        by_start = results.get(task)
        if not by_start:
            continue
        trained = [s for s in starts if s in by_start and s != "untrained"]
        losses = " / ".join(f"{by_start[s].get('loss_first', math.nan):.3f} -> "
                            f"{by_start[s].get('loss_last', math.nan):.3f}" for s in trained)  # fmt: skip
        walls = " / ".join(f"{by_start[s]['wall_s']:.0f}" for s in starts if s in by_start)
        for i, metric in enumerate(metrics):
            cells = []
            for s in starts:
                r = by_start.get(s, {})
                cells.append(r["error"] if "error" in r else f"{r.get(metric, math.nan):.3f}")
            rows.append(f"| {task if i == 0 else ''} | {metric} | " + " | ".join(cells)
                        + f" | {losses if i == 0 else ''} | {walls if i == 0 else ''} |")  # fmt: skip
    return "\n".join(rows)


def _classes(args) -> str:
    if args.label == "stamp":
        return f"{args.stamps_per_category} single stamps of each category, the same in train and val"
    return "stamp categories, every fifth stamp held out for val"


def report_text(args, argv: list[str], data_args: list[str], results: dict, starts: list[str]) -> str:
    """The results file: environment, settings, the table and every command."""
    lines = ["# Dense prediction on offline data: the small demo model", "",
             *environment_lines("bench/dense_small.py", argv),
             f"- model: {args.model} at {args.size} px; {args.steps} steps, micro-batch {args.batch}, ZeRO-0 "
             f"fp32, one CPU process ({args.threads} threads)",
             f"- data: `beit3-dense-data` ({args.train} train / {args.val} val images per set, seed "
             f"{args.seed}; classes: {_classes(args)}"
             f"{'; background as class 1' if args.background_class else ''})",
             f"- pretrained: `{args.pretrained}`", "", format_table(results, starts), "",
             "Commands:", "", f"- data: `beit3-dense-data {_relative(data_args)}`"]  # fmt: skip
    for task, by_start in results.items():
        lines += [f"- {task} {s}: `{r['command']}`" for s, r in by_start.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", type=Path, default=None, help="released-format checkpoint (beit3-export)")
    p.add_argument("--model", default="beit3_small_patch16_64")
    p.add_argument("--tasks", default="detection,segmentation", help=f"comma-separated: {', '.join(TASKS)}")
    p.add_argument("--size", type=int, default=64, help="image side of the data and the model")
    p.add_argument("--train", type=int, default=300, help="training images per set")
    p.add_argument("--val", type=int, default=40, help="validation images per set")
    p.add_argument("--seed", type=int, default=0, help="the data's seed")
    p.add_argument("--label", choices=["category", "stamp"], default="category",
                   help="classes: stamp categories (held-out stamps in val) or single stamps")  # fmt: skip
    p.add_argument("--stamps-per-category", type=int, default=2, help="--label stamp: stamps per category")
    p.add_argument("--background-class", action="store_true", help="ADE sets: background is class 1")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-untrained", action="store_true", help="skip the untrained-head runs")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="recipe override passed to every run")  # fmt: skip
    p.add_argument("--work", type=Path, default=ROOT / "runs/bench_dense")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench/results")
    p.add_argument("--name", default="dense_small", help="results file name (without suffix)")
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="results .json of other invocations (same settings) to include")  # fmt: skip
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    args.work.mkdir(parents=True, exist_ok=True)
    data, data_args = build_data(args)
    starts = (
        ([] if args.no_untrained else ["untrained"])
        + ["scratch"]
        + (["pretrained"] if args.pretrained else [])
    )
    results: dict = {}
    for earlier in args.merge:  # runs made by another invocation (e.g. in parallel), same settings
        for task, by_start in json.loads(earlier.read_text()).items():
            results.setdefault(task, {}).update(by_start)
    for task in [t for t in args.tasks.split(",") if t]:
        for start in starts:
            r = run_one(task, start, args, data)
            results.setdefault(task, {})[start] = r
            rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k != "command"}
            print(f"{task:13s} {start:20s} {json.dumps(rounded)}", flush=True)
            text = report_text(args, argv, data_args, results, starts)  # kept current: a long run
            (args.work / f"{args.name}.partial.md").write_text(text)
            (args.work / f"{args.name}.partial.json").write_text(json.dumps(results, indent=1))
    write_results(args.results_dir, args.name, report_text(args, argv, data_args, results, starts), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
