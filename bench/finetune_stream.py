"""Finetuning data at scale: peak memory and images/s of one rank's image-classification loader, by dataset
size and DataLoader workers (issue 14's acceptance benchmark).

For each size it writes an ImageNet-style tree of small JPEG files (``train/<class>/<n>.jpg``, a few val
images per class; a handful of distinct random images, encoded once, each file made distinct by a JPEG
comment holding its number), builds the released-format index with the project's builder
(``beit3-finetune-index imagenet``), then runs every (size, workers) configuration in a fresh subprocess:
the recipe ``imagenet1k_base`` pointed at that index, its split loaded by the trainer's data code
(``load_task_data``: ``LazyImages``, images stay on disk), ``Collator`` (with the recipe's augmentation,
``beit3.finetune.train.augmentation``; ``--augment none``: without) + ``BatchLoader`` as ``beit3-finetune``
builds them, for a fixed number of batches (``--step data``: batches only; ``--step model``: plus a
forward/backward/AdamW step of a tiny model per batch). Configurations are run
``--repeats`` times, interleaved (sizes and worker counts alternate, the order reversed every other round):
images/s is the median, peak memory the largest.

Memory counted, sampled every ``--sample-ms`` from /proc by a thread of the measured process:

* main peak RSS: the main process's VmHWM (the kernel's high-water mark, exact);
* workers peak RSS: the largest sum over the live DataLoader workers of their VmHWM (pages a forked worker
  shares copy-on-write with the main process, torch's libraries among them, count in each);
* tree peak PSS: the largest sum of Pss (smaps_rollup) over the main process and its workers at one sample
  (a shared page counted once, split among the processes that map it): the memory the rank holds;
* index: the main process's RSS growth while the split is loaded (examples and paths; with ``--step model``
  the task model's build too);
* largest worker (getrusage): ``RUSAGE_CHILDREN`` ru_maxrss once the workers are joined, the kernel's
  figure for the largest worker, a check of the sampled one (it also covers any helper an import forked
  before the loader started, e.g. ``ldconfig`` run by ``ctypes.util.find_library``, whose RSS at the fork
  is the main process's: ``rusage_children_before_mib`` in the JSON; the sampled columns count children
  only while the loader runs).

``--mmap-threshold-kib N`` fixes glibc's mmap threshold in each run before its loader starts (the workers
inherit it): allocations of N KiB or more are mapped and unmapped whole instead of reusing the heap, whose
dynamic threshold otherwise rises to the size of a freed batch tensor (the heap of a worker making batches of
varying temporaries then grows batch after batch).

CPU ms per image: user + system time of the main process and its joined workers over the batches (worker
start-up included) per image read: an image's cost whatever else loads the machine; W workers on C free cores
make at most min(W, C) / that cost images per second.

``--full-epoch`` adds one configuration per entry that reads a whole epoch (every example passes through
the workers)::

    python bench/finetune_stream.py                       # 2,000 and 50,000 files, 0/2/4 workers
    python bench/finetune_stream.py --sizes 40 80 --workers 1 --batches 2 --batch-size 4 --repeats 1
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import environment_lines, write_results  # noqa: E402  (bench/report.py, beside this file)

RECIPE = "imagenet1k_base"
MIB = 2**20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


# ----- the image tree and its index ------------------------------------------------------------------
def distinct_jpegs(count: int, width: int, height: int, seed: int) -> list[bytes]:
    """``count`` JPEG encodings of smooth random colour fields with grain (photo-like sizes, ~5-10 KB)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((width, height), Image.BICUBIC)).astype(np.int16)
        grain = rng.integers(-12, 13, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray((field + grain).clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def with_comment(jpeg: bytes, text: bytes) -> bytes:
    """The same JPEG with a comment segment (FF FE, length, text) after its start marker: other bytes, the
    same pixels."""
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def write_tree(root: Path, train_files: int, classes: int, val_per_class: int, blobs: list[bytes]) -> int:
    """``root/train/class_<c>/<n>.jpg`` (file n in class n % classes) and ``val_per_class`` val files per
    class; returns the bytes written."""
    written = 0
    for split, n_files in (("train", train_files), ("val", val_per_class * classes)):
        for c in range(classes):
            (root / split / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
        for n in range(n_files):
            data = with_comment(blobs[n % len(blobs)], b"%s %d" % (split.encode(), n))
            (root / split / f"class_{n % classes:02d}" / f"{n:07d}.jpg").write_bytes(data)
            written += len(data)
    return written


def build_index(root: Path) -> float:
    """``beit3-finetune-index imagenet`` on the tree (its Python entry); returns the seconds it took."""
    from beit3.finetune.index import main as index_main

    t0 = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            code = index_main(["imagenet", "--train", str(root / "train"), "--val", str(root / "val"),
                               "--root", str(root)])  # fmt: skip
        finally:
            sys.stdout = stdout
    if code != 0:
        raise SystemExit(f"beit3-finetune-index imagenet failed on {root} (exit {code})")
    return time.perf_counter() - t0


# ----- memory of the process tree ---------------------------------------------------------------------
def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (/proc/<pid>/task/<tid>/children, recursively)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


class TreeSampler(threading.Thread):
    """Samples this process and its descendants every ``interval`` s: the peaks described in the module
    docstring (KiB)."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval, self.pid = interval, os.getpid()
        self.workers_hwm = self.tree_pss = self.samples = self.max_workers = 0
        self.counting = False  # children count while the loader runs only (imports fork short-lived helpers)
        self._stop_event = threading.Event()

    def sample(self) -> None:
        hwm_sum, pss = 0, _pss_kib(self.pid)
        kids = _children(self.pid) if self.counting else []
        for kid in kids:
            try:
                hwm_sum += _status_kib(kid).get("VmHWM", 0)
                pss += _pss_kib(kid)
            except (OSError, ValueError):  # a worker that just ended
                continue
        self.workers_hwm = max(self.workers_hwm, hwm_sum)
        self.tree_pss = max(self.tree_pss, pss)
        self.max_workers = max(self.max_workers, len(kids))
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


# ----- one configuration (the child process) ----------------------------------------------------------
def measure(cfg: dict) -> dict:
    """One rank's training batches of the recipe on the index in ``cfg["root"]``; the figures of one row."""
    sampler = TreeSampler(cfg["sample_ms"] / 1e3)
    sampler.start()
    import torch

    from beit3.finetune.data.batches import BatchLoader, Collator
    from beit3.finetune.data.build import load_task_data
    from beit3.finetune.recipe import load_recipe

    if cfg.get("mmap_threshold_kib"):  # a fixed glibc mmap threshold (no dynamic raise), workers inherit it
        import ctypes

        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, cfg["mmap_threshold_kib"] * 1024)
    root = Path(cfg["root"])
    recipe = load_recipe(RECIPE, [
        f"data.train={root / 'imagenet.train.index.jsonl'}", f"data.eval={root / 'imagenet.val.index.jsonl'}",
        f"data.root={root}", f"data.num_workers={cfg['workers']}", f"model.name={cfg['model']}",
        f"model.img_size={cfg['img_size']}", 'model.pretrained=""', f"task.num_classes={cfg['classes']}",
    ])  # fmt: skip
    before = _status_kib(os.getpid())["VmRSS"]
    t0 = time.perf_counter()
    task = None
    if cfg["step"] == "model":  # the trainer's whole build: tokenizer (none here), data, task module
        from beit3.finetune.train import build_run

        _, data, task = build_run(recipe)
        optimizer = torch.optim.AdamW(task.parameters(), lr=1e-4)
    else:
        data = load_task_data(recipe.data, recipe.task.name, cfg["img_size"])
    load_s = time.perf_counter() - t0
    index_kib = _status_kib(os.getpid())["VmRSS"] - before
    transform = mixup = None
    if cfg.get("augment", "recipe") == "recipe":  # the recipe's transform per image and Mixup/CutMix
        from beit3.finetune.train import augmentation

        num_classes = recipe.task.num_classes or len(data.classes)
        transform, mixup = augmentation(recipe, cfg["img_size"], num_classes)
    collate = Collator(recipe.task.name, data.train.images, num_answers=len(data.classes),
                       hflip=recipe.data.hflip, mask_prob=recipe.captioning.mask_prob, transform=transform,
                       mixup=mixup)  # fmt: skip
    loader = BatchLoader(data.train, collate, cfg["batch_size"], 0, 1, seed=recipe.data.seed,
                         num_workers=recipe.data.num_workers)  # fmt: skip
    total = cfg["batches"] or len(loader)  # 0: one whole epoch
    done, marks = 0, {}
    rusage_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    sampler.counting = True
    cpu_start = os.times()
    t_start = time.perf_counter()
    while done < total:  # the trainer re-iterates the loader epoch after epoch
        batches = iter(loader)
        for batch in batches:
            assert batch["image"].shape[1:] == (3, cfg["img_size"], cfg["img_size"])
            if task is not None:
                loss, _ = task(batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == 1:
                marks["first"] = time.perf_counter()
            if done == cfg["warmup"]:
                marks["warm"] = time.perf_counter()
            if done == total:
                break
        batches.close()  # an abandoned epoch (the persistent workers stay for the next one)
    loader.close()  # the workers end, joined: their rusage and CPU time are counted
    t_end = time.perf_counter()
    cpu_end = os.times()  # the workers are joined: their CPU time is in the children's fields
    cpu_s = sum(getattr(cpu_end, f) - getattr(cpu_start, f) for f in ("user", "system", "children_user",
                                                                       "children_system"))  # fmt: skip
    sampler.stop()
    sampler.counting = False
    timed = total - cfg["warmup"]
    t_timed = marks.get("warm", t_start)
    return {
        "size": cfg["size"], "workers": cfg["workers"], "step": cfg["step"], "batches": total,
        "batch_size": cfg["batch_size"], "epochs": total / len(loader), "load_s": load_s,
        "first_batch_s": marks["first"] - t_start,
        "cpu_ms_per_image": 1e3 * cpu_s / (total * cfg["batch_size"]),
        "images_per_s": timed * cfg["batch_size"] / (t_end - t_timed) if timed > 0 else float("nan"),
        "main_peak_rss_mib": _status_kib(os.getpid())["VmHWM"] / 1024,
        "workers_peak_rss_mib": sampler.workers_hwm / 1024,
        "tree_peak_pss_mib": sampler.tree_pss / 1024,
        "index_mib": index_kib / 1024,
        "largest_worker_rusage_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "rusage_children_before_mib": rusage_before / 1024,  # a helper forked by an import, if any
        "processes_seen": 1 + sampler.max_workers, "samples": sampler.samples,
    }  # fmt: skip


def run_child(cfg: dict, threads: int) -> dict:
    """:func:`measure` in a fresh interpreter (its peaks owe nothing to an earlier configuration)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"configuration {cfg} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ----- the parent: trees, configurations, table ---------------------------------------------------------
def combine(runs: list[dict]) -> dict:
    """Repeats of one configuration: median images/s (and its spread), largest peaks."""
    row = dict(runs[0])
    rates = [r["images_per_s"] for r in runs]
    row["images_per_s"] = statistics.median(rates)
    row["images_per_s_all"] = rates
    for key in ("main_peak_rss_mib", "workers_peak_rss_mib", "tree_peak_pss_mib", "index_mib",
                "largest_worker_rusage_mib", "first_batch_s", "load_s"):  # fmt: skip
        row[key] = max(r[key] for r in runs)
    row["cpu_ms_per_image"] = statistics.median(r["cpu_ms_per_image"] for r in runs)
    row["repeats"] = len(runs)
    return row


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| files | workers | batches (epochs) | images/s (median; all) | CPU ms per image "
        "| main peak RSS MiB | workers peak RSS MiB, total | largest worker (getrusage) MiB "
        "| tree peak PSS MiB | index MiB | first batch s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rates = ", ".join(f"{v:.0f}" for v in r["images_per_s_all"])
        lines.append(
            f"| {r['size']:,} | {r['workers']} | {r['batches']} ({r['epochs']:.2f}) | "
            f"{r['images_per_s']:.0f} ({rates}) | {r['cpu_ms_per_image']:.2f} | "
            f"{r['main_peak_rss_mib']:.0f} | "
            f"{r['workers_peak_rss_mib']:.0f} | {r['largest_worker_rusage_mib']:.0f} | "
            f"{r['tree_peak_pss_mib']:.0f} | {r['index_mib']:.1f} | {r['first_batch_s']:.2f} |"
        )
    return lines


def ratios(rows: list[dict], small: int, large: int) -> list[dict]:
    """Peak memory at ``large`` files over ``small``, per worker count (main, main + workers, PSS)."""
    by = {(r["size"], r["workers"]): r for r in rows}
    out = []
    for w in sorted({r["workers"] for r in rows}):
        a, b = by.get((small, w)), by.get((large, w))
        if a is None or b is None:
            continue
        both = [(x["main_peak_rss_mib"] + x["workers_peak_rss_mib"]) for x in (a, b)]
        out.append({
            "workers": w, "main": b["main_peak_rss_mib"] / a["main_peak_rss_mib"],
            "main_plus_workers": both[1] / both[0],
            "tree_pss": b["tree_peak_pss_mib"] / a["tree_peak_pss_mib"],
        })  # fmt: skip
    return out


def report(args, argv, trees: dict, fixed: list[dict], epoch: list[dict], growth: list[dict]) -> str:
    """The results file: environment, settings, the table, the growth ratios, the whole-epoch rows."""
    lines = [f"# Finetuning data at scale: one rank's image-classification loader (`{args.name}`)", ""]
    lines += environment_lines("bench/finetune_stream.py", sys.argv[1:] if argv is None else argv)
    if args.step == "data":
        step = "data only: batches collated (read, decoded, resized, normalised), no model"
    else:
        step = f"each batch also through a forward/backward/AdamW step of {args.model}"
    made = ", ".join(
        f"{s:,}: {t['bytes'] / MIB:.0f} MiB written in {t['write_s']:.1f} s, index "
        f"{t['index_bytes'] / MIB:.2f} MiB built in {t['index_s']:.2f} s"
        for s, t in trees.items()
    )
    width, height = args.source_size
    if args.augment == "recipe":
        augment = ("the recipe's augmentation in the workers (timm's RandomResizedCrop, flip, RandAugment, "
                   "RandomErasing per image; Mixup/CutMix per batch)")  # fmt: skip
    else:
        augment = "no augmentation (`--augment none`: decode, resize, random flip)"
    lines += [
        f"- data: ImageNet-style trees of {', '.join(f'{s:,}' for s in args.sizes)} train JPEGs "
        f"({width}x{height}, {args.classes} classes, {args.distinct} distinct images made distinct files by "
        f"a JPEG comment; {made}); index by `beit3-finetune-index imagenet`",
        f"- loader: recipe `{RECIPE}` on the index, `load_task_data` (LazyImages) + `Collator` + "
        f"`BatchLoader` as beit3-finetune builds them, one rank, batch {args.batch_size} at {args.img_size} "
        f"px; {augment}; {step}; malloc: "
        + (
            f"mmap threshold fixed at {args.mmap_threshold_kib} KiB (mallopt before the loader starts)"
            if args.mmap_threshold_kib
            else "glibc's default (dynamic mmap threshold)"
        ),
        f"- each configuration in a fresh process, {args.repeats} interleaved repeats; images/s over the "
        f"batches after the first {args.warmup} (worker start-up), median (all runs in brackets); peaks: the "
        f"largest of the repeats; memory sampled every {args.sample_ms:.0f} ms (module docstring: what each "
        "column counts); a shared 2-core machine: other jobs ran beside it",
        "",
        *table(fixed),
        "",
    ]
    if growth:
        small, large = min(args.sizes), max(args.sizes)
        lines += [
            f"Peak memory at {large:,} files over {small:,} (acceptance: at most 1.2x):",
            "",
            "| workers | main peak RSS | main + workers peak RSS | tree peak PSS |",
            "|---|---|---|---|",
        ]
        for g in growth:
            cells = (g["main"], g["main_plus_workers"], g["tree_pss"])
            lines.append(f"| {g['workers']} | " + " | ".join(f"{c:.3f}x" for c in cells) + " |")
        lines.append("")
    if epoch:
        lines += ["One whole epoch (every example through the workers):", "", *table(epoch), ""]
    if args.note:
        lines += [args.note, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 50000], help="train files per tree")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="data.num_workers values")
    p.add_argument("--batches", type=int, default=60, help="batches per configuration (0: one epoch)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4, help="first batches left out of images/s")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration, interleaved")
    p.add_argument("--full-epoch", nargs="*", default=["50000:2"], metavar="FILES:WORKERS",
                   help="configurations also run for one whole epoch")  # fmt: skip
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--val-per-class", type=int, default=2)
    p.add_argument("--source-size", type=int, nargs=2, default=[256, 192], metavar=("W", "H"))
    p.add_argument("--distinct", type=int, default=16, help="distinct images behind the files")
    p.add_argument("--img-size", type=int, default=224, help="the resolution batches are decoded to")
    p.add_argument("--step", choices=["data", "model"], default="data")
    p.add_argument("--augment", choices=["recipe", "none"], default="recipe",
                   help="recipe: the recipe's training augmentation, as beit3-finetune (timm's "
                        "transform per image in the workers, Mixup/CutMix per batch); none: decode, "
                        "resize, flip")  # fmt: skip
    p.add_argument("--model", default="beit3_tiny_paper_patch16_64", help="--step model: the preset")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each run (0: torch's default)")
    p.add_argument("--sample-ms", type=float, default=20.0)
    p.add_argument("--mmap-threshold-kib", type=int, default=0,
                   help="glibc mallopt(M_MMAP_THRESHOLD) in each run before its loader starts (0: glibc's "
                        "default, raised dynamically up to 32 MiB)")  # fmt: skip
    p.add_argument("--work-dir", type=Path, default=None, help="where the trees go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the trees and indexes")
    p.add_argument("--name", default="finetune_stream")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench/results")
    p.add_argument("--note", default="", help="a line added under the table")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(measure(json.loads(args.child))), flush=True)
        return 0
    if args.warmup >= args.batches > 0:
        p.error("--warmup must be smaller than --batches")
    full = [tuple(int(v) for v in item.split(":")) for item in args.full_epoch]
    full = [(s, w) for s, w in full if s in args.sizes]
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="finetune_stream_", dir=args.work_dir))
    trees: dict[int, dict] = {}
    try:
        blobs = distinct_jpegs(args.distinct, *args.source_size, seed=0)
        for size in args.sizes:
            root = work / f"files_{size}"
            t0 = time.perf_counter()
            written = write_tree(root, size, args.classes, args.val_per_class, blobs)
            gen_s = time.perf_counter() - t0
            index_s = build_index(root)
            index_bytes = (root / "imagenet.train.index.jsonl").stat().st_size
            trees[size] = {"root": str(root), "write_s": gen_s, "index_s": index_s, "bytes": written,
                           "index_bytes": index_bytes}  # fmt: skip
            print(f"{size} files ({written / MIB:.0f} MiB) written in {gen_s:.1f} s, index "
                  f"({index_bytes / MIB:.1f} MiB) built in {index_s:.2f} s", flush=True)  # fmt: skip
        base = {"batch_size": args.batch_size, "warmup": args.warmup, "classes": args.classes,
                "img_size": args.img_size, "step": args.step, "model": args.model,
                "sample_ms": args.sample_ms, "mmap_threshold_kib": args.mmap_threshold_kib,
                "augment": args.augment}  # fmt: skip
        configs = [(s, w) for s in args.sizes for w in args.workers]
        runs: dict[tuple, list[dict]] = {}
        for rep in range(args.repeats):
            for size, workers in configs if rep % 2 == 0 else configs[::-1]:
                cfg = {**base, "size": size, "workers": workers, "root": trees[size]["root"],
                       "batches": args.batches}  # fmt: skip
                r = run_child(cfg, args.threads)
                runs.setdefault((size, workers, "fixed"), []).append(r)
                print(f"  {size:>7} files, {workers} workers: {r['images_per_s']:.0f} images/s, main "
                      f"{r['main_peak_rss_mib']:.0f} MiB, workers {r['workers_peak_rss_mib']:.0f} MiB, "
                      f"PSS {r['tree_peak_pss_mib']:.0f} MiB", flush=True)  # fmt: skip
        for size, workers in full:
            cfg = {**base, "size": size, "workers": workers, "root": trees[size]["root"], "batches": 0,
                   "warmup": min(args.warmup, 1)}  # fmt: skip
            runs[(size, workers, "epoch")] = [run_child(cfg, args.threads)]
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    fixed = [combine(v) for k, v in runs.items() if k[2] == "fixed"]
    fixed.sort(key=lambda r: (r["size"], r["workers"]))
    epoch = [combine(v) for k, v in runs.items() if k[2] == "epoch"]
    small, large = min(args.sizes), max(args.sizes)
    growth = ratios(fixed, small, large) if small != large else []
    text = report(args, argv, trees, fixed, epoch, growth)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = {"trees": trees, "rows": fixed, "epoch_rows": epoch, "ratios": growth, "settings": settings}
    write_results(args.results_dir, args.name, text, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
