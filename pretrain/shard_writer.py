"""Writing a shard directory: the sample fields and the shards-then-manifest step.

Shared by ``beit3-shards`` (pretrain/shards.py) and the demo dataset (pretrain/demo_data.py), which import
this module and not each other's. A sample to write is a result ``("ok", fields)``; any other status is the
kind of skip it is counted under in the manifest.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterable

from PIL import Image

from beit3.pretrain.data.decode import SkipSample, decode_image, decode_text
from beit3.pretrain.data.tario import ShardWriter, write_manifest


def prepare_image(data: bytes, max_pixels: int, shorter_side: int = 0, quality: int = 95) -> bytes:
    """Validated JPEG bytes of an image (decoded, converted to RGB, optionally downscaled), or SkipSample."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt, mode, size = probe.format, probe.mode, probe.size
    except Exception:
        fmt = mode = size = None  # decode_image below names the problem
    img = decode_image(data, max_pixels)
    resize = shorter_side and min(img.size) > shorter_side
    # The size check catches large JPEGs that decode_image drafted to a smaller scale.
    if fmt == "JPEG" and mode in ("RGB", "L") and not resize and img.size == size:
        return data
    if resize:
        scale = shorter_side / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def image_result(
    data: bytes, caption: str | None, max_pixels: int, shorter_side: int = 0, quality: int = 95
) -> tuple[str, dict | None]:
    """``("ok", {"jpg": ...})`` with ``"txt"`` too when ``caption`` is not None, or ``(skip kind, None)``."""
    try:
        fields = {"jpg": prepare_image(data, max_pixels, shorter_side, quality)}
        if caption is not None:
            fields["txt"] = decode_text(caption.encode("utf-8")).encode("utf-8")
    except SkipSample as e:
        return e.kind, None
    return "ok", fields


def text_results(texts: Iterable[str]) -> Iterable[tuple[str, dict]]:
    """Each text as a result to write (``{"txt": utf-8 bytes}``)."""
    return (("ok", {"txt": text.encode("utf-8")}) for text in texts)


def split_segments(text: str, max_units: int, unit: str = "words") -> list[str]:
    """Cut a document into consecutive segments of at most ``max_units`` words (or characters).

    Words are whitespace-separated and re-joined with single spaces. In character mode a segment ends at the
    last whitespace before the limit when there is one, so words are only cut when longer than a segment.
    """
    if unit == "words":
        words = text.split()
        return [" ".join(words[i : i + max_units]) for i in range(0, len(words), max_units)]
    text = " ".join(text.split())
    out = []
    while text:
        if len(text) <= max_units:
            out.append(text)
            break
        cut = text.rfind(" ", 0, max_units + 1)
        cut = cut if cut > 0 else max_units
        out.append(text[:cut].strip())
        text = text[cut:].lstrip()
    return out


def write_shard_dir(
    out_dir: str,
    kind: str,
    results: Iterable[tuple[str, dict | None]],
    extra: dict,
    prefix: str = "",
    max_samples: int = 10000,
    max_bytes: int = 1 << 30,
    skipped: Counter | None = None,
) -> dict:
    """Write ``results`` in order into ``{prefix or kind}-NNNNNN.tar`` shards, then ``manifest.json``.

    Sample keys are the results' positions (``000000007``), skipped ones included, so a key names its input.
    Skips are added to ``skipped`` (counts from before, e.g. unusable index lines). Returns the manifest.
    """
    writer = ShardWriter(out_dir, prefix or kind, max_samples, max_bytes)
    skipped = Counter() if skipped is None else skipped
    try:
        for i, (status, fields) in enumerate(results):
            if status == "ok":
                writer.write(f"{i:09d}", fields)
            else:
                skipped[status] += 1
    finally:
        writer.close()
    path = write_manifest(out_dir, kind, writer.shards, dict(skipped), extra)
    with open(path) as f:
        return json.load(f)


def shard_dir_summary(manifest: dict) -> dict:
    """``{"samples": n, "shards": n}`` of a manifest."""
    return {"samples": manifest["samples"], "shards": len(manifest["shards"])}
