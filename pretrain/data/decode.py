"""Decoding untrusted sample bytes: images to RGB PIL images, texts to clean strings, or a counted skip.

Used both when shards are written (validation) and when they are read (training never stops on bad input).
Every rejection raises :class:`SkipSample` with a *kind*; the loader counts kinds (``skipped/<kind>``).
"""

from __future__ import annotations

import io
import json
import warnings

from PIL import Image, ImageOps

from beit3.tokenizers.images import NonFiniteImageError, to_rgb

# The image extensions of both sides: `beit3-shards` reads input files with these extensions and the loader
# takes a sample's image from a member with any of them (first match in this order).
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "jfif")
TEXT_FIELDS = ("txt", "text", "caption")
SKIP_KINDS = (
    "image_empty",  # zero-byte image field
    "image_decode",  # not an image, truncated, or a mode that cannot become RGB
    "image_too_large",  # above max_image_pixels even at the smallest JPEG draft scale (or PIL's bomb guard)
    "image_nonfinite",  # a float image holding NaN or infinity
    "text_empty",  # empty or whitespace-only text
    "text_decode",  # text that is not UTF-8 (or a json caption that cannot be UTF-8)
    "text_no_tokens",  # text that the tokenizer turns into no piece at all (e.g. only zero-width characters)
    "json_decode",  # a json member needed for the caption that is not JSON (invalid, not UTF-8, too deep)
    "missing_field",  # a sample without the image or the text field its stream needs
    "duplicate_member",  # a member repeating a field of the sample before it under the same key
    "tar_member",  # a tar member that is no sample field: not a regular file (directory, link), no extension
    "tar_read",  # a shard that could not be read to its end (truncated or damaged tar): counted per event
    "sample_error",  # any other exception raised while one sample was decoded or transformed
)


class SkipSample(Exception):
    """A sample that cannot be used; ``kind`` is one of :data:`SKIP_KINDS`.

    Not a :class:`beit3.pretrain.errors.PretrainError`, on purpose: it is the verdict on one sample, which
    the loader, ``beit3-shards`` and the demo data catch, count under its kind and skip; it is never an
    error of the run. Kept outside the error family, one that escapes (a bug) ends with its traceback
    instead of being reported as a configuration mistake (exit 2) by a program that catches the bases.
    """

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def _draft_if_large(img: Image.Image, max_pixels: int) -> None:
    """Shrink a JPEG while decoding (DCT scaling by 1/2, 1/4 or 1/8) to stay within ``max_pixels``."""
    w, h = img.size
    if w * h <= max_pixels:
        return
    if img.format == "JPEG":
        for r in (2, 4, 8):
            if (w // r) * (h // r) <= max_pixels:
                img.draft(img.mode, (-(-w // r), -(-h // r)))
                break
    if img.size[0] * img.size[1] > max_pixels:
        raise SkipSample("image_too_large", f"{w}x{h} pixels")


def decode_image(data: bytes, max_pixels: int = 25_000_000) -> Image.Image:
    """Bytes of any PIL-readable image -> an RGB image, or :class:`SkipSample` saying why not."""
    if not data:
        raise SkipSample("image_empty")
    with warnings.catch_warnings():
        # Our own max_pixels bound applies; PIL's warning below its hard limit is noise here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            _draft_if_large(img, max_pixels)
            img.load()
            # Camera photos store their orientation in EXIF; captions describe the upright picture.
            ImageOps.exif_transpose(img, in_place=True)
        except Image.DecompressionBombError as e:
            raise SkipSample("image_too_large", str(e)) from None
        except SkipSample:
            raise
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad files
            raise SkipSample("image_decode", f"{type(e).__name__}: {e}") from None
    if min(img.size) < 1:
        raise SkipSample("image_decode", f"empty image {img.size}")
    try:
        return to_rgb(img)
    except NonFiniteImageError as e:
        # NaN/inf would scale the whole picture to one value (black): not an image worth training on.
        raise SkipSample("image_nonfinite", str(e)) from None
    except Exception as e:
        raise SkipSample("image_decode", f"mode {img.mode}: {e}") from None


def decode_text(data: bytes | None) -> str:
    """UTF-8 bytes -> stripped text, or :class:`SkipSample` (``text_decode`` / ``text_empty``)."""
    if data is None:
        raise SkipSample("missing_field", "no text field")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipSample("text_decode", str(e)) from None
    text = text.lstrip("\ufeff").strip()
    if not text:
        raise SkipSample("text_empty")
    return text


def image_field(fields: dict[str, bytes]) -> bytes:
    """The sample's image bytes under any usual extension, else ``missing_field``."""
    for name in IMAGE_FIELDS:
        if name in fields:
            return fields[name]
    raise SkipSample("missing_field", f"no image field among {sorted(fields)}")


def text_field(fields: dict[str, bytes]) -> bytes:
    """The sample's text: a ``txt``-like field, else the ``caption`` of a ``json`` field (img2dataset)."""
    for name in TEXT_FIELDS:
        if name in fields:
            return fields[name]
    if "json" in fields:
        try:
            meta = json.loads(fields["json"])
        except (ValueError, RecursionError) as e:  # invalid, not UTF-8, a huge int, or nested too deeply
            raise SkipSample("json_decode", f"{type(e).__name__}: {str(e)[:80]}") from None
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            try:
                return meta["caption"].encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate escaped in the JSON ("\ud800")
                raise SkipSample("text_decode", str(e)) from None
    raise SkipSample("missing_field", f"no text field among {sorted(fields)}")
