"""The paper layout's fused q/k/v projection and the mapping that keeps checkpoint keys unchanged.

The shared attention of the paper layout computes queries, keys and values with one (3D, D) GEMM
(:class:`FusedQKV`, parameter ``self_attn.qkv_proj``), but checkpoint files keep the released key grammar of
three projections (``self_attn.q_proj.weight``, ``k_proj``, ``v_proj``, biases too). ``SelfAttention``
registers :func:`qkv_state_dict_hook` and :func:`qkv_load_state_dict_pre_hook`, so ``state_dict()`` writes
and ``load_state_dict()`` reads those names; :func:`unfuse_qkv` maps a dict under the parameter's own name
(``named_parameters()``, hence DeepSpeed's ZeRO shards) to them.
"""

from __future__ import annotations

import torch
from torch import nn

QKV_NAME = "qkv_proj"
QKV_PARTS = ("q_proj", "k_proj", "v_proj")  # the fused weight's row blocks, top to bottom
# The order the three Linears were registered in (torchscale's), hence their state-dict order and init draws.
QKV_DISK_ORDER = ("k_proj", "v_proj", "q_proj")


class FusedQKV(nn.Linear):
    """Queries, keys and values of shared attention as one Linear D -> 3D, weight rows ``[q; k; v]``."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 3 * dim)
        self.dim = dim

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """An output (..., 3D) as q, k, v (..., D): views, no copies."""
        return y.split(self.dim, dim=-1)

    def block(self, part: str) -> torch.Tensor:
        """The (D, D) rows of ``weight`` that stand for projection ``part`` (``"v_proj"``, ...): a view."""
        i = QKV_PARTS.index(part)
        return self.weight[i * self.dim : (i + 1) * self.dim]


def split_qkv_rows(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A fused weight or bias (3D, ...) as its q, k, v row blocks (views). An empty tensor (a ZeRO-3
    parameter outside a gather holds an empty placeholder) stands for all three."""
    if t.numel() == 0:
        return (t, t, t)
    if t.dim() == 0 or t.shape[0] % 3:
        raise ValueError(f"a fused q/k/v tensor has 3 * D rows, got shape {tuple(t.shape)}")
    return t.chunk(3)


def unfuse_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with every fused ``<p>qkv_proj.{weight,bias}`` written as ``<p>{k,v,q}_proj.*`` (views)
    at its place, in the released modules' order. A fused key wins over split keys of the same ``<p>``
    (a consolidated ZeRO checkpoint may hold both: fp32 masters under the parameter's name beside the
    module's saved weights). Other keys pass unchanged, in order."""
    fused: dict[str, dict[str, torch.Tensor]] = {}  # module prefix -> {"weight": ..., "bias": ...}
    for key, value in state_dict.items():
        prefix, name, suffix = _split_key(key)
        if name == QKV_NAME:
            fused.setdefault(prefix, {})[suffix] = value
    if not fused:
        return state_dict
    out: dict[str, torch.Tensor] = {}
    written = set()
    for key, value in state_dict.items():
        prefix, name, suffix = _split_key(key)
        group = fused.get(prefix)
        if group is None or name not in (QKV_NAME, *QKV_PARTS) or (name != QKV_NAME and suffix not in group):
            out[key] = value
        elif prefix not in written:  # the module's first q/k/v key: all its parts go here
            rows = {s: dict(zip(QKV_PARTS, split_qkv_rows(t))) for s, t in fused[prefix].items()}
            for part in QKV_DISK_ORDER:
                for suffix, blocks in rows.items():
                    out[f"{prefix}{part}.{suffix}"] = blocks[part]
            written.add(prefix)
    return out


def _split_key(key: str) -> tuple[str, str, str]:
    """``"a.b.q_proj.weight"`` -> ``("a.b.", "q_proj", "weight")``."""
    stem, _, suffix = key.rpartition(".")
    prefix, _, name = stem.rpartition(".")
    return (prefix + "." if prefix else ""), name, suffix


def qkv_state_dict_hook(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, local_metadata: dict
) -> None:
    """``state_dict()`` hook of shared attention: the fused tensors under the three projections' keys, in
    their places (this module's entries are the last ones written)."""
    own = []
    for key in reversed(state_dict):
        if not key.startswith(prefix):
            break
        own.append(key)
    items = {key: state_dict.pop(key) for key in reversed(own)}
    state_dict.update(unfuse_qkv(items))


def qkv_load_state_dict_pre_hook(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``load_state_dict()`` hook of shared attention: the three projections' tensors (checkpoint keys) as
    the fused ones. A dict holding the fused key itself (DeepSpeed's parameter names) loads as it is; a
    projection the dict lacks is reported missing under its own key and keeps its rows."""
    for suffix in ("weight", "bias"):
        target = getattr(module.qkv_proj, suffix)
        if target is None:
            continue
        fused = f"{prefix}{QKV_NAME}.{suffix}"
        names = [f"{prefix}{part}.{suffix}" for part in QKV_PARTS]
        given = [state_dict.pop(name, None) for name in names]
        if fused in state_dict:
            continue
        rows = []
        for name, tensor, mine in zip(names, given, split_qkv_rows(target.detach())):
            if tensor is None:
                missing_keys.append(name)
            elif tensor.shape != mine.shape:
                error_msgs.append(
                    f"size mismatch for {name}: copying a param with shape {tuple(tensor.shape)} from "
                    f"checkpoint, the shape in current model is {tuple(mine.shape)}."
                )
            rows.append(tensor if tensor is not None and tensor.shape == mine.shape else mine)
        state_dict[fused] = torch.cat(rows)
