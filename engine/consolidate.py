"""Turn a training checkpoint (ZeRO stage 0-3) into one fp32 state dict of the task module, and verify it.

Upstream ``zero_to_fp32`` has had silent-corruption bugs (dropped tied or frozen parameters, all-zero
shards), so a consolidated state dict should be checked against a live module with ``verify_against_module``.
It also unpickles in full, so every file it reads passes ``safe_load.vet_files`` first; our own reads use
``safe_load.load_file``: a checkpoint of unknown origin cannot run code here.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from beit3.engine.checkpoint import CheckpointError, find_checkpoint
from beit3.engine.errors import EngineError
from beit3.engine.safe_load import load_file, vet_files


class ConsolidationError(EngineError, RuntimeError):
    """A consolidated state dict that does not match the module it should describe."""


def consolidate_checkpoint(
    run_dir_or_ckpt_dir: str | os.PathLike, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """The task module's fp32 state dict from a checkpoint of any ZeRO stage: the newest complete one of a
    run unless ``tag`` (``beit3.engine.checkpoint.find_checkpoint`` resolves the path).

    Stages 1-3 rebuild the fp32 master weights from the optimizer shards (DeepSpeed's zero_to_fp32, or
    the BF16_Optimizer's shards that ZeRO-1 with bf16 and fp32 accumulation writes); stage 0 has no
    shards and returns the module weights of ``mp_rank_00_model_states.pt`` as fp32.
    """
    tag_dir = find_checkpoint(run_dir_or_ckpt_dir, tag)
    root, tag = tag_dir.parent, tag_dir.name
    shards = sorted(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
    if shards and _is_bf16_optimizer_shard(shards[0]):
        state = _from_bf16_optimizer(shards)  # ZeRO-1 + bf16 + fp32 accumulation: not zero_to_fp32's format
    elif shards:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        vet_files(sorted(tag_dir.glob("*model_states.pt")) + shards)
        with contextlib.redirect_stdout(None):  # it prints per-tensor progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:
        path = tag_dir / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise CheckpointError(f"{tag_dir} holds neither ZeRO shards nor mp_rank_00_model_states.pt")
        state = load_file(path)["module"]
    return {k: v.detach().float().clone() if v.is_floating_point() else v.clone() for k, v in state.items()}


def consolidate_ema(
    run_dir_or_ckpt_dir: str | os.PathLike, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """The task module's fp32 state dict with the EMA of the weights (``train.ema_decay`` > 0,
    engine/ema.py) in place of the trained values, from the same checkpoints as :func:`consolidate_checkpoint`
    (same keys: frozen parameters and integer buffers, which the EMA does not average, keep their values).

    The EMA partitions of every rank (ZeRO-3) are put together in rank order. A checkpoint saved without
    an EMA is a CheckpointError.
    """
    from beit3.engine.checkpoint import read_marker
    from beit3.engine.ema import ema_state_dict

    tag_dir = find_checkpoint(run_dir_or_ckpt_dir, tag)
    if not read_marker(tag_dir).get("ema"):
        raise CheckpointError(
            f"{tag_dir} holds no EMA of the weights (trained with train.ema_decay = 0); export its weights "
            "with consolidate_checkpoint instead"
        )
    state = consolidate_checkpoint(tag_dir)
    averaged = ema_state_dict(tag_dir)
    unknown = sorted(set(averaged) - set(state))
    if unknown:
        raise ConsolidationError(f"{tag_dir}: EMA tensors {unknown[:10]} are not in the consolidated state")
    for name, value in averaged.items():
        if tuple(value.shape) != tuple(state[name].shape):
            raise ConsolidationError(
                f"{tag_dir}: EMA of {name} has shape {tuple(value.shape)}, the weights "
                f"{tuple(state[name].shape)}"
            )
        state[name] = value.float().clone()
    return state


def _rank_of(path: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


def _is_bf16_optimizer_shard(path: Path) -> bool:
    """BF16_Optimizer shards carry no ``zero_stage`` (ZeRO's own bf16 shards share the file name)."""
    optim = load_file(path, mmap=True)["optimizer_state_dict"]
    return "zero_stage" not in optim and "param_slice_mappings" in optim


def _from_bf16_optimizer(shards: list[Path]) -> dict[str, torch.Tensor]:
    """fp32 master weights from DeepSpeed's BF16_Optimizer shards, on top of the saved module state.

    Each rank's file holds, per parameter group, a flat fp32 partition and the (start, numel) of every
    parameter fragment in it; a parameter is its fragments in rank order. Buffers, frozen and tied
    parameters keep the module state's values.
    """
    model = load_file(shards[0].parent / "mp_rank_00_model_states.pt")
    state = {k: v.float() if v.is_floating_point() else v for k, v in model["module"].items()}
    fragments: dict[str, list[torch.Tensor]] = {}
    for path in shards:
        optim = load_file(path)["optimizer_state_dict"]
        for flat, mapping in zip(optim["single_partition_of_fp32_groups"], optim["param_slice_mappings"]):
            for name, address in mapping.items():
                fragments.setdefault(name, []).append(flat.narrow(0, address.start, address.numel))
    shapes = {name: shape for group in model["param_shapes"] for name, shape in group.items()}
    for name, parts in fragments.items():
        state[name] = torch.cat(parts).reshape(shapes[name]).float()
    for alias, source in model.get("shared_params", {}).items():
        state[alias] = state[source]
    return state


def _gathered(module: torch.nn.Module):
    """Context in which ZeRO-3 partitioned parameters hold their full values (a collective on all ranks)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def verify_against_module(
    state_dict: dict[str, torch.Tensor], module: torch.nn.Module, atol: float = 0.0
) -> None:
    """Raise ConsolidationError unless ``state_dict`` holds exactly the module's parameters and buffers.

    Values are compared in the module's dtype (fp32 masters of a bf16 module are rounded first), so a
    correct consolidation matches exactly; a ZeRO-3 module is gathered (call on every rank).
    """
    problems = []
    with _gathered(module):
        live = {name: t.detach() for name, t in module.named_parameters()}
        live.update({name: b.detach() for name, b in module.named_buffers() if name not in live})
        missing = sorted(set(live) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(live))
        if missing:
            problems.append(f"missing {missing}")
        if unexpected:
            problems.append(f"unexpected {unexpected}")
        for name in sorted(set(live) & set(state_dict)):
            ours, theirs = state_dict[name], live[name]
            if tuple(ours.shape) != tuple(theirs.shape):
                problems.append(f"{name}: shape {tuple(ours.shape)} != live {tuple(theirs.shape)}")
                continue
            ours = ours.to(device=theirs.device, dtype=theirs.dtype)
            if theirs.is_floating_point():
                diff = (ours.float() - theirs.float()).abs().max().item() if ours.numel() else 0.0
                if not diff <= atol:  # NaN fails too
                    problems.append(f"{name}: max |diff| {diff:.3g} > {atol}")
            elif not torch.equal(ours, theirs):
                problems.append(f"{name}: values differ")
    if problems:
        raise ConsolidationError(
            "consolidated checkpoint does not match the module: " + "; ".join(problems[:20])
        )
