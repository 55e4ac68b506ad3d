"""Does pretraining help? Pretrain the small demo model on offline image-text data whose captions name what
only the image shows, then finetune it and the same model from random init with the same budget.

Issue 16 item 5. One program, five stages (each skipped when its output exists, so a rerun resumes):

1. **data** (``<work>/data``), written with the project's shard machinery (``beit3.pretrain.shard_writer``,
   as ``beit3-shards demo`` writes the demo data):

   * pairs: easy-VQA *train* images captioned from their own shape and colour answers ("a red circle."),
     Tux Paint stamps with their captions ("A mango."), Twemoji with their names ("An emoji of a mango.");
   * images: the same images without captions; texts: the pair captions, CPython's pydoc paragraphs and
     WordNet glosses of the ``wordnet_small`` task's *train* split;
   * held out (``<work>/data/heldout``, never trained on, the pretraining ``[eval]`` shards and the
     zero-shot retrieval set): one in 10 items of each source, among those whose caption words all occur
     in training captions (:func:`hold_out`: new images of known objects, shapes and colours);
   * never in pretraining at all: the easy-VQA *test* images (easy_vqa_small's eval split), every Tux Paint
     stamp whose caption is a caption of the stamps tasks' eval split (``load_tuxpaint``'s seeded 20 %),
     the WordNet eval glosses; digits are not in pretraining.

2. **tokenizers**: ``beit3-spm train`` on the texts, ``beit3-vqkd train`` (tiny VQ-KD, MobileNetV2 teacher) on
   a sample of the training images.
3. **pretraining**: ``beit3-pretrain`` (``pretrain/recipes/demo.toml``; the full preset at lr 5e-4 with twice
   as many pairs as images or texts per micro-batch) under torchrun on ``--ranks`` CPU ranks with an
   ``[eval]`` table over the held-out shards, so the image-use probe (``eval/image_use``) is logged during
   training; exported with ``--export``. The full preset first trains on the pairs alone, then the mixed
   run warm-started from that stage's export (:func:`pretrain`: a chain of such stages).
4. **finetuning**: bench/finetune_small.py's five tasks through its own harness (``export_index``,
   ``run_one``), from the checkpoint and from random init (the checkpoint's tokenizer and shapes for both),
   ``--seeds`` seeds each (``train.seed`` and ``data.seed``: the new head's init and the data order; a start
   with no new head, as captioning from the checkpoint, differs between seeds only by the order), the same
   steps, batch and recipe for both starts (the preset's ``ft_task_steps`` / ``ft_task_sets`` per task).
   One task of this file beside them (``EXTRA_TASKS``): ``easy_vqa_captioning``, the captioning recipe on
   easy-VQA *test* images captioned as the pretraining pairs are, 400 to finetune on and the rest to
   evaluate (:func:`easy_vqa_caption_index`): captions whose words the image gives, on images never seen.
5. **contrastive stage**: ``finetune/recipes/itc_small.toml`` on the training pair shards from both starts;
   zero-shot retrieval (R@1/5/10 both ways) on the held-out pairs.

Then an image-use probe of the exported checkpoints on the held-out pairs, computed here with the model
alone (masked caption tokens predicted with the true image, another pair's image, and no image; averaged
over ``PROBE_DRAWS`` mask draws, with their spread), and the write-up: ``--out`` (.md and .json). Presets:
``full`` (the acceptance run, about 45 minutes on 2 idle cores: 25 minutes of pretraining, 36
finetuning runs of ~30 s, 6 contrastive runs; each further pretraining seed 21-25 minutes), ``reduced`` (250
pretraining steps, 12 finetuning steps: fits a shared machine) and ``--quick`` (every stage at toy sizes:
about 4 minutes of stages plus ~30 s start-up for each of the 24 finetuning runs). A stage whose output
exists is skipped, so ``--tasks`` / ``--seeds`` can be extended later; a finetuning or contrastive run of
other settings runs again, and a pretraining export of another command is refused (remove it or give
another ``--work``)::

    python bench/pretraining_helps.py                     # full
    python bench/pretraining_helps.py --seeds 0,1,2 --pretrain-seeds 0,1   # the committed run's seeds
    python bench/pretraining_helps.py --preset reduced --out bench/results/pretraining_helps_reduced.md
    python bench/pretraining_helps.py --quick --work runs/pretraining_helps_quick --out /tmp/ph_quick.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_small  # noqa: E402  (bench/ is not a package: its harness is imported by path)

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_EVERY = 10  # one in 10 items of each source is held out of pretraining (hold_out)
PRESETS = {
    # max items per source (0: all), pretraining / finetuning / contrastive steps, tokenizer sizes.
    "full": dict(
        emoji=500,
        easy_vqa=0,
        stamps=0,
        glosses=20000,
        vqkd_images=1200,
        vqkd_steps=60,
        spm_size=4000,
        # Warm stages, each warm-starting the next (pretrain()): the pairs alone, then the mixed run of
        # pretrain_steps. A texts-alone stage first (700 steps of 32 at lr 2e-4) was measured and dropped:
        # held-out MLM 0.046 after it, and the mixed run's eval/image_use stayed at 0 (docs/pretraining.md).
        warm_stages=(dict(name="pretrain_pairs", steps=600, mix=dict(images=0, texts=0, pairs=1)),),
        # 5,000 mixed steps: 1,500 -> 3,000 raised the probe from +5.5 to +9.8 points and moved easy-VQA
        # finetuning from within the seed spread to better; 3,000 -> 5,000 in bench/results/
        # pretraining_helps.md ("What changed").
        pretrain_steps=5000,
        eval_every=300,
        eval_samples=256,
        ranks=2,
        micro_batch=16,
        pairs_share=2,
        lr=5e-4,
        ft_steps=150,
        # Per task: more steps where 150 leave both starts at the answer prior (easy-VQA), and no layer decay
        # where 0.75 held a pretrained start back (bench/results/finetune_small_notes.md's ablation). The
        # same settings for both starts.
        ft_task_steps={"easy_vqa_small": 450},
        # The heads that read one token read the mean of the tokens (task.pooling): no pretraining loss
        # trains the first token's output (docs/finetune.md, "Pooling"; the write-up has the "cls" runs).
        ft_task_sets={
            "wordnet_small": ("param_groups.layer_decay=1.0", "task.pooling=mean"),
            "easy_vqa_small": ("task.pooling=mean",),
            "stamps_retrieval_small": ("param_groups.layer_decay=1.0", "task.pooling=mean"),
        },
        ft_caps=(),
        itc_steps=180,  # 60 in earlier runs: both starts improve at 180, the verdict is the same
        itc_sets=("task.pooling=mean",),
    ),
    "reduced": dict(
        emoji=1000,
        easy_vqa=1500,
        stamps=0,
        glosses=3000,
        vqkd_images=200,
        vqkd_steps=20,
        spm_size=2000,
        pretrain_steps=250,
        eval_every=125,
        eval_samples=96,
        ranks=1,
        micro_batch=24,
        ft_steps=12,
        ft_caps=("data.max_train=1000", "data.max_eval=150"),
        itc_steps=12,
    ),
    "quick": dict(
        emoji=120,
        easy_vqa=200,
        stamps=60,
        glosses=300,
        vqkd_images=48,
        vqkd_steps=4,
        spm_size=1000,
        pretrain_steps=8,
        eval_every=4,
        eval_samples=16,
        ranks=1,
        micro_batch=6,
        ft_steps=3,
        ft_caps=("data.max_train=64", "data.max_eval=32"),
        itc_steps=3,
    ),
}
STARTS = ("scratch", "pretrained")
ITC_METRICS = (
    "eval/average",
    "eval/tr_r1",
    "eval/tr_r5",
    "eval/tr_r10",
    "eval/ir_r1",
    "eval/ir_r5",
    "eval/ir_r10",
)
# The pretraining evaluation's figures in the write-up (vl_mlm_no_image: when the evaluation logs it).
CURVE_TAGS = ("eval/acc/vl_mlm", "eval/acc/vl_mlm_shuffled_image", "eval/acc/vl_mlm_no_image",
              "eval/image_use", "eval/acc/mlm", "eval/acc/mim")  # fmt: skip
SHAPE_WORDS = ("circle", "rectangle", "triangle")
# The image-use probe is averaged over this many mask draws (probe_draws; a preset's probe_draws overrides):
# each draw masks other caption tokens and pairs each caption with another shuffled image.
PROBE_DRAWS = 5
# Tasks of this benchmark beside finetune_small's: name -> the recipe it runs (its data: this file's index).
# easy_vqa_captioning: captioning on held-out easy-VQA images, 400 of them to finetune on
# (easy_vqa_caption_index), where what the caption says is what pretraining taught about the image.
EXTRA_TASKS = {"easy_vqa_captioning": "stamps_captioning_small"}
EASY_VQA_CAPTION_TRAIN = 400
TASK_METRICS = {**finetune_small.TASKS, "easy_vqa_captioning": ("eval/bleu4", "eval/cider")}
CAPTION_TEMPLATES = ("a {c} {s}.", "a {s} in {c}.", "there is a {c} {s}.", "a picture of a {c} {s}.")


# ----- 1. data ------------------------------------------------------------------------------------------
def easy_vqa_pairs(limit: int) -> list[tuple[str, str]]:
    """(image path, caption) of easy-VQA *train* images, the caption built from the image's own answers to
    "what shape" / "what color" questions: a word only the image tells."""
    paths, colour, shape = easy_vqa_answers("train")
    ids = sorted(shape)[: limit or None]
    return [(paths[i], CAPTION_TEMPLATES[i % 4].format(c=colour[i], s=shape[i])) for i in ids]


def easy_vqa_answers(split: str) -> tuple[list[str], dict[int, str], dict[int, str]]:
    """easy-VQA's image paths of ``split`` ("train" / "test") and, by image id, the colour and shape its
    questions' answers give (the images with both)."""
    import easy_vqa

    questions = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    shape, colour = {}, {}
    for question, answer, image in zip(*questions):
        if answer in SHAPE_WORDS:
            shape[image] = answer
        elif answer not in ("yes", "no") and "color" in question:
            colour[image] = answer
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    both = set(shape) & set(colour)
    return paths, {i: colour[i] for i in both}, {i: shape[i] for i in both}


def caption_caps(preset: dict) -> tuple[int, int]:
    """(training images, evaluation images; 0: all) of the easy_vqa_captioning index under the preset's
    ``data.max_train`` / ``data.max_eval`` caps (the caps finetune_small's exported indexes are written
    with; this index is written here, so they apply to it here)."""
    caps = dict(item.split("=", 1) for item in preset["ft_caps"])
    train = int(caps.get("data.max_train", 0)) or EASY_VQA_CAPTION_TRAIN
    return min(train, EASY_VQA_CAPTION_TRAIN), int(caps.get("data.max_eval", 0))


def easy_vqa_caption_index(
    root: Path, train_images: int = EASY_VQA_CAPTION_TRAIN, eval_images: int = 0
) -> list[str]:
    """The ``easy_vqa_captioning`` task: easy-VQA *test* images (never in pretraining) captioned as the
    pretraining pairs are. The first ``train_images`` (by id) are the finetuning split, one caption each
    (the template of its id); the rest (the first ``eval_images`` of them; 0: all) the evaluation split,
    every template a reference (one row each, grouped by ``image_id``). Written as a released-format index
    (``train.jsonl`` / ``eval.jsonl``); returns the ``--set`` overrides that point a captioning recipe at
    it."""
    paths, colour, shape = easy_vqa_answers("test")
    ids = sorted(shape)
    root.mkdir(parents=True, exist_ok=True)

    def row(i: int, template: str) -> str:
        text = template.format(c=colour[i], s=shape[i])
        return json.dumps({"image_path": str(paths[i]), "text": text, "image_id": i})

    train = [row(i, CAPTION_TEMPLATES[i % 4]) for i in ids[:train_images]]
    held = [row(i, t) for i in ids[train_images:][: eval_images or None] for t in CAPTION_TEMPLATES]
    (root / "train.jsonl").write_text("\n".join(train) + "\n")
    (root / "eval.jsonl").write_text("\n".join(held) + "\n")
    return finetune_small.index_sets(root, workers=0)


def stamp_pairs(limit: int) -> tuple[list[tuple[str, str]], int]:
    """(PNG path, caption) of Tux Paint stamps whose caption is not one of the stamps tasks' eval captions
    (``load_tuxpaint``'s seeded split, the one stamps_retrieval_small / stamps_captioning_small evaluate on);
    also how many stamps that keeps out."""
    from beit3.finetune.data.sources import TUXPAINT_DIR, load_tuxpaint

    eval_captions = {ex["text"] for ex in load_tuxpaint(8).eval.examples}
    items, excluded = [], 0
    for png in sorted(TUXPAINT_DIR.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file() or not txt.stat().st_size:
            continue
        caption = txt.read_text(errors="replace").splitlines()[0].strip()
        if not caption:
            continue
        if caption in eval_captions:
            excluded += 1
        else:
            items.append((str(png), caption))
    return items[: limit or None], excluded


def emoji_pairs(limit: int) -> list[tuple[str, str]]:
    """(PNG path, caption) of captioned Twemoji (``beit3.pretrain.demo_data``'s names), evenly subsampled."""
    from beit3.pretrain.demo_data import emoji_items

    items = [(p, c) for p, c in emoji_items() if c]
    return items[:: max(1, len(items) // limit)] if limit else items


def text_segments(glosses: int) -> list[str]:
    """pydoc paragraphs (48-word segments, as the demo data) and WordNet glosses of the train split only."""
    from beit3.finetune.data.sources import load_wordnet
    from beit3.pretrain.demo_data import pydoc_paragraphs
    from beit3.pretrain.shard_writer import split_segments

    texts = [seg for para in pydoc_paragraphs() for seg in split_segments(para, 48)]
    train = load_wordnet().train.examples  # the task's seeded split: its eval glosses never appear here
    texts += [ex["text"] for ex in random.Random(0).sample(train, min(glosses, len(train)))]
    return texts


def caption_words(caption: str) -> set[str]:
    """The lower-case words of a caption (punctuation dropped)."""
    return set(re.findall(r"[a-z0-9']+", caption.lower()))


def hold_out(items: list[tuple[str, str]], every: int) -> tuple[list, list]:
    """(training, held-out) (path, caption) items of one source: one in ``every`` items held out, chosen
    evenly, in order, among the items whose every caption word is also a word of a caption that stays in
    training. A held-out image is then new but what its caption names is not: the image-use probe asks
    whether the model reads a known object, shape or colour off an unseen image, not whether it can name a
    word it never met (a Tux Paint stamp or an emoji with a name of its own is never held out). Where every
    caption qualifies (easy-VQA's) that is every ``every``-th item. An item due that no longer qualifies
    (the items held out before it took a word's other captions) is skipped, not replaced: fewer are held
    out where few qualify or where qualifying captions share their rare words (Tux Paint: 58 of 59)."""
    target = len(items) // every
    words = [caption_words(caption) for _, caption in items]
    count: dict[str, int] = {}
    for item_words in words:
        for word in item_words:
            count[word] = count.get(word, 0) + 1
    candidates = [i for i, item_words in enumerate(words) if all(count[w] >= 2 for w in item_words)]
    step = max(1, len(candidates) // target) if target else 0
    held: set[int] = set()
    for n, i in enumerate(candidates):
        # still one training caption with each word once this one is held out (count: items in training)
        if len(held) < target and n % step == step - 1 and all(count[w] >= 2 for w in words[i]):
            held.add(i)
            for w in words[i]:
                count[w] -= 1
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def write_data(root: Path, preset: dict) -> dict:
    """The pretraining shards (train and held out), ``corpus.txt`` and the VQ-KD image folder; returns the
    counts (also written as ``data.json``)."""
    from beit3.pretrain.shard_writer import image_result, shard_dir_summary, text_results, write_shard_dir

    stamps, stamps_excluded = stamp_pairs(preset["stamps"])
    sources = {
        "easy_vqa": easy_vqa_pairs(preset["easy_vqa"]),
        "tuxpaint": stamps,
        "twemoji": emoji_pairs(preset["emoji"]),
    }
    split = {"train": [], "heldout": []}
    held_counts = {}
    for source, items in sources.items():
        train, held = hold_out(items, HELD_OUT_EVERY)
        split["train"] += train
        split["heldout"] += held
        held_counts[source] = len(held)
    texts = text_segments(preset["glosses"])
    held_texts = texts[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
    train_texts = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    train_texts += [c for _, c in split["train"]]
    random.Random(0).shuffle(train_texts)
    random.Random(1).shuffle(split["train"])  # mixed sources in every shard

    def images(items, captioned: bool):
        for path, caption in items:
            yield image_result(Path(path).read_bytes(), caption if captioned else None, 25_000_000)

    extra = {"created_by": "bench/pretraining_helps.py"}
    summary: dict = {
        "sources": {k: len(v) for k, v in sources.items()},
        "tuxpaint_excluded_eval_captions": stamps_excluded,
        "heldout_sources": held_counts,
    }
    for name, items in split.items():
        base = root if name == "train" else root / "heldout"
        for kind, captioned in (("pairs", True), ("images", False)):
            manifest = write_shard_dir(
                str(base / kind), kind, images(items, captioned), extra, max_samples=500
            )
            summary[f"{name}/{kind}"] = shard_dir_summary(manifest)
        manifest = write_shard_dir(
            str(base / "texts"),
            "texts",
            text_results(train_texts if name == "train" else held_texts),
            extra,
            max_samples=2000,
        )
        summary[f"{name}/texts"] = shard_dir_summary(manifest)
    (root / "corpus.txt").write_text("\n".join(train_texts) + "\n")
    vqkd = root / "vqkd_images"
    vqkd.mkdir(parents=True, exist_ok=True)
    for i, (path, _) in enumerate(random.Random(2).sample(split["train"], preset["vqkd_images"])):
        (vqkd / f"{i:05d}{Path(path).suffix}").write_bytes(Path(path).read_bytes())
    (root / "data.json").write_text(json.dumps(summary, indent=1))
    return summary


# ----- 2.-3. tokenizers and pretraining -----------------------------------------------------------------
def run(cmd: list[str], log: Path, threads: int) -> float:
    """Run a stage's command (its output into ``log``); exits naming the log when it fails. Wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} ... failed (exit {proc.returncode}): see {log}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def train_tokenizers(work: Path, preset: dict, threads: int) -> tuple[Path, Path, dict]:
    """SentencePiece on the corpus, tiny VQ-KD on the sampled images; (spm, vqkd checkpoint, wall times)."""
    spm, vqkd = work / "spm.model", work / "vqkd.pth"
    walls = {}
    if not spm.is_file():
        walls["spm_s"] = run(
            [
                "beit3-spm",
                "train",
                "--input",
                str(work / "data/corpus.txt"),
                "--model-prefix",
                str(work / "spm"),
                "--vocab-size",
                str(preset["spm_size"]),
            ],
            work / "spm.log",
            threads,
        )
    if not vqkd.is_file():
        walls["vqkd_s"] = run(
            [
                "beit3-vqkd",
                "train",
                "--config",
                "pretrain/recipes/vqkd/tiny.toml",
                "--ds-config",
                "ds_configs/vqkd_fp32.json",
                "--output-dir",
                str(work / "vqkd"),
                "--set",
                f'data.paths=["{work / "data/vqkd_images"}"]',
                "--set",
                "data.views_per_image=1",
                "--set",
                f"train.total_steps={preset['vqkd_steps']}",
                "--set",
                f"train.warmup_steps={min(20, max(1, preset['vqkd_steps'] // 3))}",
            ],
            work / "vqkd.log",
            threads,
        )
        (work / "vqkd/tokenizer.pth").rename(vqkd)
    return spm, vqkd, walls


def pretrain(
    work: Path, preset: dict, spm: Path, vqkd: Path, threads: int, seed: int = 0
) -> tuple[Path, float]:
    """beit3-pretrain (demo recipe) on the training shards, evaluated on the held-out ones; the export.

    With ``warm_stages`` in the preset, a chain of runs of the same program: each stage (its own
    ``[batch]`` mix, steps and lr) is warm-started from the previous stage's export (``model.warm_start``:
    its weights, a fresh optimizer and schedule), and the mixed run of ``pretrain_steps`` from the last.
    Measured in this benchmark's pilots (docs/pretraining.md, "Does pretraining help?"): from random init
    with texts in every batch, the masked-caption loss first learns the captions' templates and the image
    stays unused for thousands of pairs; on the pairs alone the image is used within about 5,000 pairs, and
    a mixed run keeps it. A stage whose export exists is not rerun (:func:`made_by`: unless another
    command made it). ``seed`` > 0: the same chain with that initialisation, masks and data order, its
    runs named ``<stage>_seed<seed>``. Returns the export and each stage's wall seconds, ``{"<run>_s":
    ...}``: a stage's time is kept beside its export (``wall.json``), so a stage an earlier invocation ran
    still reports it (none for an export without one, of runs before the records)."""
    remade, warm, walls = False, None, {}
    ranks_threads = max(1, threads // preset["ranks"])
    mix = {"images": 1, "texts": 1, "pairs": preset.get("pairs_share", 1)}
    stages = [(st["name"], st["steps"], st["mix"], st.get("lr")) for st in preset.get("warm_stages", ())]
    for stage, steps, stage_mix, lr in [*stages, ("pretrain", preset["pretrain_steps"], mix, None)]:
        name = run_name(stage, seed)
        export = work / f"{name}_export/model.pth"
        cmd = _pretrain_cmd(work, preset, spm, vqkd, name, steps, stage_mix, export, warm, lr=lr, seed=seed)
        if remade and export.is_file():  # made from an earlier stage's export that this invocation remade
            sys.exit(f"{export} was warm-started from an export that was just made again: remove "
                     f"{export.parent} and {work / name} to rerun it")  # fmt: skip
        if not made_by(export, cmd, work / name):
            wall = run(cmd, work / f"{name}.log", ranks_threads)
            (export.parent / "command.json").write_text(json.dumps(cmd, indent=1))
            (export.parent / "wall.json").write_text(json.dumps({"wall_s": wall}))
            remade = True
        record = export.parent / "wall.json"
        if record.is_file():
            walls[f"{name}_s"] = json.loads(record.read_text())["wall_s"]
        warm = export
    return export, walls


def run_name(stage: str, seed: int) -> str:
    """The run folder's name of a pretraining stage (``<stage>_export`` its export's) for a seed."""
    return f"{stage}_seed{seed}" if seed else stage


def made_by(export: Path, cmd: list[str], run_dir: Path) -> bool:
    """Whether a pretraining stage's export exists, made by ``cmd`` (its ``command.json``; an export without
    one, of a run before it was written, is taken as it is). An export that another command made (a preset
    changed since, a run folder reused) exits naming what differs: a rerun would resume its checkpoints."""
    if not export.is_file():
        return False
    record = export.parent / "command.json"
    made = json.loads(record.read_text()) if record.is_file() else cmd
    if made != cmd:
        differ = sorted(set(made) ^ set(cmd)) or ["the order of the arguments"]
        sys.exit(
            f"{export} was made by another command than the preset's now ({', '.join(differ[:6])}); remove "
            f"{export.parent} and {run_dir} to rerun the stage, or give another --work"
        )
    return True


def _pretrain_cmd(
    work: Path,
    preset: dict,
    spm: Path,
    vqkd: Path,
    name: str,
    steps: int,
    mix: dict,
    export: Path,
    warm_start: Path | None = None,
    lr: float | None = None,
    seed: int = 0,
) -> list[str]:
    """The torchrun command of one pretraining run into ``work/name``: ``mix`` the ``[batch]`` shares,
    held-out evaluation of the streams it trains; ``lr`` (default: the preset's) its peak lr; ``seed`` the
    run's ``train.seed`` and ``data.seed`` (0, the recipes' default, is not written)."""
    from beit3.tokenizers.text import TextTokenizer

    data, held = work / "data", work / "data/heldout"
    shapes = f"{{vocab_size = {TextTokenizer(spm).vocab_size}, visual_vocab_size = 1024}}"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", str(preset["ranks"]), "-m", "beit3.pretrain.train",
           "--config", "pretrain/recipes/demo.toml", "--ds-config", "ds_configs/zero0_fp32.json",
           "--ds-set", f"train_micro_batch_size_per_gpu={preset['micro_batch']}",
           "--output-dir", str(work / name), "--resume", "auto",
           "--set", f"tokenizers.text={spm}", "--set", f"tokenizers.visual_checkpoint={vqkd}",
           "--set", f"model.overrides={shapes}",
           "--set", f"train.total_steps={steps}",
           "--set", f"train.warmup_steps={max(1, min(20, steps // 10))}",
           "--set", f"train.lr={lr or preset.get('lr', 2e-4)}",
           "--set", f"train.save_every={steps}",
           "--set", f"train.eval_every={min(preset['eval_every'], steps)}",
           "--set", f"eval.samples={preset['eval_samples']}",
           "--export", str(export)]  # fmt: skip
    for kind, stream in (("images", "image"), ("texts", "text"), ("pairs", "pair")):
        cmd += ["--set", f"batch.{kind}={mix[kind]}"]
        cmd += ["--set", f'data.{stream}_shards=["{data / kind}/*.tar"]']
        if mix[kind]:  # held-out shards of a stream the run does not train would be refused
            cmd += ["--set", f'eval.{stream}_shards=["{held / kind}/*.tar"]']
    if warm_start is not None:
        cmd += ["--set", f"model.warm_start={warm_start}"]
    if seed:
        cmd += ["--set", f"train.seed={seed}", "--set", f"data.seed={seed}"]
    return cmd


def pretraining_curve(work: Path, name: str = "pretrain") -> dict:
    """The logged eval/* and acc/* scalars of the pretraining run, by step."""
    from beit3.engine.metrics import read_scalars

    scalars = read_scalars(work / name)
    keep = [
        k
        for k in scalars
        if k.startswith(
            ("eval/acc", "eval/loss/vl_mlm", "eval/image_use", "acc/", "eval/health/pair_top", "loss/total")
        )
    ]
    return {k: {int(s): v for s, v in scalars[k].items()} for k in sorted(keep)}


# ----- the image-use probe on the exported model -------------------------------------------------------
def held_out_pairs(folder: Path, size: int):
    """uint8 (N, 3, size, size) images and captions of the held-out pair shards."""
    import numpy as np
    import torch
    from PIL import Image

    from beit3.pretrain.data.decode import decode_image

    images, captions = [], []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members: dict[str, dict] = {}
            for m in tar.getmembers():
                stem, _, ext = m.name.partition(".")
                members.setdefault(stem, {})[ext] = tar.extractfile(m).read()
        for fields in members.values():
            img = decode_image(fields["jpg"]).resize((size, size), Image.BICUBIC)
            images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
            captions.append(fields["txt"].decode())
    return torch.stack(images), captions


def held_out_sources(data: dict, n: int) -> dict[str, slice]:
    """The held-out pairs of each source (``data.json``'s ``heldout_sources`` counts; a data folder written
    before them held out every 10th item): ``write_data`` writes the sources' held-out items one after the
    other into one shard read in order; {} if the counts do not add up to the ``n`` pairs read."""
    counts = data.get("heldout_sources") or {k: v // HELD_OUT_EVERY for k, v in data["sources"].items()}
    rows, start = {}, 0
    for source, count in counts.items():
        rows[source] = slice(start, start + count)
        start += count
    return rows if start == n else {}


def image_use_probe(checkpoint: Path | None, spm: Path, shapes: dict, pairs, seed: int = 0) -> dict:
    """Masked-caption-token accuracy on held-out pairs with the true image, another pair's image (a fixed
    derangement) and no image (text alone), for ``checkpoint`` or random init (``None``, seeded). The
    captions are masked as pretraining masks a pair's text (``pair_text_mask_ratio`` 0.5 of the tokens
    that are not ``<s>``/``</s>``/padding, BERT's 80/10/10 corruption: ``bert_mask_tokens``), the same
    positions and corruption in all three conditions."""
    import numpy as np
    import torch

    from beit3.finetune.data.batches import images_to_float
    from beit3.model import build_model, load_checkpoint
    from beit3.pretrain.evaluation import derangement
    from beit3.tokenizers.masking import IGNORE_INDEX, bert_mask_tokens
    from beit3.tokenizers.text import FIRST_ORDINARY_ID, TextTokenizer

    torch.manual_seed(seed)
    model = build_model("beit3_small_patch16_64", **shapes).eval()
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    tok = TextTokenizer(spm)
    images, captions = pairs
    ids, pad = tok.encode_batch(captions, 32)
    text, labels = bert_mask_tokens(ids, pad, 0.5, tok.mask_id, FIRST_ORDINARY_ID, tok.mask_id,
                                    tok.special_ids, np.random.default_rng(seed))  # fmt: skip
    masked = labels != IGNORE_INDEX
    x = images_to_float(images)
    shown = {"true image": x, "shuffled image": x[derangement(len(x), seed)], "no image": None}
    out = {}
    with torch.no_grad():
        for name, image in shown.items():
            correct = total = 0
            for i in range(0, len(x), 128):
                sl = slice(i, i + 128)
                h = model(
                    image=None if image is None else image[sl],
                    text=text[sl],
                    text_padding_mask=pad[sl],
                )[:, -ids.shape[1] :]
                where = masked[sl]
                logits = model.mlm_head(h[where])[:, : tok.vocab_size]
                correct += (logits.argmax(-1) == labels[sl][where]).sum().item()
                total += int(where.sum())
            out[name] = correct / max(total, 1)
    out["image_use"] = out["true image"] - out["shuffled image"]
    out["pairs"], out["masked_tokens"] = len(x), total
    return out


def probe_draws(checkpoint: Path | None, spm: Path, shapes: dict, pairs, draws: int) -> dict:
    """:func:`image_use_probe` over ``draws`` seeds (each its own masked positions, corruption and shuffled
    partners; for random init also its own init): the mean of each figure, and ``image_use_sd`` (the sample
    standard deviation of ``image_use`` over the draws) and ``image_use_draws``."""
    runs = [image_use_probe(checkpoint, spm, shapes, pairs, seed) for seed in range(draws)]
    out = {k: statistics.fmean(r[k] for r in runs) for k in ("true image", "shuffled image", "no image")}
    out["image_use_draws"] = [r["image_use"] for r in runs]
    out["image_use"], out["image_use_sd"] = mean_spread(out["image_use_draws"])
    out["pairs"], out["masked_tokens"] = runs[0]["pairs"], sum(r["masked_tokens"] for r in runs)
    return out


def probe_row(seed: int, first: int, source: str = "") -> str:
    """The probe's row of a pretraining seed's export (the first seed's named without its seed), on all the
    held-out pairs or on one ``source``'s."""
    name = "pretrained" if seed == first else f"pretrained (pretraining seed {seed})"
    return name + (f", {source} pairs only" if source else "")


def probe_over_seeds(probe: dict, seeds: list[int], sources: list[str]) -> dict:
    """{"all held-out pairs" / a source: (mean, sd, values)} of true - shuffled over the pretraining seeds
    (each seed's mean over its mask draws: the :func:`probe_row` rows)."""
    out = {}
    for source in ["", *sources]:
        values = [probe[probe_row(s, seeds[0], source)]["image_use"] for s in seeds]
        out[source or "all held-out pairs"] = (*mean_spread(values), values)
    return out


# ----- 4.-5. finetuning and the contrastive stage --------------------------------------------------------
def harness_args(work: Path, steps: int, batch: int, threads: int, sets: list[str], ckpt: Path):
    """The namespace finetune_small's ``export_index`` / ``run_one`` read."""
    return argparse.Namespace(
        work=work,
        steps=steps,
        batch=batch,
        threads=threads,
        workers=0,
        model="beit3_small_patch16_64",
        set=sets,
        pretrained=ckpt,
    )


def cached_run(record: dict | None, settings: dict) -> bool:
    """Whether an earlier invocation's record of a run stands: it ran with these settings and did not
    fail (a failed run, or one with other settings, runs again)."""
    return record is not None and record.get("settings") == settings and "error" not in record


def clear_run(folder: Path, recipe: str, start: str) -> None:
    """Remove what an earlier run of ``recipe`` from ``start`` left in ``folder`` (finetune_small.run_one's
    output folder): the harness starts every run afresh (``--resume none``), which refuses a folder that
    holds checkpoints, and the record it replaces is of other settings or of a failure."""
    shutil.rmtree(folder / f"{recipe}_{start}", ignore_errors=True)


def finetune(work: Path, preset: dict, args, spm: Path, ckpt: Path, shapes: dict) -> dict:
    """Every task x start x seed through finetune_small's harness; results[task][start][seed]."""
    results: dict = {}
    cache = work / "finetune.json"
    if cache.is_file():
        results = json.loads(cache.read_text())
    index_args = harness_args(
        work / "finetune", preset["ft_steps"], args.batch, args.threads, list(preset["ft_caps"]), ckpt
    )
    index_args.work.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        data_sets = None
        steps = preset.get("ft_task_steps", {}).get(task, preset["ft_steps"])
        for seed in args.seeds:
            sets = [*preset.get("ft_task_sets", {}).get(task, ()), f"train.seed={seed}", f"data.seed={seed}"]
            settings = {"steps": steps, "sets": sets}
            for start in STARTS:
                if cached_run(results.get(task, {}).get(start, {}).get(str(seed)), settings):
                    continue
                if data_sets is None:
                    data_sets = (
                        easy_vqa_caption_index(index_args.work / "index" / task, *caption_caps(preset))
                        if task in EXTRA_TASKS
                        else finetune_small.export_index(task, index_args)
                    )
                # an extra task runs a finetune_small recipe: in a folder of its own
                folder = work / f"finetune/seed{seed}" / (task if task in EXTRA_TASKS else "")
                run_args = harness_args(folder, steps, args.batch, args.threads, sets, ckpt)
                run_args.work.mkdir(parents=True, exist_ok=True)
                recipe = EXTRA_TASKS.get(task, task)
                clear_run(run_args.work, recipe, start)
                r = {
                    **finetune_small.run_one(recipe, start, run_args, spm, shapes, data_sets),
                    "settings": settings,
                }
                results.setdefault(task, {}).setdefault(start, {})[str(seed)] = r
                print(
                    f"{task:26s} {start:10s} seed {seed}: "
                    + ", ".join(f"{k}={r[k]:.3f}" for k in TASK_METRICS[task] if k in r)
                    + (f" {r['error']}" if "error" in r else ""),
                    flush=True,
                )
                cache.write_text(json.dumps(results, indent=1))
    return results


def contrastive(work: Path, preset: dict, args, spm: Path, ckpt: Path, shapes: dict) -> dict:
    """itc_small on the training pair shards from both starts; zero-shot retrieval on the held-out pairs."""
    results: dict = {}
    cache = work / "contrastive.json"
    if cache.is_file():
        results = json.loads(cache.read_text())
    pairs, held = f"data.train={work / 'data/pairs'}/*.tar", f"data.eval={work / 'data/heldout/pairs'}/*.tar"
    for seed in args.seeds:
        sets = [*preset.get("itc_sets", ()), f"train.seed={seed}", f"data.seed={seed}", "train.eval_every=0"]
        settings = {"steps": preset["itc_steps"], "sets": sets}
        for start in STARTS:
            if cached_run(results.get(start, {}).get(str(seed)), settings):
                continue
            run_args = harness_args(
                work / f"contrastive/seed{seed}", preset["itc_steps"], args.batch, args.threads, sets, ckpt
            )
            run_args.work.mkdir(parents=True, exist_ok=True)
            clear_run(run_args.work, "itc_small", start)
            data_sets = [pairs, held, "data.num_workers=0"] + (
                ['model.pretrained=""'] if start == "scratch" else []
            )
            r = {
                **finetune_small.run_one("itc_small", start, run_args, spm, shapes, data_sets),
                "settings": settings,
            }
            results.setdefault(start, {})[str(seed)] = r
            print(
                f"itc_small {start:10s} seed {seed}: "
                + ", ".join(f"{k}={r[k]:.3f}" for k in ITC_METRICS if k in r)
                + (f" {r['error']}" if "error" in r else ""),
                flush=True,
            )
            cache.write_text(json.dumps(results, indent=1))
    return results


# ----- 6. the write-up ------------------------------------------------------------------------------------
def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for none."""
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(by_start: dict, metric: str) -> dict:
    """{start: (mean, sd, values)} of one metric over seeds."""
    out = {}
    for start in STARTS:
        values = [r.get(metric, math.nan) for r in by_start.get(start, {}).values() if "error" not in r]
        out[start] = (*mean_spread(values), values)
    return out


def verdict(s: dict) -> str:
    """'better' / 'worse' when the means differ by more than both seed spreads added, else 'within spread'."""
    (ms, ss, vs), (mp, sp, vp) = s["scratch"], s["pretrained"]
    if math.isnan(ms) or math.isnan(mp):
        return "n/a"
    if min(len(vs), len(vp)) < 2:
        return "n/a (one seed: no spread)"
    if abs(mp - ms) <= ss + sp:
        return "within spread"
    return "better" if mp > ms else "worse"


def mean_sd(mean: float, sd: float) -> str:
    """ "mean ± sd" to three decimals; to two significant digits where both are below 0.0005, so that a
    verdict on figures that small (BLEU-4 of captions of a few words) shows what it compares."""
    if 0 < max(abs(mean), sd) < 0.0005:
        return f"{mean:.2g} ± {sd:.2g}"
    return f"{mean:.3f} ± {sd:.3f}"


def tables(report: dict) -> str:
    """The Markdown tables of the report."""
    lines = [
        "## Image-use probe on held-out pairs (exported checkpoints, masked caption tokens)",
        "",
        f"Each figure is the mean over {len(next(iter(report['probe'].values()))['image_use_draws'])} "
        "mask draws (other masked tokens and shuffled partners in each); ± the sample standard deviation of "
        "true - shuffled over the draws.",
        "",
        "| start | true image | shuffled image | no image | true - shuffled |",
        "|---|---|---|---|---|",
    ]
    for name, p in report["probe"].items():
        lines.append(
            f"| {name} | {p['true image']:.3f} | {p['shuffled image']:.3f} | {p['no image']:.3f} "
            f"| {100 * p['image_use']:+.1f} ± {100 * p['image_use_sd']:.1f} points |"
        )
    over = report.get("probe_over_seeds", {})
    if any(len(v[2]) > 1 for v in over.values()):
        lines += [
            "",
            f"Over the {len(over['all held-out pairs'][2])} pretraining seeds (true - shuffled: each seed's "
            "mean over its mask draws; mean ± the sample standard deviation over the seeds):",
            "",
            "| held-out pairs | true - shuffled | each seed |",
            "|---|---|---|",
        ]
        for part, (mean, sd, values) in over.items():
            each = " / ".join(f"{100 * v:+.1f}" for v in values)
            lines.append(f"| {part} | {100 * mean:+.1f} ± {100 * sd:.1f} points | {each} |")
    stages = [(f"the {name} stage", curve) for name, curve in report["pretraining"]["stage_curves"].items()]
    for title, curve in [*stages, ("the mixed pretraining", report["pretraining"]["curve"])]:
        steps = sorted({s for k in CURVE_TAGS for s in curve.get(k, {})})  # pretraining_curve: int steps
        if not steps:
            continue
        lines += [
            "",
            f"During {title} (`eval/*` of the `[eval]` table, the first {report['settings']['eval_samples']} "
            "held-out samples of each stream):",
            "",
            "| step | " + " | ".join(CURVE_TAGS) + " |",
            "|---|" + "---|" * len(CURVE_TAGS),
        ]
        for step in steps:
            cells = [curve.get(k, {}).get(step, math.nan) for k in CURVE_TAGS]
            lines.append(f"| {step} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    seeds = len(next(iter(report["finetune"].values()), {}).get("scratch", {})) if report["finetune"] else 0
    lines += [
        "",
        f"## Finetuning ({seeds} seeds each: mean ± sample standard deviation)",
        "",
        "| task | metric | random init | pretrained | pretrained vs random init |",
        "|---|---|---|---|---|",
    ]
    for task, metric, s in report["finetune_summary"]:
        scratch, pretrained = mean_sd(*s["scratch"][:2]), mean_sd(*s["pretrained"][:2])
        lines.append(f"| {task} | {metric} | {scratch} | {pretrained} | {verdict(s)} |")
    lines += [
        "",
        "## Zero-shot retrieval on held-out pairs after the contrastive stage (itc_small)",
        "",
        "| metric | random init | pretrained | pretrained vs random init |",
        "|---|---|---|---|",
    ]
    for metric in ITC_METRICS:
        s = summarize(report["contrastive"], metric)
        lines.append(
            f"| {metric} | {mean_sd(*s['scratch'][:2])} | {mean_sd(*s['pretrained'][:2])} | {verdict(s)} |"
        )
    return "\n".join(lines)


def primary_metric(task: str) -> str:
    """The metric a task is judged by: finetune_small's first, CIDEr-D for captioning (BLEU-4 is 0 on 2-4
    word Tux Paint captions, bench/results/finetune_small_notes.md)."""
    return "eval/cider" if "eval/cider" in TASK_METRICS[task] else TASK_METRICS[task][0]


def what_it_shows(report: dict) -> str:
    """The figures' plain reading against the acceptance criteria (no judgement beyond the numbers)."""
    probe = report["probe"]["pretrained"]
    verdicts = {f"{t} {m}": verdict(s) for t, m, s in report["finetune_summary"] if m == primary_metric(t)}
    better = [k for k, v in verdicts.items() if v == "better"]
    worse = [k for k, v in verdicts.items() if v == "worse"]
    # the criterion counts finetune_small's five tasks; this file's own (EXTRA_TASKS) are reported beside
    five = [k for k in better if k.split()[0] in finetune_small.TASKS]
    itc = verdict(summarize(report["contrastive"], "eval/average"))
    over = report.get("probe_over_seeds", {})
    seeds_line = "".join(
        f"- Over the {len(values)} pretraining seeds, {part}: {100 * mean:+.1f} ± {100 * sd:.1f} points.\n"
        for part, (mean, sd, values) in over.items()
        if len(values) > 1
    )
    by_source = "".join(
        f"- {name}: {100 * p['image_use']:+.1f} ± {100 * p['image_use_sd']:.1f} points "
        f"({p['pairs']} pairs).\n"
        for name, p in report["probe"].items()
        if name.endswith("pairs only")
    )
    return (
        f"- Image-use probe (exported checkpoint, held-out pairs): {probe['true image']:.3f} with the true "
        f"image, {probe['shuffled image']:.3f} with a shuffled one, {probe['no image']:.3f} with none: "
        f"{100 * probe['image_use']:+.1f} ± {100 * probe['image_use_sd']:.1f} points for the true image over "
        f"the mask draws (criterion: at least +10, beyond the spread); random init: "
        f"{100 * report['probe']['random init']['image_use']:+.1f}.\n"
        f"{by_source}"
        f"{seeds_line}"
        f"- Finetuning, primary metric per task, pretrained vs random init beyond the seed spread: better on "
        f"{len(better)} of {len(verdicts)} ({', '.join(better) or 'none'}), worse on {len(worse)} "
        f"({', '.join(worse) or 'none'}); the rest within spread. Of finetune_small's five tasks: better on "
        f"{len(five)} (criterion: better on at least three).\n"
        f"- Zero-shot retrieval after the contrastive stage (mean recall), pretrained vs random init: "
        f"{itc}.\n"
    )


def environment(argv: list[str]) -> str:
    import platform

    import deepspeed
    import torch

    return (
        f"- device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), shared "
        f"with other jobs (load average at the start {os.getloadavg()[0]:.1f})\n"
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, deepspeed "
        f"{deepspeed.__version__}\n- command: `python bench/pretraining_helps.py {' '.join(argv)}`"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="full")
    p.add_argument("--quick", action="store_true", help="the quick preset: every stage, tiny sizes")
    p.add_argument(
        "--work", type=Path, default=None, help="run folder (default runs/pretraining_helps_<preset>)"
    )
    p.add_argument("--out", type=Path, default=None, help="results .md (a .json beside it)")
    p.add_argument("--seeds", default="0,1", help="comma-separated finetuning seeds (at least two)")
    p.add_argument(
        "--pretrain-seeds",
        default="0",
        help="comma-separated pretraining seeds: the probe of each and its spread over them (finetuning and "
        "the contrastive stage start from the first; each further seed adds the whole pretraining's time)",
    )
    p.add_argument("--tasks", default=",".join(TASK_METRICS), help="finetuning tasks")
    p.add_argument("--batch", type=int, default=32, help="finetuning micro-batch (one process)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--notes", type=Path, default=None, help="Markdown appended to the results (analysis)")
    args = p.parse_args(argv)
    name = "quick" if args.quick else args.preset
    preset = PRESETS[name]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    given = args.pretrain_seeds
    try:
        args.pretrain_seeds = list(dict.fromkeys(int(s) for s in given.split(",") if s))
    except ValueError:
        args.pretrain_seeds = []
    if not args.pretrain_seeds or min(args.pretrain_seeds) < 0:
        p.error(f"--pretrain-seeds: comma-separated integers 0 or more, not {given!r}")
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in args.tasks if t not in TASK_METRICS]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; the tasks: {', '.join(TASK_METRICS)}")
    work = (args.work or ROOT / f"runs/pretraining_helps_{name}").resolve()
    out = args.out or ROOT / (
        "bench/results/pretraining_helps.md"
        if name == "full"
        else f"bench/results/pretraining_helps_{name}.md"
    )
    work.mkdir(parents=True, exist_ok=True)
    # The data and tokenizer stages' wall seconds, kept across invocations (reruns resume). Only theirs
    # are read back: the pretraining stages' come from their exports' records on every invocation
    # (pretrain()), the rest are recomputed, so no key of another preset or seed survives.
    walls_file = work / "walls.json"
    walls: dict = json.loads(walls_file.read_text()) if walls_file.is_file() else {}
    walls = {k: v for k, v in walls.items() if k in ("data_s", "spm_s", "vqkd_s")}
    data = work / "data"
    if not (data / "data.json").is_file():
        t = time.perf_counter()
        write_data(data, preset)
        walls["data_s"] = time.perf_counter() - t
    print(f"data: {(data / 'data.json').read_text()}", flush=True)
    spm, vqkd, tok_walls = train_tokenizers(work, preset, args.threads)
    walls.update(tok_walls)
    ckpts, first = {}, args.pretrain_seeds[0]
    for seed in args.pretrain_seeds:
        ckpts[seed], stage_walls = pretrain(work, preset, spm, vqkd, args.threads, seed)
        walls.update(stage_walls)
        walls_file.write_text(json.dumps(walls))
    ckpt = ckpts[first]  # finetuning and the contrastive stage start from the first seed's
    from beit3.finetune.reload import checkpoint_overrides

    shapes = {k: v for k, v in checkpoint_overrides(ckpt).items() if k != "visual_vocab_size"}
    pairs = held_out_pairs(data / "heldout/pairs", 64)
    config = checkpoint_overrides(ckpt)
    draws = preset.get("probe_draws", PROBE_DRAWS)
    sources = held_out_sources(json.loads((data / "data.json").read_text()), len(pairs[1]))
    probe = {"random init": probe_draws(None, spm, config, pairs, draws)}
    for seed, export in ckpts.items():
        probe[probe_row(seed, first)] = probe_draws(export, spm, config, pairs, draws)
        for stage in preset.get("warm_stages", ()) if seed == first else ():
            stage_export = work / f"{run_name(stage['name'], seed)}_export/model.pth"
            probe[f"after the {stage['name']} stage"] = probe_draws(stage_export, spm, config, pairs, draws)
        for source, rows in sources.items():
            if rows.stop - rows.start < 2:  # no other pair of the source to shuffle with
                continue
            # another pair's image of the same source: the harder baseline (same captions' templates)
            part = (pairs[0][rows], pairs[1][rows])
            probe[probe_row(seed, first, source)] = probe_draws(export, spm, config, part, draws)
    print(f"probe: {json.dumps(probe)}", flush=True)
    ft = finetune(work, preset, args, spm, ckpt, shapes)
    itc = contrastive(work, preset, args, spm, ckpt, shapes)
    # Per-run wall times summed (runs of earlier invocations included); total: the stages added up.
    walls["finetune_s"] = sum(r["wall_s"] for t in ft.values() for s in t.values() for r in s.values())
    walls["contrastive_s"] = sum(r["wall_s"] for s in itc.values() for r in s.values())
    walls["total_s"] = sum(v for k, v in walls.items() if k != "total_s")
    summary = [
        (task, metric, summarize(ft[task], metric))
        for task in args.tasks
        if task in ft
        for metric in TASK_METRICS[task]
    ]
    report = {
        "preset": name,
        "settings": preset,
        "seeds": args.seeds,
        "data": json.loads((data / "data.json").read_text()),
        "pretraining": {
            "curve": pretraining_curve(work),
            "stage_curves": {
                st["name"]: pretraining_curve(work, st["name"]) for st in preset.get("warm_stages", ())
            },
        },
        "probe": probe,
        "probe_over_seeds": probe_over_seeds(probe, list(ckpts), list(sources)),
        "finetune": ft,
        "finetune_summary": summary,
        "contrastive": itc,
        "wall_s": walls,
    }
    body = tables(report)
    print(body)
    heading = (
        "Does pretraining help? (full benchmark)"
        if name == "full"
        else f"Does pretraining help? REDUCED RUN (preset `{name}`): not the acceptance figures"
    )
    text = (
        f"# {heading}\n\n{environment(argv)}\n- preset `{name}`: {json.dumps(preset)}; finetuning seeds "
        f"{args.seeds}, micro-batch {args.batch}, one process, ZeRO-0 fp32\n- data: "
        f"{json.dumps(report['data'])}\n- wall time: "
        + ", ".join(f"{k} {v:.0f}" for k, v in walls.items())
        + f"\n\n{body}\n\n## What it shows\n\n{what_it_shows(report)}"
    )
    if args.notes is not None:
        text += "\n" + args.notes.read_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
