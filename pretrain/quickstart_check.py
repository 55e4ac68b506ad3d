"""The last step of scripts/quickstart.sh: reload the exported checkpoint and summarise the run.

Loads ``RUN/export/model.pth`` strictly into a freshly built model of the run's architecture, runs it on an
image-text pair, and prints how the losses moved (read back from the run's TensorBoard event files).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from beit3.model import load_checkpoint
from beit3.pretrain.export import model_from_run

LOSS_PREFIX = "loss/"  # every loss term the objective logs (loss/total, loss/mim, ...)


def loss_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every loss tag's (step, value) pairs from the run's event files."""
    from beit3.engine.metrics import read_scalars

    curves = {tag: steps for tag, steps in read_scalars(run_dir).items() if tag.startswith(LOSS_PREFIX)}
    order = sorted(curves, key=lambda tag: (tag != "loss/total", tag))  # the total first
    return {tag: sorted(curves[tag].items()) for tag in order if curves[tag]}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    run = Path(args[0] if args else "runs/quickstart")
    model = model_from_run(run / "pretrain").eval()
    report = load_checkpoint(model, run / "export" / "model.pth", strict=True)
    cfg = model.cfg
    with torch.no_grad():
        image = torch.rand(1, 3, cfg.img_size, cfg.img_size) * 2 - 1
        text = torch.tensor([[0, 100, 200, 300, 2]])
        hidden = model(image=image, text=text)
    print(
        f"reloaded {run / 'export' / 'model.pth'} strictly ({report}); "
        f"image+text forward -> {tuple(hidden.shape)}"
    )
    for tag, points in loss_curves(run / "pretrain").items():
        n = max(1, len(points) // 4)
        first = sum(v for _, v in points[:n]) / n
        last = sum(v for _, v in points[-n:]) / n
        print(f"{tag:<12} mean of first {n} logs {first:7.3f} -> last {n} logs {last:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
