"""``beit3-model-info NAME``: the parameter table of a registered model, built on the meta device."""

from __future__ import annotations

import argparse
import sys

from beit3.model.config import ModelConfigError
from beit3.model.params import count_parameters
from beit3.model.registry import build_model, get_config, list_models


def format_table(name: str) -> str:
    """A text table of the model's config and parameter groups.

    ``matrices (M)`` counts weight matrices only (no biases or norms), the convention of the paper's tables.
    """
    cfg = get_config(name)
    model = build_model(name, device="meta")
    counts = count_parameters(model)
    matrices = count_parameters(model, matrices_only=True)
    rows = [
        f"{name}: layout={cfg.layout} layers={cfg.depth} hidden={cfg.embed_dim} ffn={cfg.ffn_dim} "
        f"heads={cfg.num_heads} patch={cfg.patch_size} img={cfg.img_size} "
        f"vl_expert_layers={cfg.vl_expert_layers}",
        f"{'group':<20}{'parameters':>16}{'millions':>12}{'matrices (M)':>16}",
    ]
    for key, value in counts.items():
        rows.append(f"{key:<20}{value:>16,}{value / 1e6:>12.1f}{matrices[key] / 1e6:>16.1f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beit3-model-info", description=__doc__)
    parser.add_argument("name", nargs="?", help="registered model name (omit to list them)")
    args = parser.parse_args(argv)
    if args.name is None:
        print("\n".join(list_models()))
        return 0
    try:
        print(format_table(args.name))
    except ModelConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
