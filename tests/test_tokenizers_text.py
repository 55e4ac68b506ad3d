"""The SentencePiece text tokenizer: XLM-R id convention, batching, round trips, training inputs, CLI."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import pytest
import sentencepiece as spm
import torch

from beit3.tokenizers import spm_cli
from beit3.tokenizers.text import TextTokenizer, TokenizerError, iter_texts, train_sentencepiece

VOCAB = 1000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real English text: the Python documentation topics shipped with CPython."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "pydoc.txt"
    path.write_text("\n".join(topics.values()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_file(corpus, tmp_path_factory):
    return train_sentencepiece([corpus], tmp_path_factory.mktemp("spm") / "pydoc", VOCAB)


@pytest.fixture(scope="module")
def tok(model_file):
    return TextTokenizer(model_file)


def test_special_ids_follow_xlmr(tok):
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.num_pieces == VOCAB
    assert tok.mask_id == VOCAB + 1 and tok.vocab_size == VOCAB + 2
    assert tok.special_ids == frozenset({0, 1, 2, 3, VOCAB + 1})


def test_ordinary_pieces_are_shifted_by_one(tok, model_file):
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    text = "The for statement is used to iterate over the elements of a sequence."
    raw = sp.encode(text)
    assert all(i >= 3 for i in raw)  # no unknowns in this sentence
    assert tok.encode(text) == [i + 1 for i in raw]


def test_sentencepiece_unk_maps_to_3(tok):
    # Characters never seen in the corpus encode to SentencePiece's unk (id 0) -> XLM-R unk 3.
    ids = tok.encode("零")
    assert 3 in ids and 0 not in ids


def test_encode_decode_round_trip(tok):
    text = "Exceptions are raised by the raise statement."
    ids = tok.encode(text)
    assert min(ids) > 3 and max(ids) < tok.mask_id
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor([0, *ids, 2, 1, 1])) == text


def test_decode_keeps_specials_when_asked(tok):
    ids = [0, *tok.encode("the loop"), 2, 1, tok.mask_id]
    assert tok.decode(ids, skip_special=False) == "<s>the loop</s><pad><mask>"


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(TokenizerError, match="outside"):
        tok.decode([tok.vocab_size + 5])


def test_encode_batch_adds_specials_truncates_and_pads(tok):
    texts = ["a", "The while statement is used for repeated execution as long as an expression is true."]
    ids, pad = tok.encode_batch(texts, max_len=10)
    assert ids.dtype == torch.long and pad.dtype == torch.bool and ids.shape == (2, 10)
    short = tok.encode("a")
    assert ids[0, : len(short) + 2].tolist() == [0, *short, 2]
    assert (ids[0, len(short) + 2 :] == 1).all() and pad[0].tolist() == [False] * (len(short) + 2) + [
        True
    ] * (8 - len(short))
    assert ids[1].tolist() == [0, *tok.encode(texts[1])[:8], 2] and not pad[1].any()


def test_encode_batch_length_is_longest_row_or_pad_to(tok):
    ids, pad = tok.encode_batch(["a", "a b"], max_len=64)
    assert ids.shape[1] == len(tok.encode("a b")) + 2
    ids, pad = tok.encode_batch(["a", "a b"], max_len=64, pad_to=64)
    assert ids.shape == (2, 64) and pad.sum(1).tolist() == [64 - len(tok.encode(t)) - 2 for t in ("a", "a b")]
    assert torch.equal(pad, ids == tok.pad_id)


def test_encode_batch_matches_the_row_definition_on_real_paragraphs(tok):
    from pydoc_data.topics import topics

    texts = ["", *[t[:400] for t in list(topics.values())[:60]]]
    ids, pad = tok.encode_batch(texts, max_len=48)
    for row, text in enumerate(texts):
        expected = [0, *tok.encode(text)[:46], 2]
        assert ids[row, : len(expected)].tolist() == expected
        assert (ids[row, len(expected) :] == 1).all() and pad[row].sum() == ids.shape[1] - len(expected)


def test_encode_batch_without_specials(tok):
    ids, pad = tok.encode_batch(["the loop"], max_len=2, add_special=False)
    assert ids[0].tolist() == tok.encode("the loop")[:2] and not pad.any()


def test_encode_batch_rejects_impossible_lengths(tok):
    with pytest.raises(TokenizerError, match="max_len"):
        tok.encode_batch(["x"], max_len=2)
    with pytest.raises(TokenizerError, match="pad_to"):
        tok.encode_batch(["the while loop"], max_len=16, pad_to=3)


def test_pickled_tokenizer_encodes_identically(tok, tmp_path):
    clone = pickle.loads(pickle.dumps(tok))
    text = "Pickled tokenizers live in DataLoader workers."
    assert clone.encode(text) == tok.encode(text) and clone.mask_id == tok.mask_id


def test_missing_model_file_names_the_fix(tmp_path):
    with pytest.raises(TokenizerError, match="beit3-spm train"):
        TextTokenizer(tmp_path / "none.model")


def test_model_with_ordinary_piece_at_low_id_is_rejected(corpus, tmp_path):
    # A model without <s>/</s> puts ordinary pieces at ids 1 and 2, which XLM-R reserves.
    prefix = tmp_path / "nobos"
    spm.SentencePieceTrainer.Train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=200, bos_id=-1, eos_id=-1, minloglevel=2
    )
    with pytest.raises(TokenizerError, match="collide"):
        TextTokenizer(f"{prefix}.model")


def test_training_reads_jsonl_and_webdataset_shards(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "alpha beta"}) + "\n" + json.dumps({"text": "gamma"})
    )
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for key, text in (("000", "delta epsilon"), ("001", "zeta")):
            data = text.encode()
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("000.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"xyz"))
    assert list(iter_texts([tmp_path / "a.jsonl", shard])) == ["alpha beta", "gamma", "delta epsilon", "zeta"]


def test_training_input_without_text_field_names_the_flag(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"caption": "x"}) + "\n")
    with pytest.raises(TokenizerError, match="--text-key"):
        list(iter_texts([tmp_path / "a.jsonl"]))


def test_cli_trains_and_encodes(corpus, tmp_path, capsys):
    prefix = tmp_path / "cli"
    assert (
        spm_cli.main(["train", "--input", str(corpus), "--model-prefix", str(prefix), "--vocab-size", "300"])
        == 0
    )
    assert "302 ids" in capsys.readouterr().out
    assert spm_cli.main(["encode", "--model", f"{prefix}.model", "--max-len", "5", "the for statement"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    tok = TextTokenizer(f"{prefix}.model")
    assert line == [0, *tok.encode("the for statement")[:3], 2]


def test_cli_encodes_a_file_to_index_segments(model_file, tok, tmp_path):
    (tmp_path / "captions.txt").write_text("A dog.\nThe while loop.\n", encoding="utf-8")
    out = tmp_path / "ids.jsonl"
    argv = ["encode", "--model", str(model_file), "--input", str(tmp_path / "captions.txt"), "--no-special"]
    assert spm_cli.main([*argv, "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [tok.encode("A dog."), tok.encode("The while loop.")]


def test_cli_reports_missing_model(tmp_path, capsys):
    assert spm_cli.main(["encode", "--model", str(tmp_path / "x.model"), "hi"]) == 2
    assert "beit3-spm train" in capsys.readouterr().err
