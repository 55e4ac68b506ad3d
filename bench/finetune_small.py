"""Finetune the small demo model on five real offline tasks, from scratch and from a pretrained checkpoint.

Tasks (reference offline-data.md; install them first with `bash scripts/install.sh --bench`):

=====================  ==========================================  ============================
recipe                 data                                        metric
=====================  ==========================================  ============================
digits_small           scikit-learn digits, 10 classes             accuracy
wordnet_small          WordNet glosses, 10 lexicographer files     accuracy
easy_vqa_small         easy-VQA (pip easy-vqa==1.0)                VQA score
stamps_retrieval_small Tux Paint stamps + captions (Debian)        mean of R@1/5/10 both ways
stamps_captioning_small Tux Paint stamps + captions                BLEU-4, CIDEr-D
=====================  ==========================================  ============================

Every run is ``beit3-finetune`` in a subprocess (ZeRO-0 fp32, one CPU process). With ``--pretrained`` both
runs of a task use the checkpoint's text vocabulary and its tokenizer (``--spm``), so the only difference is
the initial weights. ``--data index`` (the default) runs every task through the streaming path of large
datasets: the task's examples, as its offline source loads them, are written once as released-format JSONL
indexes with one PNG file per image (the source's images at the model's resolution, so the pixels are the
same), and the runs read them as ``data.source = "jsonl"`` does: images decoded from disk when a batch needs
them (``LazyImages``), in ``--workers`` DataLoader worker processes. ``--data memory``: the offline sources
directly, images decoded into memory up front. Writes a Markdown table with the device, versions and
command::

    python bench/finetune_small.py --pretrained runs/quickstart/export/model.pth \\
        --spm runs/quickstart/spm.model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "digits_small": ("eval/accuracy",),
    "wordnet_small": ("eval/accuracy",),
    "easy_vqa_small": ("eval/vqa_score",),
    "stamps_retrieval_small": ("eval/average", "eval/tr_r1", "eval/ir_r1"),
    "stamps_captioning_small": ("eval/bleu4", "eval/cider"),
}


def train_task_spm(work: Path, vocab_size: int) -> Path:
    """A SentencePiece model over the tasks' own texts (used when no --spm is given)."""
    from beit3.finetune.data.sources import load_easy_vqa, load_tuxpaint, load_wordnet
    from beit3.tokenizers.text import train_sentencepiece

    texts = [ex["text"] for ex in load_wordnet(max_train=20000).train.examples]
    texts += [ex["text"] for ex in load_easy_vqa(8, max_train=5000, max_eval=1).train.examples]
    texts += [ex["text"] for ex in load_tuxpaint(8).train.examples]
    corpus = work / "spm_corpus.txt"
    corpus.write_text("\n".join(texts))
    return train_sentencepiece([corpus], work / "task_spm", vocab_size)


def export_index(recipe: str, args) -> list[str]:
    """The task data of ``recipe`` (a name in finetune/recipes or a .toml path), as its offline source loads
    it, written under ``<work>/index/<recipe>/`` as ``train.jsonl`` / ``eval.jsonl`` in the released format
    (``image_path``, ``image2_path``, ``text``, ``label`` | ``labels`` + ``scores``, ``image_id``) with one
    PNG per image (``answer2label.txt`` for VQA); returns the ``--set`` overrides that point the recipe at
    them (``data.source = "jsonl"``, no caps: the export is already capped as the source caps it)."""
    from PIL import Image

    from beit3.finetune.data.build import load_task_data
    from beit3.finetune.recipe import load_recipe
    from beit3.model import get_config

    recipe_file = Path(recipe) if recipe.endswith(".toml") else ROOT / "finetune/recipes" / f"{recipe}.toml"
    rec = load_recipe(recipe_file, [f"model.name={args.model}", *args.set])
    size = rec.model.img_size or get_config(rec.model.name).img_size
    data = load_task_data(rec.data, rec.task.name, size)
    root = args.work / "index" / recipe_file.stem
    for name, split in (("train", data.train), ("eval", data.eval)):
        (root / name).mkdir(parents=True, exist_ok=True)
        if split.images is not None:  # uint8 (N, 3, S, S): PNG keeps every pixel
            for r, image in enumerate(split.images):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / name / f"{r:06d}.png")
        rows = []
        for ex in split.examples:
            row: dict = {f"{k}_path": f"{name}/{ex[k]:06d}.png" for k in ("image", "image2") if k in ex}
            if "text" in ex:
                row["text"] = ex["text"]
            if "scores" in ex:
                row["labels"], row["scores"] = list(ex["scores"]), list(ex["scores"].values())
            elif "label" in ex:
                row["label"] = ex["label"]
            if "image_id" in ex:
                row["image_id"] = ex["image_id"]
            rows.append(json.dumps(row))
        (root / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    if rec.task.name == "vqa":
        lines = (json.dumps({"answer": a, "label": i}) for i, a in enumerate(data.classes))
        (root / "answer2label.txt").write_text("\n".join(lines) + "\n")
    return index_sets(root, args.workers)


def index_sets(root: Path, workers: int) -> list[str]:
    """The ``--set`` overrides that point a recipe at the released-format index in ``root``
    (``train.jsonl`` / ``eval.jsonl``; image paths relative to it or absolute), uncapped, with ``workers``
    loader workers."""
    return [
        "data.source=jsonl",
        f"data.train={root / 'train.jsonl'}",
        f"data.eval={root / 'eval.jsonl'}",
        f"data.root={root}",
        "data.max_train=0",
        "data.max_eval=0",
        f"data.num_workers={workers}",
    ]


def run_one(recipe: str, start: str, args, spm: Path, shapes: dict, data_sets: list[str] = ()) -> dict:
    """One finetuning run; returns its eval scores, first/last logged loss and wall time. ``data_sets``:
    ``--set`` overrides of the data (the exported index)."""
    out = args.work / f"{recipe}_{start}"
    recipe_file = ROOT / "finetune/recipes" / f"{recipe}.toml"
    cmd = [sys.executable, "-m", "beit3.finetune.train", "--config", str(recipe_file),
           "--ds-config", str(ROOT / "ds_configs/zero0_fp32.json"), "--output-dir", str(out),
           "--resume", "none", "--ds-set", f"train_micro_batch_size_per_gpu={args.batch}",
           "--set", f"train.total_steps={args.steps}",
           "--set", f"train.warmup_steps={max(1, args.steps // 10)}",
           "--set", f"data.tokenizer={spm}", "--set", f"model.name={args.model}"]  # fmt: skip
    if shapes:
        cmd += ["--set", "model.overrides={" + ", ".join(f"{k} = {v}" for k, v in shapes.items()) + "}"]
    for item in [*args.set, *data_sets]:
        cmd += ["--set", item]
    if start != "scratch":
        cmd += ["--set", f"model.pretrained={args.pretrained}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    (args.work / f"{recipe}_{start}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": f"exit {proc.returncode}", "wall_s": wall}
    scores = json.loads((out / "eval.json").read_text())
    losses = _losses(out)
    return {**scores, "loss_first": losses[0], "loss_last": losses[-1], "wall_s": wall}


def _losses(run: Path) -> list[float]:
    from beit3.engine.metrics import read_scalars

    return list(read_scalars(run).get("loss/total", {}).values()) or [float("nan")]


def format_table(results: dict, starts: list[str]) -> str:
    head = "| task | metric | " + " | ".join(starts) + " | loss first -> last | wall s |"
    rows = [head, "|" + "---|" * (4 + len(starts))]
    for recipe, metrics in TASKS.items():
        if recipe not in results:
            continue
        by_start = results[recipe]
        for i, metric in enumerate(metrics):
            cells = []
            for s in starts:
                r = by_start.get(s, {})
                cells.append(r["error"] if "error" in r else f"{r.get(metric, float('nan')):.3f}")
            losses = " / ".join(
                f"{by_start[s].get('loss_first', math.nan):.3f} -> "
                f"{by_start[s].get('loss_last', math.nan):.3f}"
                for s in starts
                if s in by_start
            )
            walls = " / ".join(f"{by_start[s]['wall_s']:.0f}" for s in starts if s in by_start)
            rows.append(f"| {recipe if i == 0 else ''} | {metric} | " + " | ".join(cells)
                        + f" | {losses if i == 0 else ''} | {walls if i == 0 else ''} |")  # fmt: skip
    return "\n".join(rows)


def diagnose(checkpoints: dict[str, Path], spm: Path, model_name: str) -> str:
    """What the pretrained checkpoint knows before finetuning, against the same model at random init.

    * frozen image features: nearest-class-centroid accuracy of mean-pooled patch features on digits;
    * frozen text features: the same for ``<s>`` outputs on WordNet glosses, and their mean cosine;
    * masked-token prediction: accuracy of ``mlm_head`` on 15 % masked tokens of WordNet glosses and
      Tux Paint captions (the tasks' texts), with the checkpoint's own tokenizer.
    """
    import torch

    from beit3.finetune.data.sources import load_digits_data, load_tuxpaint, load_wordnet
    from beit3.finetune.reload import checkpoint_overrides
    from beit3.finetune.tasks.captioning import mask_captions
    from beit3.model import build_model, load_checkpoint
    from beit3.tokenizers.text import TextTokenizer

    shapes = checkpoint_overrides(next(iter(checkpoints.values())))
    torch.manual_seed(0)
    models = {"random init": build_model(model_name, **shapes).eval()}
    for label, path in checkpoints.items():
        models[label] = build_model(model_name, **shapes).eval()
        load_checkpoint(models[label], path)
    digits = load_digits_data(models["random init"].cfg.img_size, max_train=1000, max_eval=300)
    tok = TextTokenizer(spm)
    texts = [ex["text"] for ex in load_wordnet(max_train=400).train.examples]
    texts += [ex["text"] for ex in load_tuxpaint(8).train.examples][:400]
    ids, pad = tok.encode_batch(texts, 32)
    masked = mask_captions(ids, pad, 0.15, tok.mask_id, torch.Generator().manual_seed(0))
    glosses = load_wordnet(max_train=1000, max_eval=500)
    rows = ["| starting point | digits centroid acc (frozen) | WordNet `<s>` centroid acc (frozen) "
            "| mean cosine between `<s>` features | masked-token acc on task texts |",
            "|---|---|---|---|---|"]  # fmt: skip
    with torch.no_grad():
        for name, model in models.items():
            acc_img = _centroid_accuracy(*_image_features(model, digits))
            acc_gloss, cosine = _text_probe(model, tok, glosses)
            h = model(text=masked["text"], text_padding_mask=pad)
            logits = model.mlm_head(h[masked["masked"]])[:, : tok.vocab_size]
            acc_txt = (logits.argmax(-1) == masked["labels"][masked["masked"]]).float().mean().item()
            rows.append(f"| {name} | {acc_img:.3f} | {acc_gloss:.3f} | {cosine:.3f} | {acc_txt:.3f} |")
    return "\n".join(rows)


def _text_probe(model, tok, data) -> tuple[float, float]:
    """Centroid accuracy of frozen ``<s>`` features on WordNet glosses, and their mean pairwise cosine
    (near 1: the features hardly depend on the input)."""
    import torch
    import torch.nn.functional as F

    feats = []
    for split in (data.train, data.eval):
        ids, pad = tok.encode_batch([ex["text"] for ex in split.examples], 32)
        labels = torch.tensor([ex["label"] for ex in split.examples])
        feats += [model(text=ids, text_padding_mask=pad)[:, 0], labels]
    unit = F.normalize(feats[2], dim=-1)
    n = len(unit)
    cosine = ((unit @ unit.t()).sum() - n) / (n * n - n)
    return _centroid_accuracy(*feats), cosine.item()


def _image_features(model, digits) -> tuple:
    """Mean-pooled patch features and labels of the digits train and eval splits."""
    import torch

    from beit3.finetune.data.batches import images_to_float

    out = []
    for split in (digits.train, digits.eval):
        x = images_to_float(split.images)
        out.append(torch.cat([model(image=x[i : i + 256])[:, 1:].mean(1) for i in range(0, len(x), 256)]))
        out.append(torch.tensor([ex["label"] for ex in split.examples]))
    return tuple(out)


def _centroid_accuracy(train_f, train_y, eval_f, eval_y) -> float:
    """Nearest-class-centroid accuracy (cosine) of frozen features."""
    import torch
    import torch.nn.functional as F

    classes = int(train_y.max()) + 1
    centroids = F.normalize(torch.stack([train_f[train_y == c].mean(0) for c in range(classes)]), dim=-1)
    pred = (F.normalize(eval_f, dim=-1) @ centroids.t()).argmax(-1)
    return (pred == eval_y).float().mean().item()


def environment() -> str:
    import deepspeed
    import torch

    return (
        f"- device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), one process\n"
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"deepspeed {deepspeed.__version__}\n"
        f"- command: `python {' '.join(sys.argv)}`"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", type=Path, default=None, help="released-format checkpoint (beit3-export)")
    p.add_argument("--spm", type=Path, default=None, help="SentencePiece model (required with --pretrained)")
    p.add_argument("--model", default="beit3_small_patch16_64")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated recipe names")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", choices=["index", "memory"], default="index",
                   help="index: through released-format JSONL indexes, images on disk (the streaming "
                        "path); memory: the offline sources, images in memory")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="--data index: data.num_workers")
    p.add_argument("--work", type=Path, default=ROOT / "runs/bench_finetune")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/finetune_small.md")
    p.add_argument("--starts", default="", help="comma-separated subset of scratch,pretrained to run")
    p.add_argument(
        "--merge", type=Path, nargs="*", default=[], help="results .json of earlier runs to include"
    )
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="recipe override passed to every run (ablations)")  # fmt: skip
    p.add_argument("--pretrained-label", default="pretrained", help="column name of the pretrained runs")
    p.add_argument("--also", action="append", default=[], metavar="LABEL=PATH",
                   help="another checkpoint (same tokenizer) for the diagnostics table")  # fmt: skip
    p.add_argument("--diagnose-only", action="store_true", help="only the frozen-checkpoint diagnostics")
    p.add_argument("--notes", type=Path, default=None, help="Markdown appended to the results (analysis)")
    args = p.parse_args(argv)
    if args.pretrained is not None and args.spm is None:
        p.error("--pretrained needs --spm: the checkpoint's text embedding is indexed by its tokenizer's ids")
    args.work.mkdir(parents=True, exist_ok=True)
    spm = args.spm or train_task_spm(args.work, 2000)
    shapes = {}
    if args.pretrained is not None:
        from beit3.finetune.reload import checkpoint_overrides

        shapes = {k: v for k, v in checkpoint_overrides(args.pretrained).items() if k != "visual_vocab_size"}
    else:  # a text embedding as large as the tokenizer (the presets have the released 64010 rows)
        from beit3.tokenizers.text import TextTokenizer

        shapes = {"vocab_size": TextTokenizer(spm).vocab_size}
    checkpoints = {args.pretrained_label: args.pretrained} if args.pretrained else {}
    checkpoints.update({k: Path(v) for k, v in (item.split("=", 1) for item in args.also)})
    if args.diagnose_only:
        print(diagnose(checkpoints, spm, args.model))
        return 0
    starts = ["scratch"] + ([args.pretrained_label] if args.pretrained else [])
    to_run = args.starts.split(",") if args.starts else starts
    results: dict = {}
    for earlier in args.merge:  # runs made by another invocation (e.g. in parallel), same settings
        for recipe, by_start in json.loads(earlier.read_text()).items():
            results.setdefault(recipe, {}).update(by_start)
    for recipe in [t for t in args.tasks.split(",") if t]:  # --tasks "" with --merge: only the table
        data_sets = export_index(recipe, args) if args.data == "index" else []
        for start in to_run:
            r = run_one(recipe, start, args, spm, shapes, data_sets)
            results.setdefault(recipe, {})[start] = r
            rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
            print(f"{recipe:26s} {start:10s} {json.dumps(rounded)}", flush=True)
    starts += [s for r in results.values() for s in r if s not in starts]  # merged columns
    table = format_table(results, list(dict.fromkeys(starts)))
    if args.pretrained is not None:
        table += "\n\nBefore finetuning (frozen checkpoint vs. the same model at random init):\n\n"
        table += diagnose(checkpoints, spm, args.model)
    print(table)
    data_line = (
        "the offline sources, images decoded into memory (`--data memory`)"
        if args.data == "memory"
        else "the streaming path (`--data index`): each task's examples as released-format JSONL indexes, "
        f"one PNG per image, read by `data.source = 'jsonl'` (LazyImages) in {args.workers} DataLoader "
        "workers"
    )
    text = (
        f"# Finetuning the small demo model on offline tasks\n\n{environment()}\n"
        f"- model: {args.model}; {args.steps} steps, micro-batch {args.batch}, ZeRO-0 fp32; "
        f"tokenizer `{spm}`\n- data: {data_line}\n"
        f"- pretrained: `{args.pretrained}`\n\n{table}\n"
    )
    if args.notes is not None:
        text += "\n" + args.notes.read_text()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    (args.out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
