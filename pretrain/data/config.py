"""The ``[data]`` section of a pretraining recipe, its validation, and shard-list expansion."""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from urllib.parse import urlparse
from urllib.request import url2pathname

from beit3.engine.config_io import bounded, section_problem
from beit3.pretrain.data.tario import REMOTE_SCHEMES, url_scheme
from beit3.pretrain.errors import PretrainError

STREAMS = ("image", "text", "pair")
PAIR_MASKING_MODES = ("separate", "joint")
SOURCE_KEYS = ("name", "shards", "weight")  # the keys of one entry of image_sources/text_sources/pair_sources
# A source name is part of a TensorBoard tag (data/source/<name>/samples): no spaces or slashes.
_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class DataConfigError(PretrainError, ValueError):
    """A data configuration that cannot work (missing shards, impossible sizes); the message names the fix."""


class DataStreamError(PretrainError, RuntimeError):
    """A stream that cannot produce samples at run time (every shard unreadable, every sample bad)."""


@dataclass(frozen=True)
class SourceSpec:
    """One named source of a stream (an entry of ``pair_sources`` etc.): its shard specs and its weight."""

    name: str
    shards: tuple[str, ...]
    weight: float


@dataclass
class PretrainDataConfig:
    """Where the shards are and how samples become a masked micro-batch (docs/data.md).

    Shard lists accept directories (every ``*.tar`` inside), globs and brace ranges
    (``/data/laion/{00000..04999}.tar``), and webdataset's URLs (``pipe:``, ``http(s)://``, ``s3://``,
    ``gs://``: docs/data.md, "Remote shards"). Defaults follow the paper (§2.3, Table 11) where it says
    something and BEiT v2 (crop scale 0.2-1) where it does not.
    """

    image_shards: list[str] = field(default_factory=list)
    text_shards: list[str] = field(default_factory=list)
    pair_shards: list[str] = field(default_factory=list)
    # Weighted sources instead of one shard list: [{name = "cc12m", shards = "...", weight = 12.0}, ...];
    # samples are drawn from the sources in proportion to the weights (docs/data.md, "Weighted sources").
    image_sources: list[dict] = field(default_factory=list)
    text_sources: list[dict] = field(default_factory=list)
    pair_sources: list[dict] = field(default_factory=list)
    img_size: int = bounded(224, "[1, inf)")
    patch_size: int = bounded(16, "[1, inf)")
    # The visual tokenizer's view of the same crop (e.g. 256 for a patch-14 model).
    tokenizer_img_size: int = bounded(224, "[1, inf)")
    # Model view: (x - mean) / std on values in [0, 1].
    mean: tuple[float, float, float] = bounded((0.5, 0.5, 0.5), "(-inf, inf)")
    std: tuple[float, float, float] = bounded((0.5, 0.5, 0.5), "(0, inf)")
    # Random-resized-crop area fraction (BEiT v2 pretraining).
    crop_scale: tuple[float, float] = bounded((0.2, 1.0), "(0, 1]")
    crop_ratio: tuple[float, float] = bounded((0.75, 1.3333333333333333), "(0, inf)")
    hflip: float = bounded(0.5, "[0, 1]")
    # Brightness, contrast and saturation factors drawn from [1 - cj, 1 + cj].
    color_jitter: float = bounded(0.4, "[0, 1)")
    # Tokens, including <s> and </s>; longer segments are truncated.
    text_max_len: int = bounded(128, "[3, inf)")
    pair_text_max_len: int = bounded(64, "[3, inf)")
    pad_text_to_max_len: bool = True  # fixed text shapes (False: pad each sub-batch to its longest row)
    text_mask_ratio: float = bounded(0.15, "[0, 1]")
    pair_text_mask_ratio: float = bounded(0.5, "[0, 1]")
    image_mask_ratio: float = bounded(0.4, "[0, 1]")
    pair_image_mask_ratio: float = bounded(0.4, "[0, 1]")
    pair_masking: str = "separate"  # "separate": each pair masks its image or its text; "joint": both
    # Separate mode: probability that a pair masks its image.
    pair_image_mask_prob: float = bounded(0.5, "[0, 1]")
    min_num_patches: int = bounded(16, "[1, inf)")  # smallest masking block (BEiT v2 default)
    # DataLoader worker processes per rank (0: produce batches in the training process).
    num_workers: int = bounded(2, "[0, inf)")
    # Samples held per stream per worker and drawn from at random.
    shuffle_buffer: int = bounded(256, "[0, inf)")
    # Shards read concurrently per stream per worker, samples interleaved at random.
    open_shards: int = bounded(4, "[1, inf)")
    # Larger images are decoded at reduced scale (JPEG) or skipped.
    max_image_pixels: int = bounded(25_000_000, "[1, inf)")
    # A stream skipping more bad samples in a row stops with an error.
    max_consecutive_skips: int = bounded(1000, "[0, inf)")
    # Remote shards: tries per read of a shard (the first included) before it is skipped for this round, and
    # the wait before the second try in seconds, doubled before each next one.
    remote_tries: int = bounded(3, "[1, inf)")
    remote_backoff: float = bounded(1.0, "[0, inf)")
    prefetch_factor: int = bounded(2, "[1, inf)")
    # Page-locked batches, so that prepare_batch's non-blocking copies to the GPU overlap the step; only on a
    # CUDA machine and with num_workers > 0 (ignored otherwise).
    pin_memory: bool = True
    return_keys: bool = False  # add each sub-batch's sample keys as "keys" (list of str), for debugging
    seed: int = bounded(0, "[0, inf)")

    @property
    def grid_size(self) -> int:
        """Patches per side of the model view."""
        return self.img_size // self.patch_size

    def shards_for(self, stream: str) -> list[str]:
        """The configured shard patterns of ``stream`` ("image", "text" or "pair")."""
        return {"image": self.image_shards, "text": self.text_shards, "pair": self.pair_shards}[stream]

    def sources_for(self, stream: str) -> list[SourceSpec]:
        """The named sources of ``stream`` (``<stream>_sources``), empty for a plain ``<stream>_shards`` list.
        Call :meth:`problem` first: entries are taken as valid here."""
        entries = {"image": self.image_sources, "text": self.text_sources, "pair": self.pair_sources}[stream]
        return [
            SourceSpec(
                e["name"],
                (e["shards"],) if isinstance(e["shards"], str) else tuple(e["shards"]),
                float(e["weight"]),
            )
            for e in entries
        ]

    def has_data(self, stream: str) -> bool:
        """Whether ``stream`` has shards configured, as one list or as weighted sources."""
        return bool(self.shards_for(stream) or self.sources_for(stream))

    def _sources_problem(self, where: str) -> str | None:
        """The first malformed ``<stream>_sources`` entry (keys, name, shards, weight; weights summing to
        0; a name used twice, also across streams; both forms for one stream), or None."""
        seen: dict[str, str] = {}
        for stream in STREAMS:
            key = f"{stream}_sources"
            entries = getattr(self, key)
            if not entries:
                continue
            if not isinstance(entries, (list, tuple)):
                return f"{where}.{key} must be a list of tables: [{{name = ..., shards = ..., weight = ...}}]"
            if self.shards_for(stream):
                return (
                    f"{where}.{stream}_shards and {where}.{key} are both set: use one, setting the other "
                    f'to [] (or list the plain shards as one more source: {{name = "more", shards = "...", '
                    "weight = 1.0})"
                )
            total = 0.0
            for i, entry in enumerate(entries):
                at = f"{where}.{key}[{i}]"
                if not isinstance(entry, dict):
                    return f'{at} must be a table such as {{name = "cc3m", shards = "...", weight = 1.0}}'
                unknown = sorted(set(entry) - set(SOURCE_KEYS))
                if unknown:
                    return f"{at}: unknown key(s) {unknown}; known keys: {list(SOURCE_KEYS)}"
                missing = [k for k in SOURCE_KEYS if k not in entry]
                if missing:
                    return f"{at} lacks {missing}: give name, shards and weight"
                name, shards, weight = entry["name"], entry["shards"], entry["weight"]
                if not isinstance(name, str) or not _SOURCE_NAME.fullmatch(name):
                    return (
                        f"{at}.name={name!r}: use letters, digits, '_', '.' or '-' (it names the TensorBoard "
                        "tag data/source/<name>/samples)"
                    )
                if name in seen:
                    return f"{at}.name={name!r} also names a source in {where}.{seen[name]}: rename one"
                seen[name] = key
                specs = [shards] if isinstance(shards, str) else shards
                if (
                    not isinstance(specs, (list, tuple))
                    or not specs
                    or not all(isinstance(v, str) and v.strip() for v in specs)
                ):
                    return (
                        f"{at}.shards={shards!r} ({name}): give a shard spec or a non-empty list of "
                        'them, e.g. "/data/cc3m/cc3m-{000000..000331}.tar"'
                    )
                if (
                    isinstance(weight, bool)
                    or not isinstance(weight, (int, float))
                    or not math.isfinite(weight)
                    or weight < 0
                ):
                    return f"{at}.weight={weight!r} ({name}): give a number >= 0, e.g. its sample count"
                total += weight
            if total <= 0:
                return f"{where}.{key}: the weights sum to 0, so nothing is drawn: give one a weight > 0"
        return None

    def problem(self, where: str = "data") -> str | None:
        """The first problem of these settings that needs no file (ranges, orderings, sizes that must fit
        each other), as one line naming ``where.field`` and the fix; None if none."""
        problem = section_problem(self, where)
        if problem is not None:
            return problem
        for name in ("crop_scale", "crop_ratio"):
            low, high = getattr(self, name)
            if low > high:
                return f"{where}.{name}={[low, high]} is reversed: give [min, max]"
        if self.img_size % self.patch_size:
            size, patch = self.img_size, self.patch_size
            return f"{where}.img_size={size} is not a multiple of {where}.patch_size={patch}: change one"
        num_patches = self.grid_size**2
        for name in ("image_mask_ratio", "pair_image_mask_ratio"):
            masked = round(getattr(self, name) * num_patches)
            if 0 < masked < self.min_num_patches:
                return (
                    f"{where}.{name}={getattr(self, name)} masks {masked} of {num_patches} patches, fewer "
                    f"than {where}.min_num_patches={self.min_num_patches}: lower min_num_patches or raise "
                    "the ratio"
                )
        if self.pair_masking not in PAIR_MASKING_MODES:
            return f"{where}.pair_masking={self.pair_masking!r}: use one of {PAIR_MASKING_MODES}"
        if len(self.mean) != 3 or len(self.std) != 3:
            return f"{where}.mean and {where}.std need three values each: e.g. mean = [0.5, 0.5, 0.5]"
        return self._sources_problem(where)

    def validate(self) -> None:
        """Raise :class:`DataConfigError` naming the fix for the first problem found, the shards included."""
        problem = self.problem()
        if problem is not None:
            raise DataConfigError(problem)
        if not any(self.has_data(s) for s in STREAMS):
            raise DataConfigError(
                "no shards configured: set image_shards, text_shards and/or pair_shards (or weighted "
                "image_sources/text_sources/pair_sources; write shards with `beit3-shards "
                "images|texts|pairs`, or `beit3-shards demo OUT_DIR`)"
            )
        for stream in STREAMS:
            if self.shards_for(stream):
                expand_shards(self.shards_for(stream), f"{stream}_shards")
            for i, source in enumerate(self.sources_for(stream)):
                expand_shards(list(source.shards), f"{stream}_sources[{i}] ({source.name})")


def _remote_problem(url: str, scheme: str) -> str | None:
    """Why a remote shard spec can never be read here (an unknown scheme, a missing client), or None."""
    if scheme not in REMOTE_SCHEMES:
        known = ", ".join(f"{k}:" if k == "pipe" else f"{k}://" for k in REMOTE_SCHEMES)
        return (
            f"{url!r}: unknown URL scheme {scheme!r}: use a local path or one of {known} "
            "(any other source through `pipe:COMMAND` writing the tar to stdout)"
        )
    client = REMOTE_SCHEMES[scheme]
    if client is not None and shutil.which(client) is None:
        return f"{url!r} is read with `{client}`, which is not on PATH: install it or use `pipe:COMMAND`"
    from webdataset import utils

    if utils.enforce_security:
        return f"{url!r}: WDS_SECURE is set, so webdataset's gopen opens no pipe: unset it to read this shard"
    return None


def expand_shards(patterns: list[str] | str, what: str = "shards") -> list[str]:
    """Resolve shard specs to a sorted, de-duplicated list of shards.

    Each spec is expanded as webdataset expands URLs (``a::b`` lists, ``${VAR}`` from ``WDS_VAR``, brace
    ranges and lists: ``shard-{000000..000099}.tar``, ``{cc3m,cc12m}``). A local name (a path or
    ``file://``) is a directory (every ``*.tar`` inside), a glob or a file, each of which must exist; a
    remote one (``pipe:``, ``http(s)://``, ``s3://``, ``gs://``) is kept as it is, checked only for its
    scheme and command-line client.
    """
    from webdataset.shardlists import expand_urls

    if isinstance(patterns, str):
        patterns = [patterns]
    found: list[str] = []
    for pattern in patterns:
        try:
            names = expand_urls(str(pattern))
        except (ValueError, AssertionError) as e:  # unbalanced braces; a ${VAR} without WDS_VAR
            raise DataConfigError(f"{what}: cannot expand {pattern!r}: {e}") from None
        for name in names:
            scheme = url_scheme(name)
            if scheme not in (None, "file"):
                problem = _remote_problem(name, scheme)
                if problem is not None:
                    raise DataConfigError(f"{what}: {problem}")
                found.append(name)
                continue
            name = os.path.expanduser(url2pathname(urlparse(name).path) if scheme == "file" else name)
            if os.path.isdir(name):
                tars = sorted(glob.glob(os.path.join(glob.escape(name), "*.tar")))
                if not tars:
                    raise DataConfigError(
                        f"{what}: directory {name} holds no *.tar shards: write some with `beit3-shards`"
                    )
                found.extend(os.path.abspath(t) for t in tars)
                continue
            matches = sorted(glob.glob(name)) if glob.has_magic(name) else [name]
            missing = [m for m in matches if not os.path.isfile(m)]
            if not matches or missing:
                raise DataConfigError(
                    f"{what}: no shard file matches {(missing or [name])[0]!r}: check the path "
                    "or write the shards with `beit3-shards`"
                )
            found.extend(os.path.abspath(m) for m in matches)
    return sorted(dict.fromkeys(found))


def parts_per_shard(num_shards: int, num_readers: int) -> int:
    """How many interleaved parts each shard is cut into so that readers get disjoint, balanced work.

    With at least as many shards as readers (and a multiple, or many more) each reader owns whole shards.
    With fewer, a shard is cut into P parts (sample ``j`` of a shard belongs to part ``j % P``), choosing P so
    that ``num_shards * P`` is a multiple of ``num_readers``: every reader then owns the same number of parts.
    """
    if num_shards % num_readers == 0 or num_shards >= 4 * num_readers:
        return 1
    return num_readers // math.gcd(num_shards, num_readers)
