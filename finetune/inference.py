"""Python inference helpers over finetuned task models: embed, retrieve, answer, caption.

Typical use, from a finished ``beit3-finetune`` run::

    from beit3.finetune.inference import load_finetuned_task, caption_images
    task, tokenizer, _ = load_finetuned_task("runs/caption/config.json")
    print(caption_images(task, tokenizer, ["photo.png"]))

Images may be file paths, PIL images or uint8 tensors (3, H, W); they are resized to the model's
resolution and normalised as in finetuning.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from beit3.engine.config_io import from_dict
from beit3.finetune.data.batches import images_to_float
from beit3.finetune.data.sources import load_image
from beit3.finetune.decoding import BeamSearchConfig, generate_captions
from beit3.finetune.recipe import FinetuneRecipe
from beit3.tokenizers.images import to_rgb
from beit3.tokenizers.text import BOS_ID, EOS_ID

ImageLike = str | Path | Image.Image | torch.Tensor


def preprocess_images(images: Sequence[ImageLike], size: int) -> torch.Tensor:
    """(B, 3, size, size) float in [-1, 1]."""
    out = []
    for img in images:
        if isinstance(img, (str, Path)):
            t = load_image(img, size)
        elif isinstance(img, Image.Image):
            rgb = to_rgb(img).resize((size, size), Image.BICUBIC)
            t = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
        else:
            t = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode="bicubic")[0]
            t = t.clamp(0, 255).round().to(torch.uint8)
        out.append(t)
    return images_to_float(torch.stack(out))


def _device_dtype(task: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(task.parameters())
    return p.device, p.dtype


def _images(task: torch.nn.Module, images: Sequence[ImageLike]) -> torch.Tensor:
    device, dtype = _device_dtype(task)
    return preprocess_images(images, task.cfg.img_size).to(device, dtype)


def _texts(
    task: torch.nn.Module, tokenizer, texts: Sequence[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    device, _ = _device_dtype(task)
    ids, pad = tokenizer.encode_batch(list(texts), max_len)
    return ids.to(device), pad.to(device)


@torch.no_grad()
def embed_images(task, images: Sequence[ImageLike]) -> torch.Tensor:
    """(B, D) unit-norm embeddings from a :class:`~beit3.finetune.tasks.retrieval.Retrieval` model."""
    return task.eval().embed_images(_images(task, images)).float()


@torch.no_grad()
def embed_texts(task, tokenizer, texts: Sequence[str], max_len: int = 64) -> torch.Tensor:
    """(B, D) unit-norm embeddings from a :class:`~beit3.finetune.tasks.retrieval.Retrieval` model."""
    return task.eval().embed_texts(*_texts(task, tokenizer, texts, max_len)).float()


def rank_texts(
    task, tokenizer, image: ImageLike, texts: Sequence[str], max_len: int = 64
) -> list[tuple[str, float]]:
    """``texts`` sorted by cosine similarity to ``image`` (best first), with the similarities."""
    sim = (embed_images(task, [image]) @ embed_texts(task, tokenizer, texts, max_len).t())[0]
    order = sim.argsort(descending=True).tolist()
    return [(texts[i], sim[i].item()) for i in order]


@torch.no_grad()
def answer_questions(
    task,
    tokenizer,
    images: Sequence[ImageLike],
    questions: Sequence[str],
    answers: Sequence[str],
    max_len: int = 64,
) -> list[str]:
    """The best answer (from the model's answer list ``answers``) to each (image, question) pair."""
    ids, pad = _texts(task, tokenizer, questions, max_len)
    logits = task.eval().logits(_images(task, images), ids, pad)
    return [answers[i] for i in logits.argmax(-1).tolist()]


def caption_images(
    task, tokenizer, images: Sequence[ImageLike], cfg: BeamSearchConfig | None = None
) -> list[str]:
    """Beam-search captions from a :class:`~beit3.finetune.tasks.captioning.Captioning` model."""
    x = _images(task, images)
    with torch.no_grad():
        ids = generate_captions(
            task,
            x,
            BOS_ID,
            EOS_ID,
            tokenizer.mask_id,
            cfg or BeamSearchConfig(),
            vocab_size=tokenizer.vocab_size,
        )
    return [tokenizer.decode(i) for i in ids]


def load_finetuned_task(run_config: str | Path, checkpoint: str | Path | None = None, trusted: bool = False):
    """(task module in eval mode, tokenizer or None, class names) from a run's ``config.json`` and
    ``model.pth`` (or ``checkpoint``; ``trusted=True`` only for a file whose origin one trusts, see
    :func:`beit3.finetune.reload.load_finetuned`).

    Class / answer names come from the run's ``classes.json``, beside ``config.json``; a run without one (from
    before it was written) reads them from the recipe's data source, which must then be installed. For
    retrieval and captioning only their count matters.
    """
    from beit3.finetune.reload import load_finetuned
    from beit3.finetune.train import build_run, run_classes

    run_config = Path(run_config)
    recipe = from_dict(FinetuneRecipe, json.loads(run_config.read_text())["recipe"])
    recipe.model.pretrained = ""  # the finetuned weights replace it
    classes = run_classes(run_config.parent, recipe.task.name)
    tokenizer, data, task = build_run(recipe, train=False, classes=classes)  # no train index with classes
    load_finetuned(task, checkpoint or run_config.parent / "model.pth", trusted)
    return task.eval(), tokenizer, data.classes
