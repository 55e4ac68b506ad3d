"""``beit3-spm``: train a SentencePiece model and encode text with the XLM-R id convention.

Examples::

    beit3-spm train --input corpus.txt shards/text-000.tar --model-prefix out/spm64k --vocab-size 64000
    beit3-spm encode --model out/spm64k.model --max-len 64 "A dog on a skateboard."
    beit3-spm encode --model out/spm64k.model --input captions.txt --output captions.ids.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from beit3.tokenizers.text import TextTokenizer, TokenizerError, train_sentencepiece


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beit3-spm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a SentencePiece model (unk=0, bos=1, eos=2)")
    t.add_argument(
        "--input", nargs="+", required=True, help="text files, .jsonl files or webdataset .tar shards"
    )
    t.add_argument("--model-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    t.add_argument("--vocab-size", type=int, default=64000, help="pieces (BEiT-3: 64000 -> 64002 ids)")
    t.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    t.add_argument("--character-coverage", type=float, default=0.9995)
    t.add_argument(
        "--input-sentence-size", type=int, default=10_000_000, help="sentences sampled for training"
    )
    t.add_argument(
        "--hard-vocab-limit", action="store_true", help="fail instead of shrinking on tiny corpora"
    )
    t.add_argument("--text-key", default="text", help="field of .jsonl records / .json shard members")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("encode", help="print XLM-R-convention ids, one JSON list per line")
    e.add_argument("--model", required=True, help="the .model file")
    e.add_argument("text", nargs="*", help="texts to encode (or use --input)")
    e.add_argument("--input", help="text file, one segment per line")
    e.add_argument("--output", help="write JSON lines here instead of stdout")
    e.add_argument("--max-len", type=int, default=None, help="truncate to this many ids incl. <s> and </s>")
    e.add_argument("--no-special", action="store_true", help="omit <s> and </s> (index-file text_segment)")
    return p


def _encode_line(tok: TextTokenizer, text: str, max_len: int | None, special: bool) -> list[int]:
    ids = tok.encode(text)
    if special:
        body = ids if max_len is None else ids[: max_len - 2]
        return [tok.bos_id, *body, tok.eos_id]
    return ids if max_len is None else ids[:max_len]


def _encode(args: argparse.Namespace) -> None:
    tok = TextTokenizer(args.model)
    if args.max_len is not None and args.max_len < (1 if args.no_special else 3):
        raise TokenizerError(f"--max-len {args.max_len} leaves no room for a token")
    texts = list(args.text)
    if args.input:
        with open(args.input, encoding="utf-8") as f:
            texts.extend(line.rstrip("\n") for line in f)
    if not texts:
        raise TokenizerError("nothing to encode: pass texts or --input FILE")
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(args.output, "w", encoding="utf-8")) if args.output else sys.stdout
        for text in texts:
            out.write(json.dumps(_encode_line(tok, text, args.max_len, not args.no_special)) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``beit3-spm``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            path = train_sentencepiece(
                args.input,
                args.model_prefix,
                args.vocab_size,
                model_type=args.model_type,
                character_coverage=args.character_coverage,
                input_sentence_size=args.input_sentence_size,
                hard_vocab_limit=args.hard_vocab_limit,
                num_threads=args.threads,
                text_key=args.text_key,
                seed=args.seed,
            )
            tok = TextTokenizer(path)
            print(f"wrote {path}: {tok.num_pieces} pieces, {tok.vocab_size} ids (<mask> = {tok.mask_id})")
        else:
            _encode(args)
    except (TokenizerError, OSError) as err:
        print(f"beit3-spm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
