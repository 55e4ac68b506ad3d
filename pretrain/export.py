"""``beit3-export``: a DeepSpeed (ZeRO 0-3) checkpoint -> one released-format file, verified.

The output is ``{"model": state_dict, "config": model config}``: exactly the model's keys (``beit3.*``,
``mlm_head.*``, ``mim_head.*``; the paper layout adds shared ``self_attn.*`` and ``.C.`` vision-language
experts), loadable by ``beit3.model.load_checkpoint`` and by the released finetuning code (which reads
``"model"`` only), and the resolved model configuration the run directory's ``config.json`` records, so the
file describes its architecture (``beit3.model.checkpoint.read_config``). Upstream ZeRO consolidation has
shipped silent-corruption bugs, so every export is checked: the consolidated tensors load strictly into a
model freshly built from that configuration, every tensor survives the round trip bit for bit, and the
written file is read back and compared.

Checkpoint files are read without unpickling anything beyond the types DeepSpeed's files need
(beit3.engine.safe_load); ``--trust-checkpoint`` loads a file of trusted origin in full. Exit codes: 0
written, 2 a path or file that cannot be used (missing run or checkpoint, refused file), 1 a failed
verification.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from beit3.engine.checkpoint import CheckpointError as TrainingCheckpointError
from beit3.engine.launch import add_trust_arg
from beit3.model import WeightsFileError, load_checkpoint, read_state_dict, save_checkpoint
from beit3.model.beit3 import BEiT3Model
from beit3.model.checkpoint import checkpoint_key_names, read_config
from beit3.model.config import ModelConfig, ModelConfigError
from beit3.model.registry import get_config
from beit3.pretrain.errors import PretrainError

log = logging.getLogger("beit3.export")

TASK_PREFIX = "model."  # the task module holds the BEiT-3 model as its `model` attribute
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(PretrainError, RuntimeError):
    """A checkpoint that cannot be exported faithfully."""


def model_state_from_task(task_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the task module's prefix; anything else in the task's state is an error."""
    extra = sorted(k for k in task_state if not k.startswith(TASK_PREFIX))
    if extra:
        raise ExportError(f"unexpected task-level tensors {extra[:5]}: the exporter does not know them")
    return {k[len(TASK_PREFIX) :]: v for k, v in task_state.items()}


def model_config_from_run(run_dir: Path) -> ModelConfig:
    """The resolved model configuration ``run_dir/config.json`` records (its ``"model"``).

    A run directory of an earlier version recorded only the recipe: its [model] section (preset name,
    drop_path_rate, overrides) is resolved instead, as that version's training did.
    """
    path = run_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{path} is missing: is {run_dir} a beit3-pretrain run directory?")
    info = json.loads(path.read_text())
    recorded = info.get("model")  # the engine writes the run_info it was given at the top level
    if recorded is not None:
        try:
            return ModelConfig.from_dict(recorded)
        except ModelConfigError as e:
            raise ExportError(
                f'{path} records a "model" that is no BEiT-3 model configuration ({e}): is {run_dir} a '
                "beit3-pretrain run directory?"
            ) from e
    recipe = info.get("recipe")
    if recipe is None:
        raise ExportError(f"{path} records neither the model configuration nor a recipe")
    log.info("%s records no model configuration (an earlier version): resolving its recipe's [model]", path)
    m = recipe["model"]
    return get_config(m["name"], **{"drop_path_rate": m["drop_path_rate"], **m.get("overrides", {})})


def model_from_run(run_dir: Path) -> BEiT3Model:
    """A freshly built model of the architecture recorded in ``run_dir/config.json``."""
    return BEiT3Model(model_config_from_run(run_dir))


def verify_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load, then every tensor of the model must equal the consolidated one exactly."""
    load_checkpoint(model, {"model": state}, strict=True)
    for name, value in model.state_dict().items():
        if not torch.equal(value, state[name].to(value.dtype)):
            raise ExportError(f"tensor {name} changed in the round trip")


def export_run(
    run_dir: Path, output: Path, tag: str | None = None, dtype: str = "fp32", trusted: bool = False
) -> Path:
    """Consolidate the latest (or ``tag``) checkpoint of ``run_dir`` into ``output``, verified.

    ``trusted=True`` unpickles the checkpoint files in full (only for a run of trusted origin).
    """
    from beit3.engine.consolidate import consolidate_checkpoint
    from beit3.engine.safe_load import trusted_files

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}")
    if not Path(run_dir).exists():
        raise TrainingCheckpointError(f"{run_dir} does not exist: give a beit3-pretrain run directory")
    with trusted_files(trusted):
        # ZeRO shards name parameters as named_parameters() does (the paper layout's fused
        # self_attn.qkv_proj); the file keeps the released key grammar (q_proj, k_proj, v_proj)
        state = checkpoint_key_names(model_state_from_task(consolidate_checkpoint(run_dir, tag)))
    cfg = model_config_from_run(run_dir)
    verify_state(BEiT3Model(cfg), state)
    save_checkpoint(state, output, dtype=DTYPES[dtype], config=cfg)
    written = read_state_dict(output)
    if (
        written.keys() != state.keys()
        or any(not torch.equal(written[k], state[k].to(written[k].dtype)) for k in state)
        or read_config(output) != cfg.to_dict()
    ):
        raise ExportError(f"{output} does not read back as written")
    n = sum(v.numel() for v in state.values())
    log.info("exported %d tensors (%.1fM parameters, %s) to %s", len(state), n / 1e6, dtype, output)
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="beit3-export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a beit3-pretrain output directory")
    p.add_argument("--output", type=Path, required=True, help="file to write (.pth, or .safetensors)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    add_trust_arg(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export_run(args.run_dir, args.output, args.tag, args.dtype, args.trust_checkpoint)
    except (TrainingCheckpointError, WeightsFileError, FileNotFoundError) as e:
        return _error(e, 2)
    except ExportError as e:
        return _error(e, 1)
    print(f"wrote {args.output}")
    return 0


def _error(error: Exception, code: int) -> int:
    print("beit3-export: error: " + " ".join(str(error).split()), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
