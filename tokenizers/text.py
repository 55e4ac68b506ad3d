"""SentencePiece text tokenizer with the XLM-R id convention used by BEiT-3, and a trainer for new models.

BEiT-3 reads its ``beit3.spm`` through Hugging Face's ``XLMRobertaTokenizer`` (reference beit3.md §5), which
lays fairseq's dictionary over SentencePiece ids:

==========  ==========================================  ===========================
id          meaning                                     SentencePiece id
==========  ==========================================  ===========================
0           ``<s>``: beginning of sequence, text CLS    the model's ``<s>`` (control)
1           ``<pad>``                                   (none)
2           ``</s>``: end of sequence, separator        the model's ``</s>`` (control)
3           ``<unk>``                                   the model's ``<unk>``
p + 1       every ordinary piece                        p (p >= 3)
len(spm)+1  ``<mask>``                                  (none)
==========  ==========================================  ===========================

So a 64,000-piece model gives 64,002 ids (mask 64,001) inside BEiT-3's 64,010-row text embedding. Any
SentencePiece model works as long as its ids 0-2 hold ``<unk>``/control pieces (SentencePiece's default
layout ``<unk>``=0, ``<s>``=1, ``</s>``=2, which :func:`train_sentencepiece` keeps).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from beit3.tokenizers.errors import TokenizersError
from beit3.tokenizers.ids import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from beit3.tokenizers.ids import FIRST_ORDINARY_ID as FIRST_ORDINARY_ID  # re-exported: the ids' old home

ID_OFFSET = 1  # fairseq's shift of ordinary SentencePiece ids


class TokenizerError(TokenizersError, ValueError):
    """A tokenizer model or argument that cannot work; the message names the fix."""


class TextTokenizer:
    """XLM-R-convention ids over a SentencePiece model; pickleable for DataLoader workers.

    ``num_threads`` is the number of threads :meth:`encode_batch` uses (SentencePiece's own pool).
    """

    bos_id = BOS_ID
    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, model_file: str | Path, num_threads: int = 1) -> None:
        # One thread by default: batches are encoded inside DataLoader workers, which already run in parallel.
        self.num_threads = num_threads
        path = Path(model_file)
        if not path.is_file():
            raise TokenizerError(
                f"SentencePiece model {str(path)!r} does not exist: train one with `beit3-spm train`"
            )
        self.model_file = str(path)
        self._load(path.read_bytes())

    def _load(self, proto: bytes) -> None:
        import sentencepiece as spm  # here, not at import: the token ids above need torch alone (bench/)

        self._proto = proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except RuntimeError as err:
            raise TokenizerError(f"{self.model_file!r} is not a SentencePiece model: {err}") from err
        n = self._sp.GetPieceSize()
        for i in range(min(3, n)):
            if not (self._sp.IsUnknown(i) or self._sp.IsControl(i) or self._sp.IsUnused(i)):
                raise TokenizerError(
                    f"{self.model_file!r}: SentencePiece id {i} is the ordinary piece "
                    f"{self._sp.IdToPiece(i)!r}, "
                    "which would collide with <pad>/</s>/<unk>; retrain with `beit3-spm train` "
                    "(unk=0, bos=1, eos=2)"
                )
        # spm id -> our id; specials first overridden by their XLM-R slots.
        table = np.arange(n, dtype=np.int64) + ID_OFFSET
        table[self._sp.unk_id()] = UNK_ID
        if self._sp.bos_id() >= 0:
            table[self._sp.bos_id()] = BOS_ID
        if self._sp.eos_id() >= 0:
            table[self._sp.eos_id()] = EOS_ID
        if self._sp.pad_id() >= 0:
            table[self._sp.pad_id()] = PAD_ID
        self._to_ids = table
        self.mask_id = n + ID_OFFSET
        self.special_ids = frozenset({BOS_ID, PAD_ID, EOS_ID, UNK_ID, self.mask_id})

    def __getstate__(self) -> dict:
        # The C++ processor is rebuilt from the model bytes, so workers never reopen the file.
        return {"model_file": self.model_file, "proto": self._proto, "num_threads": self.num_threads}

    def __setstate__(self, state: dict) -> None:
        self.model_file = state["model_file"]
        self.num_threads = state["num_threads"]
        self._load(state["proto"])

    @property
    def vocab_size(self) -> int:
        """Number of ids, ``<mask>`` included (64,002 for a 64,000-piece model)."""
        return self.mask_id + 1

    @property
    def num_pieces(self) -> int:
        """Pieces in the SentencePiece model."""
        return self._sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without ``<s>``/``</s>``."""
        return self._to_ids[np.asarray(self._sp.EncodeAsIds(text), dtype=np.int64)].tolist()

    def encode_batch(
        self,
        texts: Sequence[str],
        max_len: int,
        add_special: bool = True,
        pad_to: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode, truncate and right-pad a batch.

        Each row is ``[<s>] + ids[: max_len - 2] + [</s>]`` (or ``ids[:max_len]`` without specials), padded
        with ``<pad>`` to the longest row, or to ``pad_to`` when given. Returns ``ids`` (B, L) int64 and
        ``padding_mask`` (B, L) bool, True at padding.
        """
        if max_len < (3 if add_special else 1):
            raise TokenizerError(f"max_len={max_len} leaves no room for a token; use max_len >= 3")
        encoded = self._sp.Encode(list(texts), out_type=int, num_threads=self.num_threads)
        body = max_len - 2 if add_special else max_len
        lengths = np.array([min(len(e), body) for e in encoded], dtype=np.int64)
        flat = self._to_ids[np.fromiter((i for e in encoded for i in e[:body]), dtype=np.int64)]
        full = lengths + 2 if add_special else lengths
        length = int(full.max(initial=0))
        if pad_to is not None:
            if pad_to < length:
                raise TokenizerError(
                    f"pad_to={pad_to} is shorter than a row ({length}); use pad_to >= max_len"
                )
            length = pad_to
        out = np.full((len(encoded), length), PAD_ID, dtype=np.int64)
        columns = np.arange(length)
        offset = 1 if add_special else 0
        body_mask = (columns >= offset) & (columns < (lengths + offset)[:, None])
        out[body_mask] = flat  # row-major fill matches the row-by-row order of ``flat``
        if add_special:
            out[:, 0] = BOS_ID
            out[np.arange(len(encoded)), lengths + 1] = EOS_ID
        ids = torch.from_numpy(out)
        padding_mask = torch.from_numpy(columns >= full[:, None])
        return ids, padding_mask

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Text of ``ids``; specials are dropped (``skip_special``) or written as their piece strings."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        words: list[str] = []
        pieces: list[int] = []

        def flush() -> None:
            if pieces:
                words.append(self._sp.DecodeIds(pieces))
                pieces.clear()

        for i in ids:
            i = int(i)
            if i in self.special_ids:
                if i == UNK_ID:
                    pieces.append(self._sp.unk_id())  # decodes to SentencePiece's unk surface (" ⁇ ")
                elif not skip_special:
                    flush()
                    words.append(SPECIAL_PIECES.get(i, "<mask>"))
                continue
            if not 0 <= i - ID_OFFSET < self.num_pieces:
                raise TokenizerError(f"id {i} is outside this tokenizer's {self.vocab_size} ids")
            pieces.append(i - ID_OFFSET)
        flush()
        return "".join(words)

    def id_to_piece(self, i: int) -> str:
        """The piece string of one id (``<s>``, ``<mask>``, ``▁the``...)."""
        if i in SPECIAL_PIECES:
            return SPECIAL_PIECES[i]
        if i == self.mask_id:
            return "<mask>"
        return self._sp.IdToPiece(i - ID_OFFSET)


SPECIAL_PIECES = {BOS_ID: "<s>", PAD_ID: "<pad>", EOS_ID: "</s>", UNK_ID: "<unk>"}


# ---- training ---------------------------------------------------------------------------------------------


def iter_texts(inputs: Iterable[str | Path], text_key: str = "text") -> Iterator[str]:
    """Training segments: text-file lines, ``.jsonl`` fields, ``.txt`` members of ``.tar`` shards."""
    for item in inputs:
        path = Path(item)
        if not path.is_file():
            raise TokenizerError(f"training input {str(path)!r} does not exist")
        if path.name.endswith((".tar", ".tar.gz", ".tgz")):
            yield from _iter_tar(path, text_key)
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if text_key not in record:
                            raise TokenizerError(f"{path}:{n} has no {text_key!r} field; pass --text-key")
                        yield str(record[text_key])
        else:
            with path.open(encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")


def _iter_tar(path: Path, text_key: str) -> Iterator[str]:
    """Text members of a webdataset shard: ``<key>.txt`` / ``<key>.text``, or ``.json`` with ``text_key``."""
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            ext = member.name.rsplit("/", 1)[-1].split(".", 1)[-1] if "." in member.name else ""
            if ext not in ("txt", "text", "json"):
                continue
            data = tar.extractfile(member).read().decode("utf-8", errors="replace")
            if ext == "json":
                record = json.loads(data)
                if not isinstance(record, dict) or text_key not in record:
                    continue
                data = str(record[text_key])
            for line in io.StringIO(data):
                if line.strip():
                    yield line.rstrip("\n")


def train_sentencepiece(
    inputs: Iterable[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 10_000_000,
    hard_vocab_limit: bool = False,
    num_threads: int = 1,
    text_key: str = "text",
    seed: int = 0,
) -> Path:
    """Train a SentencePiece model (``<unk>``=0, ``<s>``=1, ``</s>``=2) and return the ``.model`` path.

    ``inputs`` are text files (one segment a line), ``.jsonl`` files (field ``text_key``) or webdataset
    ``.tar``/``.tar.gz`` shards (``.txt`` members). ``hard_vocab_limit=False`` lets a tiny corpus end
    below ``vocab_size`` instead of failing. ``input_sentence_size`` caps the sentences sampled (seeded).
    """
    import sentencepiece as spm

    if vocab_size < 8:
        raise TokenizerError(f"vocab_size={vocab_size} is too small; use at least 8")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    texts = iter_texts(list(inputs), text_key)
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=texts,
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            hard_vocab_limit=hard_vocab_limit,
            num_threads=num_threads,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise TokenizerError(f"SentencePiece training failed: {err}") from err
    return prefix.with_name(prefix.name + ".model")
