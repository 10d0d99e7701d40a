"""Tokenizers for LongVQ checkpoints, built with the `tokenizers` library and returned as `PreTrainedTokenizerFast`.

Two tokenizers are provided:

* `byte_tokenizer()` -- ids 0..255 *are* the raw UTF-8 bytes of the text (`ids == list(text.encode("utf-8"))`), which
  is what byte-level models such as the `longvq-demo` model are trained on. Two special tokens follow the bytes:
  `<pad>` = id 256 (`BYTE_PAD_ID`) pads batches, and `<|endoftext|>` = id 257 (`BYTE_EOS_ID`) ends a text and is
  also the BOS token (as in GPT-2), which is what tools such as lm-evaluation-harness need (an end-of-text id to stop
  generation, a prefix id to score a text from its first byte). Neither is ever added to an encoding: the tokenizer
  only returns the text's bytes, and special tokens appear only where the caller puts them (e.g. between documents
  of a training corpus). A model used with it needs `vocab_size >= len(tokenizer)` (258 by default), like the
  `longvq-demo` model; a model with `vocab_size=256` can still use it for unpadded inputs, or be widened with
  `longvq.hub.fit_to_tokenizer` (which `longvq.hub.export_checkpoint` does). Special-token *strings* inside the text
  are never parsed (`split_special_tokens=True`): the text "<pad>" is five bytes, so every text maps to its bytes
  and nothing else.
* `train_bpe_tokenizer(files_or_texts, vocab_size)` -- a byte-level BPE trained on a local corpus. Its alphabet holds
  all 256 byte symbols, so it can encode any text; the special tokens (`<pad>`, `<eos>` by default) get the first ids
  (0, 1), then come the 256 byte symbols, then the merges.

Both use the byte-to-printable-character table of GPT-2's byte-level BPE (the one `tokenizers.pre_tokenizers.ByteLevel`
applies), so a token string is a sequence of bytes written with one printable character each. `decode()` turns ids
back into text (bytes that are not valid UTF-8 become U+FFFD, as for every byte-level tokenizer); the helpers
`encode_bytes` / `decode_bytes` work on `bytes` and round-trip *any* byte string exactly, valid UTF-8 or not.

Both save with `save_pretrained(dir)` (`tokenizer.json` + `tokenizer_config.json`) and reload offline with
`AutoTokenizer.from_pretrained(dir)`; neither needs custom code.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Iterator
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BYTE_EOS_ID",
    "BYTE_EOS_TOKEN",
    "BYTE_PAD_ID",
    "BYTE_PAD_TOKEN",
    "BYTE_VOCAB_SIZE",
    "byte_to_unicode",
    "byte_tokenizer",
    "decode_bytes",
    "encode_bytes",
    "train_bpe_tokenizer",
]

BYTE_VOCAB_SIZE = 256
BYTE_PAD_TOKEN = "<pad>"
BYTE_PAD_ID = BYTE_VOCAB_SIZE  # the first id after the 256 bytes
BYTE_EOS_TOKEN = "<|endoftext|>"
BYTE_EOS_ID = BYTE_VOCAB_SIZE + 1  # with the default <pad> before it

# Lone surrogates produced by bytes.decode("utf-8", "surrogateescape") for bytes that are not valid UTF-8.
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]+")


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE.

    Bytes that are already visible, non-space Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves;
    the remaining 68 bytes (controls, space, DEL, NBSP, soft hyphen, ...) are given the characters U+0100, U+0101, ...
    in increasing byte order. This is the table `tokenizers.pre_tokenizers.ByteLevel` uses.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in visible:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {char: byte for byte, char in byte_to_unicode().items()}


def _special_kwargs(pad_token, eos_token, bos_token=None) -> dict:
    tokens = (("pad_token", pad_token), ("eos_token", eos_token), ("bos_token", bos_token))
    return {name: value for name, value in tokens if value is not None}


def byte_tokenizer(
    pad_token: str | None = BYTE_PAD_TOKEN, eos_token: str | None = BYTE_EOS_TOKEN, padding_side: str = "left"
) -> PreTrainedTokenizerFast:
    """A tokenizer whose ids 0..255 are the raw bytes of the UTF-8 encoded text, followed by its special tokens.

    Args:
        pad_token: special token for padding batches, the first id after the bytes (256; `None`: no padding token).
        eos_token: end-of-text token, the next id (257 with the default pad token; `None`: none). It is also the BOS
            token, as in GPT-2: one token separates documents, ends generation and prefixes a text to be scored.
        padding_side: "left" (default, what batched generation with a causal LM needs) or "right".

    A model fed these ids needs `vocab_size >= len(tokenizer)` (258 by default). `byte_tokenizer(None, None)` has
    exactly the 256 byte ids.

    `tokenizer(text).input_ids == list(text.encode("utf-8"))` for every text: no BOS/EOS is added, even with
    `add_special_tokens=True`, and special-token strings in the text are not parsed. `tokenizer.decode(ids)` gives the
    text back (invalid UTF-8 -> U+FFFD); use `decode_bytes(tokenizer, ids)` for the exact bytes.
    """
    vocab = {char: byte for byte, char in byte_to_unicode().items()}
    # BPE without merges over the 256 byte symbols: every pre-token is split into single bytes, each its own id.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split (it would not change the result) and no prefix space: the text's bytes, nothing else.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    special = [token for token in (pad_token, eos_token) if token is not None]
    if len(set(special)) != len(special):
        raise ValueError("pad_token and eos_token must differ")
    backend.add_special_tokens(special)  # ids 256, 257, ... in this order
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
        padding_side=padding_side,
        **_special_kwargs(pad_token, eos_token, bos_token=eos_token),
    )
    for offset, token in enumerate(special):
        assert tokenizer.convert_tokens_to_ids(token) == BYTE_VOCAB_SIZE + offset, token
    return tokenizer


def _iter_corpus(files_or_texts, chunk_lines: int = 1000) -> Iterator[str]:
    """Texts from a path, a text, or an iterable mixing both (existing file paths are read, other strings are text)."""
    if isinstance(files_or_texts, (str, bytes, os.PathLike)):
        files_or_texts = [files_or_texts]
    for item in files_or_texts:
        if isinstance(item, bytes):
            item = item.decode("utf-8", errors="replace")
        if isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item and os.path.isfile(item)):
            with open(item, encoding="utf-8", errors="replace") as handle:
                lines = []
                for line in handle:
                    lines.append(line)
                    if len(lines) == chunk_lines:
                        yield "".join(lines)
                        lines = []
                if lines:
                    yield "".join(lines)
        elif isinstance(item, str):
            yield item
        else:
            raise TypeError(f"expected file paths or texts, got {type(item).__name__}")


def train_bpe_tokenizer(
    files_or_texts: str | os.PathLike | Iterable[str | os.PathLike],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    pad_token: str | None = "<pad>",
    eos_token: str | None = "<eos>",
    extra_special_tokens: Iterable[str] = (),
    max_token_length: int | None = None,
    padding_side: str = "left",
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on a local corpus.

    Args:
        files_or_texts: a file path, a text, or an iterable of paths and/or texts (strings naming an existing file are
            read as UTF-8; anything else is used as text).
        vocab_size: size of the final vocabulary, special tokens and the 256 byte symbols included. Use it as the
            model's `vocab_size`. If the corpus has too few repeated pairs the vocabulary can come out smaller (a
            warning says so; `len(tokenizer)` is the truth).
        min_frequency: minimum count of a pair to be merged.
        pad_token, eos_token, extra_special_tokens: special tokens, given ids 0, 1, 2, ... in this order.
        max_token_length: optional cap on the length (in byte symbols) of merged tokens.
        padding_side: "left" (default, for batched generation) or "right".

    The tokenizer adds no BOS/EOS by itself: append `tokenizer.eos_token_id` between documents when building training
    data. Text round-trips through `encode`/`decode`; arbitrary bytes through `encode_bytes`/`decode_bytes`.
    """
    special = [token for token in (pad_token, eos_token, *extra_special_tokens) if token is not None]
    if len(set(special)) != len(special):
        raise ValueError(f"special tokens must be distinct, got {special}")
    minimum = BYTE_VOCAB_SIZE + len(special)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 byte symbols + {len(special)} special tokens)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        initial_alphabet=sorted(byte_to_unicode().values()),
        max_token_length=max_token_length,
        show_progress=show_progress,
    )
    backend.train_from_iterator(_iter_corpus(files_or_texts), trainer=trainer)
    if backend.get_vocab_size() < vocab_size:
        warnings.warn(
            f"the corpus only supported {backend.get_vocab_size()} tokens, fewer than vocab_size={vocab_size}",
            stacklevel=2,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,
        padding_side=padding_side,
        **_special_kwargs(pad_token, eos_token),
    )


def encode_bytes(tokenizer: PreTrainedTokenizerFast, data: bytes) -> list[int]:
    """Ids for an arbitrary byte string, valid UTF-8 or not, with a byte-level tokenizer from this module.

    Valid UTF-8 stretches are tokenized as text; every byte that is not part of valid UTF-8 becomes its byte symbol.
    For `byte_tokenizer()` the result is simply `list(data)`. `decode_bytes(tokenizer, ids) == data` always holds.
    """
    table = byte_to_unicode()
    text = bytes(data).decode("utf-8", errors="surrogateescape")
    ids: list[int] = []
    position = 0
    for match in _ESCAPED_BYTES.finditer(text):
        if match.start() > position:
            ids += tokenizer(text[position : match.start()], add_special_tokens=False)["input_ids"]
        raw = match.group().encode("utf-8", errors="surrogateescape")
        ids += tokenizer.convert_tokens_to_ids([table[byte] for byte in raw])
        position = match.end()
    if position < len(text):
        ids += tokenizer(text[position:], add_special_tokens=False)["input_ids"]
    return ids


def decode_bytes(tokenizer: PreTrainedTokenizerFast, ids: Iterable[int], skip_special_tokens: bool = True) -> bytes:
    """The exact bytes behind `ids` (no U+FFFD replacement, unlike `decode`).

    Special tokens are dropped, or written as their UTF-8 text with `skip_special_tokens=False`.
    """
    ids = [int(i) for i in ids]
    added = tokenizer.added_tokens_decoder
    to_byte = _unicode_to_byte()
    out = bytearray()
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if token_id in added:
            if not (skip_special_tokens and added[token_id].special):
                out += added[token_id].content.encode("utf-8")
        elif token is None:
            raise ValueError(f"id {token_id} is not in the vocabulary")
        else:
            out += bytes(to_byte[char] for char in token)
    return bytes(out)
