"""``beit3-vqkd``: list VQ-KD configs, compute codes of images; ``train`` is the engine's training program.

Examples::

    beit3-vqkd list
    beit3-vqkd codes --name vqkd_tiny_patch16_64 --checkpoint runs/vqkd_tiny/tokenizer.pth \\
        --data photos/ --output codes.pt
    beit3-vqkd train --config pretrain/recipes/vqkd/tiny.toml --ds-config ds_configs/vqkd_fp32.json \\
        --output-dir runs/vqkd_tiny        # beit3.pretrain.vqkd_train (tokenizers/ never imports the engine)
"""

from __future__ import annotations

import argparse
import sys
import tomllib

import torch

from beit3.tokenizers.images import ImageInputError, center_view, find_images, load_rgb, to_tensor
from beit3.tokenizers.teachers import TeacherError
from beit3.tokenizers.vqkd import VQKDConfigError, build_visual_tokenizer, get_vqkd_config, list_vqkd

TRAIN_MOVED = (
    "training runs on the engine: use `beit3-vqkd train --config pretrain/recipes/vqkd/tiny.toml "
    "--ds-config ds_configs/vqkd_fp32.json --output-dir DIR` or `python -m beit3.pretrain.vqkd_train ...`"
)


def _parse_overrides(items: list[str]) -> dict:
    """``["codebook_size=256"]`` -> ``{"codebook_size": 256}``; values are TOML literals, else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise VQKDConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set codebook_size=256")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beit3-vqkd", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered tokenizer configs")
    sub.add_parser("train", help="train a tokenizer (beit3-vqkd train --help)", add_help=False)

    c = sub.add_parser("codes", help="codes of images (centred square view) saved with torch.save")
    c.add_argument("--name", required=True)
    c.add_argument("--checkpoint", default=None, help="omit only for smoke tests (random tokenizer)")
    c.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a tokenizer config field, e.g. --set codebook_size=256 (repeatable)",
    )
    c.add_argument("--data", nargs="+", required=True)
    c.add_argument("--input-size", type=int, default=None, help="view size (default: the config's img_size)")
    c.add_argument("--output", required=True, help='writes {"paths": [...], "codes": LongTensor (N, h*w)}')
    c.add_argument("--batch-size", type=int, default=64)
    return p


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
    """``list`` and ``codes`` of ``beit3-vqkd``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        print(f"beit3-vqkd: error: {TRAIN_MOVED}", file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            for name in list_vqkd():
                cfg = get_vqkd_config(name)
                print(
                    f"{name}: {cfg.img_size} px, {cfg.grid_size}x{cfg.grid_size} codes from a codebook of "
                    f"{cfg.codebook_size}"
                )
        else:
            _codes(args)
    except (VQKDConfigError, TeacherError, ImageInputError) as err:
        print(f"beit3-vqkd: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
