"""``beit3-vqkd``: train a VQ-KD visual tokenizer, list configs, compute codes of images.

Examples::

    beit3-vqkd list
    beit3-vqkd train --data photos/ --output-dir runs/vqkd_tiny --name vqkd_tiny_patch16_64 --steps 300
    torchrun --nproc_per_node 8 -m beit3.tokenizers.vqkd_cli train \\
        --name vqkd_encoder_base_decoder_3x768x12_clip --teacher clip --teacher-weights ViT-B-16.pt \\
        --data /data/imagenet/train --output-dir runs/vqkd_base --batch-size 64 --lr 2e-4
    beit3-vqkd codes --name vqkd_tiny_patch16_64 --checkpoint runs/vqkd_tiny/checkpoint.pth \\
        --data photos/ --output codes.pt
"""

from __future__ import annotations

import argparse
import ast
import sys

import torch

from beit3.tokenizers.images import ImageInputError, center_view, find_images, load_rgb, to_tensor
from beit3.tokenizers.teachers import TeacherError
from beit3.tokenizers.vqkd import VQKDConfigError, build_visual_tokenizer, get_vqkd_config, list_vqkd
from beit3.tokenizers.vqkd_train import TrainConfigError, VQKDTrainConfig, train


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set codebook_size=256")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beit3-vqkd", description=__doc__.split("\n")[0])
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered tokenizer configs")

    d = VQKDTrainConfig(data=[], output_dir="")
    t = sub.add_parser("train", help="train a tokenizer against a frozen teacher")
    t.add_argument(
        "--data", nargs="+", required=True, help="image files or directories (searched recursively)"
    )
    t.add_argument("--output-dir", required=True, help="checkpoint.pth, summary.json and tb/ go here")
    t.add_argument("--name", default=d.name, help="tokenizer config (beit3-vqkd list)")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    t.add_argument("--teacher", default=d.teacher, choices=["mobilenet_v2", "clip"])
    t.add_argument(
        "--teacher-weights", default=None, help="clip: OpenAI ViT-B-16.pt or an OpenAI-key state dict"
    )
    for key in ("steps", "batch_size", "warmup_steps", "views_per_image", "restart_every", "log_every"):
        t.add_argument(f"--{key.replace('_', '-')}", type=int, default=getattr(d, key))
    t.add_argument("--save-every", type=int, default=d.save_every)
    t.add_argument("--seed", type=int, default=d.seed)
    for key in ("lr", "min_lr", "weight_decay", "grad_clip", "dead_fraction"):
        t.add_argument(f"--{key.replace('_', '-')}", type=float, default=getattr(d, key))
    t.add_argument("--no-kmeans-init", action="store_true", help="keep the random initial codebook")
    t.add_argument(
        "--online", action="store_true", help="fresh crops each step, teacher per batch (big sets)"
    )
    t.add_argument(
        "--precision", default=d.precision, choices=["fp32", "bf16"], help="bf16: autocast the ViTs"
    )
    t.add_argument("--num-workers", type=int, default=d.num_workers, help="online mode: decoding workers")

    c = sub.add_parser("codes", help="codes of images (centred square view) saved with torch.save")
    c.add_argument("--name", required=True)
    c.add_argument("--checkpoint", default=None, help="omit only for smoke tests (random tokenizer)")
    c.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    c.add_argument("--data", nargs="+", required=True)
    c.add_argument("--input-size", type=int, default=None, help="view size (default: the config's img_size)")
    c.add_argument("--output", required=True, help='writes {"paths": [...], "codes": LongTensor (N, h*w)}')
    c.add_argument("--batch-size", type=int, default=64)
    return p


def _train(args: argparse.Namespace) -> None:
    cfg = VQKDTrainConfig(
        data=args.data,
        output_dir=args.output_dir,
        name=args.name,
        overrides=_parse_overrides(args.set),
        teacher=args.teacher,
        teacher_weights=args.teacher_weights,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        views_per_image=args.views_per_image,
        kmeans_init=not args.no_kmeans_init,
        online=args.online,
        precision=args.precision,
        num_workers=args.num_workers,
        restart_every=args.restart_every,
        dead_fraction=args.dead_fraction,
        log_every=args.log_every,
        save_every=args.save_every,
        seed=args.seed,
    )
    summary = train(cfg)
    b, a = summary["before"], summary["after"]
    print(
        f"rec loss {b['loss_rec']:.4f} -> {a['loss_rec']:.4f}; "
        f"used codes {b['used_codes']} -> {a['used_codes']}; "
        f"perplexity {b['perplexity']:.1f} -> {a['perplexity']:.1f}; wrote {args.output_dir}/checkpoint.pth"
    )


def _codes(args: argparse.Namespace) -> None:
    overrides = _parse_overrides(args.set)
    tok = build_visual_tokenizer(args.name, args.checkpoint, input_size=args.input_size, **overrides)
    paths = find_images(args.data)
    codes = []
    for start in range(0, len(paths), args.batch_size):
        batch = torch.stack(
            [to_tensor(center_view(load_rgb(p), tok.input_size)) for p in paths[start:][: args.batch_size]]
        )
        codes.append(tok.codes(batch))
    torch.save({"paths": [str(p) for p in paths], "codes": torch.cat(codes)}, args.output)
    print(f"wrote {args.output}: {len(paths)} images x {tok.grid[0] * tok.grid[1]} codes")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``beit3-vqkd``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            for name in list_vqkd():
                cfg = get_vqkd_config(name)
                print(
                    f"{name}: {cfg.img_size} px, {cfg.grid_size}x{cfg.grid_size} codes from a codebook of "
                    f"{cfg.codebook_size}"
                )
        elif args.command == "train":
            _train(args)
        else:
            _codes(args)
    except (TrainConfigError, VQKDConfigError, TeacherError, ImageInputError) as err:
        print(f"beit3-vqkd: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
