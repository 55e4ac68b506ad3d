"""The project's FLOPs count (``beit3.model.flops``) against torch's own count over the real model.

``torch.utils.flop_counter.FlopCounterMode`` counts the matmuls, convolutions and attention products torch
runs (element-wise work is free in both counts). Attention runs on SDPA's math kernel so that it is counted
on CPU (torch has no formula for the CPU flash kernel). The two counts must be equal, not close: any
difference is a term one of them misses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from beit3.finetune.configurations import build_encoder
from beit3.finetune.tasks.captioning import Captioning, mask_captions
from beit3.finetune.tasks.classification import ImageClassification, PromptClassification, TextClassification
from beit3.finetune.tasks.retrieval import Retrieval
from beit3.finetune.tasks.vqa import NLVR2, VQA
from beit3.model import build_model
from beit3.model.flops import Pass, training_flops
from beit3.pretrain.objective import MaskedDataModeling, gather_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synthetic import synthetic_batch  # noqa: E402


def counted(step) -> int:
    """FLOPs torch counts for ``step()`` (forward and backward)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def forward_backward(task, batch):
    def step():
        loss, _ = task(batch)
        loss.backward()

    return step


@pytest.mark.parametrize("name", ["beit3_tiny_patch16_64", "beit3_tiny_paper_patch16_64"])
def test_pretraining_step_flops_equal_torchs_count(name):
    """The objective's mixed micro-batch (images, texts, pairs; heads at the masked positions). The heads run
    on the rows of the fixed-size gathers (masked positions plus padding to the gather width), which torch
    counts; batch_stats counts the masked positions only (model FLOPs): the same formula on both."""
    torch.manual_seed(0)
    task = MaskedDataModeling(build_model(name, drop_path_rate=0.0, vocab_size=100, visual_vocab_size=50))
    cfg = task.model.cfg
    batch = synthetic_batch(cfg, images=3, texts=2, pairs=4, text_len=12, pair_text_len=7)
    passes = [Pass(3, image=True), Pass(2, text_len=12), Pass(4, image=True, text_len=7)]
    masked_text = sum(int(batch[k]["text_labels"].ne(-100).sum()) for k in ("text", "pair"))
    masked_patches = sum(int(batch[k]["image_mask"].sum()) for k in ("image", "pair"))
    assert task.batch_stats(batch)["flops"] == training_flops(cfg, passes, masked_text, masked_patches)
    rows_text, rows_patches = gather_rows(batch)
    assert rows_text >= masked_text and rows_patches >= masked_patches
    assert rows_text + rows_patches > masked_text + masked_patches  # this batch's gathers pad
    assert counted(forward_backward(task, batch)) == training_flops(cfg, passes, rows_text, rows_patches)


IMAGE = torch.randn(3, 3, 64, 64)
TEXT = torch.randint(4, 40, (3, 9))
PAD = torch.zeros(3, 9, dtype=torch.bool)
PAD[0, -3:] = True


def _encoder(configuration: str, **kw):
    return build_encoder(
        "beit3_tiny_paper_patch16_64", configuration, vocab_size=64, drop_path_rate=0.0, **kw
    )


def _finetune_task(name: str):
    labels = torch.tensor([0, 1, 1])
    text = {"text": TEXT, "text_padding_mask": PAD}
    if name == "image_classification":
        return ImageClassification(_encoder("vision", normalize_output=False), 5), {
            "image": IMAGE,
            "label": labels,
        }
    if name == "text_classification":
        return TextClassification(_encoder("language", normalize_output=False), 5), {**text, "label": labels}
    if name == "prompt_classification":
        task = PromptClassification(Retrieval(_encoder("dual")), TEXT[:2], PAD[:2])
        return task, {"image": IMAGE, "label": labels}
    if name == "vqa":
        return VQA(_encoder("fusion", normalize_output=False), 7), {
            "image": IMAGE,
            **text,
            "scores": torch.rand(3, 7),
        }
    if name == "nlvr2":
        return NLVR2(_encoder("fusion")), {"image": IMAGE, "image2": IMAGE.flip(0), **text, "label": labels}
    if name == "retrieval":
        return Retrieval(_encoder("dual")), {"image": IMAGE, **text}
    captions = mask_captions(TEXT, PAD, 0.5, 63, torch.Generator().manual_seed(0))
    return Captioning(_encoder("seq2seq")), {"image": IMAGE, "text_padding_mask": PAD, **captions}


FINETUNE = (
    "image_classification",
    "text_classification",
    "prompt_classification",
    "vqa",
    "nlvr2",
    "retrieval",
    "captioning",
)


@pytest.mark.parametrize("task_name", FINETUNE)
def test_finetuning_step_flops_equal_torchs_count(task_name):
    """Every finetuning task: its backbone passes plus its heads, as torch runs them."""
    torch.manual_seed(0)
    task, batch = _finetune_task(task_name)
    expected = task.batch_stats(batch)["flops"]
    assert counted(forward_backward(task, task.prepare_batch(batch, "cpu"))) == expected


@pytest.mark.slow  # 7-25 s on 2 shared cores
def test_giant_recipe_step_is_35_57_tflop_per_gpu_by_both_counts():
    """The giant recipe's micro-batch per GPU (8 images, 8 texts of 128, 8 pairs with captions of 64),
    counted by torch over the real 40-layer model on the meta device.

    Boolean indexing (the heads at masked positions) has no meta implementation, so the heads run on
    meta inputs of the masked rows' shape; everything else is the objective's forward and backward.
    """
    model = build_model("beit3_giant_patch14_224", device="meta", drop_path_rate=0.0)
    cfg = model.cfg
    batch = synthetic_batch(cfg, images=8, texts=8, pairs=8, text_len=128, pair_text_len=64)
    expected = MaskedDataModeling(model).batch_stats(batch)["flops"]
    masked_text = sum(int(batch[k]["text_labels"].ne(-100).sum()) for k in ("text", "pair"))
    masked_patches = sum(int(batch[k]["image_mask"].sum()) for k in ("image", "pair"))
    passes = [Pass(8, image=True), Pass(8, text_len=128), Pass(8, image=True, text_len=64)]
    assert expected == training_flops(cfg, passes, masked_text, masked_patches)

    def step():
        inputs = ("image", "text", "text_padding_mask", "image_mask")
        hidden = [model(**{k: v.to("meta") for k, v in batch[key].items() if k in inputs}) for key in batch]
        sum(h.sum() for h in hidden).backward()
        for head, rows in ((model.mlm_head, masked_text), (model.mim_head, masked_patches)):
            head(torch.empty(rows, cfg.embed_dim, device="meta", requires_grad=True)).sum().backward()

    assert counted(step) == expected
    assert round(expected / 1e12, 2) == 35.57
