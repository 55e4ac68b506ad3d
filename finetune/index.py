"""``beit3-finetune-index TASK ...``: the released JSONL indexes of a finetuning dataset, in one command.

One subcommand per dataset reads its public raw files and writes the indexes the recipes name
(docs/finetune.md, "Building the indexes"); the builders are :mod:`beit3.finetune.data.indexes` and
:mod:`beit3.finetune.data.vqa_index`. Image paths in the indexes are relative to ``--root`` (the recipe's
``data.root``), where the indexes are written too unless ``--output-dir`` says otherwise. A missing or
malformed raw file ends the command with one ``beit3-finetune-index: error: ...`` line and exit code 2,
before anything is written.
"""

from __future__ import annotations

import argparse
import sys

from beit3.finetune.data.indexes import (
    IndexFiles,
    captioning_index,
    imagenet_index,
    nlvr2_index,
    nocaps_index,
    retrieval_index,
    write_index_files,
)
from beit3.finetune.data.vqa_answers import MIN_ANSWER_COUNT, NUM_ANSWERS
from beit3.finetune.data.vqa_index import REST_VAL_IMAGES, VQA_SPLITS, vqav2_index
from beit3.finetune.errors import FinetuneError
from beit3.tokenizers.errors import TokenizersError

PROG = "beit3-finetune-index"


def _common(p: argparse.ArgumentParser, root_required: bool = True) -> None:
    p.add_argument("--root", required=root_required,
                   help="data root (the recipe's data.root): image paths are relative to it")  # fmt: skip
    p.add_argument("--output-dir", help="where to write the indexes (default: --root)")
    p.add_argument("--tokenizer", help="SentencePiece model (beit3.spm): also write text_segment token ids")
    p.add_argument("--check-images", action="store_true", help="fail if an indexed image is not on disk")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write the released-format JSONL indexes of a dataset from its public raw files.",
        epilog="The raw files of each TASK and where to get them: docs/finetune.md, 'Building the indexes'.",
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")

    p = tasks.add_parser("imagenet", help="ImageNet-style class folders -> imagenet.{train,val}.index.jsonl")
    p.add_argument(
        "--train", required=True, help="folder of class sub-folders (the class list comes from it)"
    )
    p.add_argument("--val", required=True, help="folder of the same class sub-folders")
    _common(p, root_required=False)  # default root: the folder holding --train and --val

    p = tasks.add_parser("vqav2", help="VQAv2 questions + annotations -> vqa.*.jsonl, answer2label.txt")
    p.add_argument("--annotations", help="folder of the v2_*.json files (default: --root)")
    p.add_argument("--splits", nargs="+", choices=list(VQA_SPLITS), default=list(VQA_SPLITS),
                   help="splits to index (default: all four; train and val give the vocabulary)")  # fmt: skip
    p.add_argument("--min-answer-count", type=int, default=MIN_ANSWER_COUNT,
                   help="the vocabulary: answers given this often (as multiple_choice_answer)")  # fmt: skip
    p.add_argument("--num-answers", type=int, default=NUM_ANSWERS,
                   help="keep at most this many of them, the most frequent (0: no cap)")  # fmt: skip
    p.add_argument("--answer-vocab", help="reuse the answers of an answer2label.txt instead")
    p.add_argument("--rest-val-images", type=int, default=REST_VAL_IMAGES,
                   help="val images held out as vqa.rest_val.jsonl (the rest: trainable_val)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the rest_val draw")
    p.add_argument("--raw-annotator-answers", action="store_true",
                   help="count annotators' answers unnormalised, as the released builder did")  # fmt: skip
    _common(p)

    p = tasks.add_parser("nlvr2", help="NLVR2 train/dev/test1.json -> nlvr2.*.index.jsonl")
    p.add_argument("--data", required=True, help="folder of train.json, dev.json, test1.json (nlvr2/data)")
    p.add_argument(
        "--splits", nargs="+", choices=["train", "dev", "test1"], default=["train", "dev", "test1"]
    )
    p.add_argument("--train-images", default="images/train", help="train image folder under --root")
    p.add_argument("--dev-images", default="dev", help="dev image folder under --root")
    p.add_argument("--test1-images", default="test1", help="test1 image folder under --root")
    _common(p)

    for name, what in (("coco-retrieval", "dataset_coco.json -> coco_retrieval.*.jsonl"),
                       ("flickr30k", "dataset_flickr30k.json -> flickr30k.*.jsonl"),
                       ("coco-captioning", "dataset_coco.json -> coco_captioning.*.jsonl")):  # fmt: skip
        p = tasks.add_parser(name, help=f"Karpathy split file {what}")
        p.add_argument("--karpathy", required=True, help="the Karpathy split file (caption_datasets.zip)")
        if name == "flickr30k":
            p.add_argument("--image-dir", default="flickr30k-images", help="image folder under --root")
        _common(p)

    p = tasks.add_parser("nocaps", help="NoCaps COCO-format captions -> nocaps.<split>.jsonl")
    p.add_argument("--captions", required=True, help="nocaps_val_4500_captions.json (or the test image info)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--image-dir", help="image folder under --root (default: the split's name)")
    _common(p)
    return parser


def build(args: argparse.Namespace) -> IndexFiles:
    """The index files the parsed command describes (nothing written yet)."""
    if args.task == "imagenet":
        return imagenet_index(args.train, args.val, args.root)
    if args.task == "vqav2":
        return vqav2_index(
            args.annotations or args.root,
            args.splits,
            args.min_answer_count,
            args.num_answers,
            args.answer_vocab,
            args.rest_val_images,
            args.seed,
            args.raw_annotator_answers,
        )
    if args.task == "nlvr2":
        dirs = {"train": args.train_images, "dev": args.dev_images, "test1": args.test1_images}
        return nlvr2_index(args.data, dirs, args.splits)
    if args.task == "coco-retrieval":
        return retrieval_index(args.karpathy, "coco_retrieval")
    if args.task == "flickr30k":
        return retrieval_index(args.karpathy, "flickr30k", image_dir=args.image_dir)
    if args.task == "coco-captioning":
        return captioning_index(args.karpathy)
    return nocaps_index(args.captions, args.split, args.image_dir)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("min_answer_count", "num_answers", "rest_val_images"):
        if getattr(args, name, 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    try:
        tokenizer = None
        if args.tokenizer:  # first: a wrong path fails before a long build
            from beit3.tokenizers.text import TextTokenizer

            tokenizer = TextTokenizer(args.tokenizer)
        files = build(args)
        root = args.root if args.root is not None else files.root
        written = write_index_files(files, args.output_dir or root, tokenizer, root, args.check_images)
    except (FinetuneError, TokenizersError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for note in files.notes:
        print(f"{args.task}: {note}")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
