"""Byte tokenizer and byte-level BPE: exact byte round trips, padding, save/reload through AutoTokenizer (offline)."""

import random
from pathlib import Path

import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from longvq.tokenization import (
    BYTE_EOS_ID,
    BYTE_PAD_ID,
    byte_to_unicode,
    byte_tokenizer,
    decode_bytes,
    encode_bytes,
    train_bpe_tokenizer,
)

CORPUS = Path(__file__).resolve().parents[1] / "longvq" / "data" / "tiny_corpus.txt"
TEXTS = [
    "",
    "hello world",
    "  leading and trailing spaces  \n\ttabs\r\n",
    "Grüße, ça va? naïve café",
    "emoji 😀🦀👩‍👩‍👧 and flags 🇫🇷",
    "中文, 日本語, 한국어, العربية, עברית",
    "control \x00\x01\x7f bytes and NBSP\xa0 soft\xadhyphen",
    "special-token strings stay text: <pad> <eos> <|endoftext|> <s></s>",
    "".join(chr(i) for i in range(1, 0x800)),
    "\U0010ffff\ufeff\u200b",
]
INVALID = [
    b"\xff",
    b"\x80\x81\x82",
    b"abc\xc3(def",  # truncated 2-byte sequence
    b"\xed\xa0\x80",  # encoded surrogate
    b"\xf0\x9f\x98",  # emoji cut in the middle
    b"\xc0\xaf overlong slash",
    b"mixed \xf0\x9f\x98\x80 ok \xfe\xff then \xe2\x82\xac euro \x80",
    bytes(range(256)),
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(str(CORPUS), vocab_size=512)


def test_byte_table_is_the_byte_level_alphabet(tok):
    table = byte_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert tok.convert_ids_to_tokens(list(range(256))) == [table[i] for i in range(256)]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_ids_are_the_utf8_bytes_and_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert decode_bytes(tok, ids) == text.encode("utf-8")


@pytest.mark.parametrize("data", INVALID)
def test_arbitrary_bytes_round_trip_exactly(tok, bpe, data):
    assert encode_bytes(tok, data) == list(data)
    assert decode_bytes(tok, list(data)) == data
    ids = encode_bytes(bpe, data)
    assert decode_bytes(bpe, ids) == data
    # Text decoding is lossy for invalid UTF-8, as for every byte-level tokenizer.
    assert tok.decode(list(data)) == data.decode("utf-8", errors="replace")


def test_random_byte_strings_round_trip(tok, bpe):
    rng = random.Random(0)
    for _ in range(50):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        assert encode_bytes(tok, data) == list(data)
        assert decode_bytes(bpe, encode_bytes(bpe, data)) == data


def test_special_tokens_and_vocabulary_size():
    tok = byte_tokenizer()
    assert len(tok) == 258 and tok.pad_token == "<pad>" and tok.pad_token_id == BYTE_PAD_ID == 256
    # One end-of-text token, also the BOS token (lm-evaluation-harness needs an EOS id and a prefix id).
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.eos_token_id == tok.bos_token_id == BYTE_EOS_ID
    assert BYTE_EOS_ID == 257
    renamed = byte_tokenizer(eos_token="<eos>")
    assert len(renamed) == 258 and renamed.eos_token_id == renamed.bos_token_id == 257
    no_pad = byte_tokenizer(pad_token=None)
    assert len(no_pad) == 257 and no_pad.pad_token is None and no_pad.eos_token_id == no_pad.bos_token_id == 256
    bare = byte_tokenizer(pad_token=None, eos_token=None)
    assert len(bare) == 256 and bare.pad_token is None and bare.eos_token is None and bare.bos_token is None
    assert bare("<pad>")["input_ids"] == list(b"<pad>")
    with pytest.raises(ValueError):
        byte_tokenizer(pad_token="<x>", eos_token="<x>")


@pytest.mark.parametrize("text", ["", "hello", "<|endoftext|>x", "\U0001f600"])
def test_special_tokens_are_never_added_to_encodings(tok, text):
    expected = list(text.encode("utf-8"))
    assert tok(text, add_special_tokens=True)["input_ids"] == expected
    assert tok.encode(text) == expected
    padded = tok([text, "ab"], padding=True)["input_ids"][0]
    assert padded == [BYTE_PAD_ID] * (len(padded) - len(expected)) + expected


def test_end_of_text_separates_documents_and_decodes(tok):
    ids = [tok.bos_token_id, *tok("one")["input_ids"], tok.eos_token_id, *tok("two")["input_ids"]]
    assert tok.decode(ids, skip_special_tokens=True) == "onetwo"
    assert tok.decode(ids) == "<|endoftext|>one<|endoftext|>two"
    assert decode_bytes(tok, ids) == b"onetwo"


def test_batch_padding(tok):
    batch = tok(["a", "abc", "😀"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[256, 256, 256, 97], [256, 97, 98, 99], list(b"\xf0\x9f\x98\x80")]
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]]
    right = tok(["a", "abc"], padding=True, padding_side="right")["input_ids"]
    assert right == [[97, 256, 256], [97, 98, 99]]
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["a", "abc", "😀"]
    assert decode_bytes(tok, batch["input_ids"][0]) == b"a"
    assert tok.pad({"input_ids": [[1, 2], [3]]}, padding="max_length", max_length=3, return_tensors="pt")[
        "input_ids"
    ].equal(torch.tensor([[256, 1, 2], [256, 256, 3]]))


def test_byte_tokenizer_save_and_reload_with_auto_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == 258 and reloaded.pad_token_id == 256 and reloaded.padding_side == "left"
    assert reloaded.eos_token_id == reloaded.bos_token_id == 257
    for text in TEXTS:
        assert reloaded(text)["input_ids"] == list(text.encode("utf-8"))
        assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert reloaded(["x", "xyz"], padding=True)["input_ids"] == [[256, 256, 120], [120, 121, 122]]
    assert decode_bytes(reloaded, list(INVALID[-1])) == INVALID[-1]


def test_bpe_has_the_requested_vocabulary_and_round_trips(bpe):
    assert len(bpe) == 512
    assert bpe.pad_token == "<pad>" and bpe.pad_token_id == 0
    assert bpe.eos_token == "<eos>" and bpe.eos_token_id == 1
    vocab = bpe.get_vocab()
    assert set(byte_to_unicode().values()) <= set(vocab)  # every byte is encodable
    corpus = CORPUS.read_text(encoding="utf-8")
    ids = bpe(corpus)["input_ids"]
    assert len(ids) < 0.6 * len(corpus.encode("utf-8"))  # merges were learned and are used
    assert max(ids) < 512
    assert bpe.decode(ids) == corpus
    for text in TEXTS:
        assert bpe.decode(bpe(text)["input_ids"]) == text


def test_bpe_special_tokens_padding_and_reload(bpe, tmp_path):
    batch = bpe(["the model", "a"], padding=True)
    assert batch["input_ids"][1][0] == bpe.pad_token_id and batch["attention_mask"][1][0] == 0
    assert bpe.decode(batch["input_ids"][1], skip_special_tokens=True) == "a"
    ids = bpe("one")["input_ids"] + [bpe.eos_token_id] + bpe("two")["input_ids"]
    assert bpe.decode(ids, skip_special_tokens=True) == "onetwo"
    bpe.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == 512 and reloaded.pad_token_id == 0 and reloaded.eos_token_id == 1
    text = CORPUS.read_text(encoding="utf-8")[:2000]
    assert reloaded(text)["input_ids"] == bpe(text)["input_ids"]


def test_bpe_accepts_texts_and_paths_and_validates(tmp_path):
    texts = ["the cat sat on the mat. " * 20, "the dog sat on the log. " * 20]
    from_texts = train_bpe_tokenizer(texts, vocab_size=270, eos_token=None, extra_special_tokens=["<sep>"])
    assert len(from_texts) == 270
    assert from_texts.convert_tokens_to_ids(["<pad>", "<sep>"]) == [0, 1] and from_texts.eos_token is None
    path = tmp_path / "a.txt"
    path.write_text(texts[0], encoding="utf-8")
    mixed = train_bpe_tokenizer([path, texts[1]], vocab_size=270)
    assert mixed.decode(mixed("the cat and the dog")["input_ids"]) == "the cat and the dog"
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe_tokenizer(texts, vocab_size=257)
    with pytest.warns(UserWarning, match="fewer than vocab_size"):
        small = train_bpe_tokenizer(["abab"], vocab_size=1000)
    assert 258 <= len(small) < 1000
