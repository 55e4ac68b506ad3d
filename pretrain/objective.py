"""Masked data modeling (paper §2.2): one objective over images, texts and image-text pairs.

The task module the engine trains. Each micro-batch holds three sub-batches (images, texts, pairs), encoded
together in one pass (``BEiT3Model.forward_mixed``: layer by layer, each expert once on all the tokens routed
to it, so that ZeRO-3 gathers each layer's parameters once per micro-batch); every optimizer step touches
every parameter on every rank (ZeRO-3 re-applies stale gradients to parameters unused in a step;
docs/engine.md). Losses:

* ``mim``: masked image modeling on images: predict the visual-tokenizer code of every masked patch.
* ``mlm``: masked language modeling on texts.
* ``vl_mlm`` / ``vl_mim``: the same on image-text pairs (text and/or image masked, per the data's pair
  masking mode), with the other modality visible.

Each loss is a mean over its masked tokens; the total is their weighted sum. Logits are computed only at
masked positions (the 64k-way MLM head would otherwise dominate the step), each head once on the masked
positions of all its terms. The visual tokenizer is frozen and
is deliberately not a submodule: it runs in :meth:`prepare_batch` under no_grad, outside the DeepSpeed module,
so its weights are never partitioned, optimized or saved with the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from beit3.engine.config_io import bounded
from beit3.model import BEiT3Model, build_param_groups
from beit3.model.flops import Pass, checkpoint_recompute_flops, training_flops

SUBBATCHES = ("image", "text", "pair")
# (selection, name of its gather indices ``<name>_index`` / ``<name>_valid``) of a sub-batch
POSITIONS = (("image_mask", "image_mask"), ("text_labels", "text_label"))
# The loss terms of each sub-batch kind, and what each predicts: masked patches ("image", the MIM head) or
# masked text tokens ("text", the MLM head).
KIND_TERMS = {"image": ("mim",), "text": ("mlm",), "pair": ("vl_mlm", "vl_mim")}
TERM_TARGETS = {"mim": "image", "mlm": "text", "vl_mlm": "text", "vl_mim": "image"}


@dataclass
class ObjectiveConfig:
    """Loss weights of the masked-data-modeling terms."""

    mim_weight: float = bounded(1.0, "[0, inf)")
    mlm_weight: float = bounded(1.0, "[0, inf)")
    vl_mlm_weight: float = bounded(1.0, "[0, inf)")
    vl_mim_weight: float = bounded(1.0, "[0, inf)")
    label_smoothing: float = bounded(0.0, "[0, 1)")

    def loss_weights(self) -> dict[str, float]:
        """``{term: weight}`` of every loss term (the fields named ``<term>_weight``)."""
        return {
            name[: -len("_weight")]: value for name, value in vars(self).items() if name.endswith("_weight")
        }


def _masked_ce(
    logits: torch.Tensor, target: torch.Tensor, count: torch.Tensor, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the selected positions' logits (M, V) (targets -100 are padding of the
    fixed-size gather and ignored), with the number of correct predictions and of positions.

    Empty selections give a zero sum; the head still ran (on no rows), so its parameters take part in every
    step.
    """
    loss_sum = F.cross_entropy(logits, target, reduction="sum", label_smoothing=smoothing)
    correct = (logits.argmax(-1) == target).sum()
    return loss_sum, correct, count


class MaskedDataModeling(nn.Module):
    """The pretraining task module (engine protocol: forward, prepare_batch, param_groups, batch_stats)."""

    def __init__(
        self,
        model: BEiT3Model,
        visual_tokenizer=None,
        cfg: ObjectiveConfig | None = None,
        weight_decay: float = 0.05,
        layer_gathering: bool = True,
    ) -> None:
        super().__init__()
        if model.mlm_head is None or model.mim_head is None:
            raise ValueError("pretraining needs a model built with pretraining_heads=True")
        self.model = model
        self.cfg = cfg or ObjectiveConfig()
        self.weight_decay = weight_decay
        # ZeRO-3 gathers each encoder layer as one unit (zero3_gather_units); False: per submodule
        self.layer_gathering = layer_gathering
        # Kept outside the module tree on purpose (see module docstring).
        self.__dict__["visual_tokenizer"] = visual_tokenizer

    # ---- engine protocol -------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_batch(self, batch: dict, device: torch.device) -> dict:
        """Move tensors to ``device`` and replace tokenizer views by visual-token codes; a text padding mask
        that pads nothing becomes None (the model then passes no attention mask)."""
        out = {}
        # Decided on the host before the copy (on the device the check would synchronise).
        pads_nothing = {
            key: not any(map(any, sub["text_padding_mask"].tolist()))
            for key, sub in batch.items()
            if key in SUBBATCHES
            and torch.is_tensor(sub.get("text_padding_mask"))
            and sub["text_padding_mask"].device.type == "cpu"
        }
        for key, sub in batch.items():
            if key not in SUBBATCHES:
                out[key] = sub
                continue
            sub = dict(sub)
            for select, name in POSITIONS:
                if torch.is_tensor(sub.get(select)):
                    sub[f"{name}_index"], sub[f"{name}_valid"] = masked_positions(sub[select], select)
            sub = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in sub.items()}
            if "image" in sub:
                sub["image"] = sub["image"].to(self._param_dtype())
            if pads_nothing.get(key):
                sub["text_padding_mask"] = None  # no attention mask: SDPA may take its flash kernel
            out[key] = sub
        self._add_codes(out, device)
        return out

    def _add_codes(self, batch: dict, device: torch.device) -> None:
        """Replace every sub-batch's tokenizer views by their visual-token codes, with one tokenizer call
        for the whole micro-batch (images and pairs together)."""
        keys = [key for key in SUBBATCHES if "tokenizer_image" in batch.get(key, {})]
        if not keys:
            return
        if self.visual_tokenizer is None:
            raise RuntimeError("batch has tokenizer views but no visual tokenizer was given")
        views = [batch[key].pop("tokenizer_image") for key in keys]
        codes = self.visual_tokenizer.codes(torch.cat(views) if len(views) > 1 else views[0]).to(device)
        for key, part in zip(keys, codes.split([len(v) for v in views])):
            batch[key]["image_codes"] = part

    def _param_dtype(self) -> torch.dtype:
        return self.model.beit3.vision_embed.proj.weight.dtype

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = self.masked_terms(batch)[1]
        weights = self.cfg.loss_weights()
        # Each loss a mean over its masked tokens (an empty selection: 0, not NaN); total in term order.
        terms = [(name, s, c, n, s / n.clamp(min=1)) for name, (s, c, n) in scores.items()]
        total = sum(weights[name] * loss for name, _, _, _, loss in terms)
        metrics: dict[str, torch.Tensor] = {}
        for name, _, correct, count, loss in terms:
            metrics[f"loss/{name}"] = loss.detach()
            metrics[f"acc/{name}"] = correct.float() / count.clamp(min=1)
        return total, metrics

    def masked_terms(
        self, batch: dict, scored: dict[str, tuple[str, ...]] | None = None, smoothing: float | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Encode the sub-batches in one pass and score their masked tokens: ``(hidden, scores)``, hidden
        ``{sub-batch: (B, Nv + Nt, D)}`` and ``scores`` ``{term: (loss sum, correct, count)}`` over its
        masked tokens, in the order mim, mlm, vl_mlm, vl_mim (of the sub-batches present).

        ``scored``: more sub-batches, by name, and the terms each is scored on, named ``<name>/<term>``
        (evaluation's pairs with another pair's image: ``{"pair_shuffled": ("vl_mlm",)}``).
        ``smoothing``: the label smoothing of the losses (None: the config's).
        """
        plan = [(key, term, term) for key in SUBBATCHES if key in batch for term in KIND_TERMS[key]]
        if not plan:
            raise ValueError(f"batch holds none of the sub-batches {SUBBATCHES}")
        plan += [(key, term, f"{key}/{term}") for key, terms in (scored or {}).items() for term in terms]
        keys = list(dict.fromkeys(key for key, _, _ in plan))
        hidden = self.model.forward_mixed({key: _model_inputs(batch[key]) for key in keys})
        # (term name, hidden rows at the masked positions, their targets, their count), in plan order
        selected = []
        for key, term, name in plan:
            h, b = hidden[key], batch[key]
            if TERM_TARGETS[term] == "image":
                selected.append((name, *self._image_rows(h, b)))
            else:  # text position t at (vision tokens) + t
                selected.append((name, *self._text_rows(h, b, offset=h.shape[1] - b["text"].shape[1])))
        smoothing = self.cfg.label_smoothing if smoothing is None else smoothing
        scores = {}
        for head, targets in ((self.model.mlm_head, "text"), (self.model.mim_head, "image")):
            terms = [t for t, (_, term, _) in zip(selected, plan) if TERM_TARGETS[term] == targets]
            if not terms:
                continue
            # One head call for all its terms (each parameter used once per micro-batch).
            rows = [t[1] for t in terms]
            logits = head(rows[0] if len(rows) == 1 else torch.cat(rows)).float()
            for (name, _, target, count), lg in zip(terms, logits.split([r.shape[0] for r in rows])):
                scores[name] = _masked_ce(lg, target, count, smoothing)
        return hidden, {name: scores[name] for _, _, name in plan}

    def _image_rows(self, hidden: torch.Tensor, b: dict, offset: int = 1):
        """Hidden rows, targets and count of the masked patches. The vision CLS (position 0) is never
        masked: patch p is at position ``offset + p`` of ``hidden``."""
        return _gathered(hidden, offset, *_positions(b, "image_mask", "image_mask"), b["image_codes"])

    def _text_rows(self, hidden: torch.Tensor, b: dict, offset: int = 0):
        """Hidden rows, targets and count of the labelled (masked) text positions, text position t at
        ``offset + t`` of ``hidden``."""
        return _gathered(hidden, offset, *_positions(b, "text_labels", "text_label"), b["text_labels"])

    def zero3_gather_units(self) -> list[nn.Module]:
        """Engine protocol (optional): each encoder layer is one ZeRO-3 gathering unit, one all-gather of
        all its parameters per layer and pass (the giant's step: 142 all-gather calls instead of 554 per
        submodule, bench/results/zero_comm_layer_units.md). Always when the layers are compiled (no ZeRO-3
        hook may run inside a compiled layer: each would break its graph); ``layer_gathering=False``
        otherwise leaves DeepSpeed to gather per submodule."""
        layered = self.layer_gathering or self.model.compiled
        return list(self.model.beit3.encoder.layers) if layered else []

    def param_groups(self) -> list[dict]:
        """AdamW groups: weight decay except on biases, norms, position tables, CLS and mask tokens."""
        return build_param_groups(
            self.named_parameters(),
            depth=self.model.cfg.depth,
            weight_decay=self.weight_decay,
            no_weight_decay={f"model.{n}" for n in self.model.no_weight_decay()},
        )

    def batch_stats(self, batch: dict) -> dict:
        """Samples, tokens and training FLOPs of a micro-batch (call on the CPU batch: no device sync).

        ``flops``: the model FLOPs with padded texts and the heads at the masked positions (the rows the
        fixed-size gathers add, :func:`gather_rows`, are not model FLOPs: under 0.3% of the giant's step);
        ``unpadded_flops``: each text at its real length, for an MFU beside the padded one;
        ``recompute_flops``: what activation checkpointing runs again in the backward, for the HFU."""
        cfg = self.model.cfg
        passes, unpadded = [], []  # unpadded: the same passes with each text at its real length
        masked_text = masked_patches = 0
        for key in SUBBATCHES:
            if key not in batch:
                continue
            b = batch[key]
            n = (b["image"] if "image" in b else b["text"]).shape[0]
            image, text_len = "image" in b, b["text"].shape[1] if "text" in b else 0
            passes.append(Pass(n, image=image, text_len=text_len))
            pad = b.get("text_padding_mask")
            if text_len and torch.is_tensor(pad) and bool(pad.any()):
                lengths = (~pad.bool()).sum(1).tolist()
                unpadded += [Pass(lengths.count(k), image=image, text_len=k) for k in sorted(set(lengths))]
            else:
                unpadded.append(passes[-1])
            if "image" in b:
                masked_patches += int(b["image_mask"].sum())
            if "text_labels" in b:
                masked_text += int(b["text_labels"].ne(-100).sum())
        return {
            "samples": sum(p.samples for p in passes),
            "tokens": sum(p.samples * p.seq_len(cfg) for p in passes),
            "flops": training_flops(cfg, passes, masked_text, masked_patches),
            "unpadded_flops": training_flops(cfg, unpadded, masked_text, masked_patches),
            "recompute_flops": self._recompute_flops(passes),
        }

    def _recompute_flops(self, passes: list[Pass]) -> float:
        """The forward FLOPs activation checkpointing recomputes for these passes (0 when it is off)."""
        b3 = self.model.beit3
        if not b3.checkpoint_layers:
            return 0.0
        drop_path = self.training and self.model.cfg.drop_path_rate > 0
        return checkpoint_recompute_flops(
            self.model.cfg, passes, b3.checkpoint_layers, b3.checkpoint_part, drop_path
        )


def masked_positions(select: torch.Tensor, name: str = "mask") -> tuple[torch.Tensor, torch.Tensor]:
    """Where a (B, L) selection is set, as fixed-size gather indices: ``(index, valid)``, both (B, K).

    Row i's selected positions come first in ``index[i]`` in increasing order, ``valid`` marks them, the
    rest of the row points at unselected positions (their targets are ignored). ``K`` is the largest row
    count rounded up to a multiple of 8 (at most L), so that a stream whose masks have exact counts (block
    masking) or bounded ones (BERT masking) gives a few fixed shapes, and the device gathers need no
    ``nonzero`` (a host synchronisation on a GPU). ``select``: a bool mask (True = selected) or labels with
    -100 where nothing is predicted. Meant for the host batch (prepare_batch): the one host read (K) is
    then of host data; with a device tensor it is a synchronisation.
    """
    if select.dim() != 2:
        raise ValueError(f"{name} must be (B, L), got shape {tuple(select.shape)}")
    sel = select if select.dtype == torch.bool else select.ne(-100)
    counts = sel.sum(dim=1)
    k = gather_width(counts.tolist(), sel.shape[1])
    index = torch.argsort((~sel).to(torch.uint8), dim=1, stable=True)[:, :k]
    valid = torch.arange(k, device=sel.device).unsqueeze(0) < counts.unsqueeze(1)
    return index, valid


def gather_width(counts: list[int], length: int) -> int:
    """K of :func:`masked_positions` for rows with ``counts`` selected positions out of ``length``: the
    largest count rounded up to a multiple of 8, at most ``length``."""
    return min(length, -(-max(counts, default=0) // 8) * 8)


def gather_rows(batch: dict) -> tuple[int, int]:
    """``(text rows, patch rows)`` the heads run on for a host micro-batch: each sub-batch's rows times its
    gather width, the masked positions plus the fixed-size gathers' padding."""
    rows = {"image_mask": 0, "text_labels": 0}
    for key in SUBBATCHES:
        b = batch.get(key, {})
        for select in rows:
            if torch.is_tensor(b.get(select)):
                rows[select] += masked_positions(b[select], select)[0].numel()
    return rows["text_labels"], rows["image_mask"]


def _positions(b: dict, select: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The sub-batch's gather indices of ``select``, as :meth:`MaskedDataModeling.prepare_batch` adds them
    (computed here when it did not: a host read of the mask, a synchronisation on a GPU)."""
    if f"{name}_index" in b:
        return b[f"{name}_index"], b[f"{name}_valid"]
    index, valid = masked_positions(b[select], select)
    device = b[select].device
    return index.to(device), valid.to(device)


def _gathered(
    hidden: torch.Tensor, offset: int, index: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``hidden[i, offset + index[i, j]]`` (B * K, D), their targets (-100 where not ``valid``) and the
    number of valid ones: fixed-size gathers, no host synchronisation."""
    b, t, d = hidden.shape
    rows = (index + offset) + torch.arange(b, device=index.device).unsqueeze(1) * t
    picked = hidden.reshape(b * t, d).index_select(0, rows.flatten())
    target = targets.gather(1, index).masked_fill(~valid, -100).flatten()
    return picked, target, valid.sum()


def _model_inputs(b: dict) -> dict:
    """The model's inputs of one sub-batch (its labels and codes stay out)."""
    return {k: b[k] for k in ("image", "image_mask", "text", "text_padding_mask") if k in b}
