"""Tests of `longvq.experiments` (presets, model builders, `run_experiment`, the CLIs and the comparison table).

Training runs use tiny in-file tasks (one per kind: token classification, continuous-value classification, language
modelling, MQAR-style token labels) registered in `longvq.tasks.TASKS` by the `fake_registry` fixture, so each run
takes a second or two and does not depend on the data builders; `test_real_task_families` runs real tasks end to end.
"""

import json
import math
import types

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from longvq import LongVQConfig, experiments, tasks
from longvq.experiments import (
    BASELINES,
    Reference,
    TokenLabelShift,
    build_baseline,
    comparison_table,
    compute_token_accuracy,
    count_parameters,
    get_preset,
    run_experiment,
)
from longvq.tasks import TaskInfo

# ---------------------------------------------------------------------------------------------------------------------
# Tiny tasks, registered in longvq.tasks.TASKS for the tests that use them
# ---------------------------------------------------------------------------------------------------------------------


def _splits(make, seed, sizes=(96, 32, 32)):
    rng = np.random.default_rng(seed)
    names = ("train", "validation", "test")
    return DatasetDict({name: Dataset.from_dict(make(rng, n)) for name, n in zip(names, sizes)})


def build_tokens(seed=0, cache_dir=None, length=16):
    """Label 1 iff token 1 occurs in the sequence (ids 1-7, pad 0), variable lengths."""

    def make(rng, n):
        rows = [rng.integers(2, 8, size=int(rng.integers(length // 2, length + 1))) for _ in range(n)]
        labels = rng.integers(0, 2, size=n)
        for row, label in zip(rows, labels):
            if label:
                row[rng.integers(len(row))] = 1
        return {"input_ids": [r.tolist() for r in rows], "label": labels.tolist()}

    return _splits(make, seed)


def build_values(seed=0, cache_dir=None, length=16):
    """Continuous inputs: label 1 iff the mean value is above 0.5."""

    def make(rng, n):
        labels = rng.integers(0, 2, size=n)
        values = [(rng.random(length) * 0.6 + 0.4 * label).tolist() for label in labels]
        return {"values": values, "label": labels.tolist()}

    return _splits(make, seed)


def build_lm(seed=0, cache_dir=None, length=24):
    """Periodic sequences (period 3, random phase and symbols): the next token is predictable after 3 tokens."""

    def make(rng, n):
        rows = [np.tile(rng.integers(1, 8, size=3), length // 3) for _ in range(n)]
        return {"input_ids": [r.tolist() for r in rows], "labels": [r.tolist() for r in rows]}

    return _splits(make, seed)


def build_token_labels(seed=0, cache_dir=None, length=16):
    """MQAR-style: every odd position t is scored with label[t] = input_ids[t] (unshifted: the output at t must name
    the token at t); even positions are -100. Solvable only with the correct label alignment."""

    def make(rng, n):
        ids = rng.integers(1, 16, size=(n, length))
        labels = np.full_like(ids, -100)
        labels[:, 1::2] = ids[:, 1::2]
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    return _splits(make, seed)


FAKE_TASKS = {
    "fake_cls": TaskInfo("fake_cls", "lra", "classification", build_tokens, 8, None, 2, 16),
    "fake_values": TaskInfo("fake_values", "image", "classification", build_values, None, 1, 2, 16),
    "fake_lm": TaskInfo("fake_lm", "lm", "lm", build_lm, 8, None, None, 24),
    "fake_mqar": TaskInfo("fake_mqar", "recall", "token_labels", build_token_labels, 16, None, None, 16),
}


TINY_MODEL = {
    "hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 32, "shared_representation_size": 8,
    "ema_projection_size": 4, "codebook_size": 8, "chunk_size": 8,
}  # fmt: skip


def tiny_preset(max_steps=8, **train):
    return {
        "model": dict(TINY_MODEL),
        "data": {},
        "train": {"max_steps": max_steps, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 3e-3,
                  "warmup_steps": 2, "logging_steps": 2, "num_evaluations": 2, **train},
    }  # fmt: skip


@pytest.fixture
def fake_registry(monkeypatch):
    """The tiny tasks in the task registry (built and collated by `longvq.tasks`), each with tiny presets."""
    for name, info in FAKE_TASKS.items():
        monkeypatch.setitem(tasks.TASKS, name, info)
        monkeypatch.setitem(experiments.PRESETS, name, {"quick": tiny_preset(), "full": tiny_preset()})
    return tasks.TASKS


RESULT_FIELDS = (
    "task", "family", "kind", "arch", "preset", "seed", "params", "steps", "train_time_s", "wall_time_s",
    "tokens_per_s", "metric", "higher_is_better", "metrics", "codebook", "curve", "config",
)  # fmt: skip


def _check_run(results, output_dir, steps):
    on_disk = json.loads((output_dir / "results.json").read_text())
    assert set(RESULT_FIELDS) <= set(on_disk)
    assert on_disk["steps"] == results["steps"] == steps
    assert (output_dir / "curve.png").stat().st_size > 1000
    assert (output_dir / "model.safetensors").exists()
    losses = [loss for _, loss in results["curve"]["train_loss"]]
    assert losses and all(math.isfinite(x) for x in losses)
    assert results["params"] > 0 and results["tokens_per_s"] > 0 and results["train_time_s"] > 0
    if results["kind"] == "classification":
        assert 0.0 < results["chance"] <= 1.0
    test = results["metrics"]["test"][results["metric"]]
    if results["metric"] == "accuracy":
        assert 0.0 <= test <= 1.0
    else:
        assert 0.0 < test < 10.0
    assert results["curve"]["evaluations"], "the learning curve needs evaluations"
    return losses


# ---------------------------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["fake_cls", "fake_values", "fake_lm", "fake_mqar"])
def test_longvq_run_per_task_kind(fake_registry, tmp_path, task):
    results = run_experiment(task, "longvq", tiny_preset(max_steps=8), str(tmp_path), seed=0)
    losses = _check_run(results, tmp_path, steps=8)
    assert results["codebook"]["codebook_size"] == 8
    assert all(0.0 < u <= 1.0 for u in results["codebook"]["usage_per_layer"])
    assert results["config"]["bidirectional"] is (FAKE_TASKS[task].kind == "classification")
    if task == "fake_lm":  # a periodic sequence is learnt within a few steps
        assert losses[-1] < losses[0]


@pytest.mark.parametrize("arch", ["llama", "mega_chunk"])
@pytest.mark.parametrize("task", ["fake_values", "fake_mqar"])
def test_baselines(fake_registry, tmp_path, arch, task):
    results = run_experiment(task, arch, tiny_preset(max_steps=4), str(tmp_path), seed=0)
    _check_run(results, tmp_path, steps=4)
    longvq_params = count_parameters(experiments.build_model("longvq", FAKE_TASKS[task], tiny_preset()))
    if arch == "mega_chunk":
        assert results["config"]["codebook_memory"] is False and results["params"] == longvq_params
    else:
        assert results["codebook"] is None and results["config"]["model_type"] == "llama"
        assert abs(results["params"] - longvq_params) / longvq_params < 0.1


def test_llama_reads_values_through_a_linear_encoder(fake_registry):
    model = experiments.build_model("llama", FAKE_TASKS["fake_values"], tiny_preset())
    assert model.input_projection.in_features == 1
    out = model(inputs_embeds=torch.rand(2, 16, 1), attention_mask=torch.ones(2, 16, dtype=torch.long))
    assert out.logits.shape == (2, 2)


def test_llama_has_the_depth_of_the_longvq_model_it_is_compared_with():
    preset = tiny_preset()
    del preset["model"]["num_hidden_layers"]  # LongVQConfig's default depth
    llama = experiments.build_model("llama", FAKE_TASKS["fake_cls"], preset)
    longvq = experiments.build_model("longvq", FAKE_TASKS["fake_cls"], preset)
    assert llama.config.num_hidden_layers == longvq.config.num_hidden_layers == LongVQConfig().num_hidden_layers


def test_one_baseline_registry():
    reference = Reference(LongVQConfig(vocab_size=8, **TINY_MODEL), "causal_lm", max_length=16)
    assert set(BASELINES) == {"llama", "mega_chunk", "mamba"}
    mamba = build_baseline("mamba", reference)
    assert (mamba.config.hidden_size, mamba.config.num_hidden_layers, mamba.config.vocab_size) == (16, 1, 8)
    assert build_baseline("mega_chunk", reference).config.codebook_memory is False
    assert reference.config.codebook_memory is True  # the reference itself is left alone
    with pytest.raises(ValueError, match="Unknown baseline"):
        build_baseline("gpt", reference)
    with pytest.raises(ValueError, match="causal LM on token ids only"):
        build_baseline("mamba", Reference(reference.config, "sequence_classification", max_length=16))
    with pytest.raises(ValueError, match="Unknown head"):
        Reference(reference.config, "token_classification", max_length=16)


def test_mqar_labels_are_aligned(fake_registry, tmp_path):
    """With the right shift the output at t learns labels[t] (= the token at t): far above chance (1/15) quickly."""
    preset = tiny_preset(max_steps=60, learning_rate=1e-2)
    preset["model"].update(hidden_size=32, intermediate_size=64)
    results = run_experiment("fake_mqar", "longvq", preset, str(tmp_path), save_model=False, plot=False)
    assert results["metrics"]["test"]["accuracy"] > 0.5


def test_token_label_shift_oracle():
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[-100, 6, -100, 8]])
    batch = TokenLabelShift(lambda f: {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})([])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, -100, 8]]
    # The causal-LM loss pairs logits[t] with shifted labels[t + 1] = labels[t]: a perfect "output t = label t"
    # predictor is 100% accurate, one that is off by one position is not.
    perfect = np.array([[5, 6, 7, 8, 0]])
    late = np.array([[0, 5, 6, 7, 8]])
    pred = types.SimpleNamespace
    assert compute_token_accuracy(pred(predictions=perfect, label_ids=batch["labels"].numpy()))["accuracy"] == 1.0
    assert compute_token_accuracy(pred(predictions=late, label_ids=batch["labels"].numpy()))["accuracy"] == 0.0


def test_time_budget_stops_training(fake_registry, tmp_path):
    results = run_experiment("fake_cls", "longvq", tiny_preset(max_steps=100_000), str(tmp_path), time_budget_s=0.5,
                             save_model=False, plot=False)  # fmt: skip
    assert 0.5 <= results["train_time_s"] < 5 and 0 < results["steps"] < 100_000


# ---------------------------------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------------------------------


def test_train_and_eval_cli(fake_registry, tmp_path, capsys):
    out = tmp_path / "run"
    results = experiments.train_main([
        "--task", "fake_cls", "--output-dir", str(out), "--max-steps", "6", "--set", "learning_rate=2e-3",
        "--set", "model.codebook_size=4", "--no-progress",
    ])  # fmt: skip
    assert results["steps"] == 6 and results["config"]["codebook_size"] == 4
    assert results["preset_settings"]["train"]["learning_rate"] == 2e-3
    assert "fake_cls / LongVQ" in capsys.readouterr().out
    evaluation = experiments.evaluate_main([str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"]["accuracy"] == pytest.approx(results["metrics"]["test"]["accuracy"])
    assert evaluation["metrics"]["loss"] == pytest.approx(results["metrics"]["test"]["loss"], rel=1e-3)


def test_bad_arguments(fake_registry, tmp_path):
    with pytest.raises(ValueError, match="Unknown task"):
        run_experiment("nope", "longvq", "quick", str(tmp_path))
    with pytest.raises(ValueError, match="Unknown arch"):
        run_experiment("fake_cls", "gpt", "quick", str(tmp_path))
    with pytest.raises(ValueError, match="Unknown preset"):
        run_experiment("fake_cls", "longvq", "huge", str(tmp_path))
    with pytest.raises(ValueError, match="key=value"):
        experiments.parse_overrides(["hidden_size"])
    for argv in (["--task", "nope"], ["--task", "fake_cls", "--arch", "gpt"], ["--task", "fake_cls", "--preset", "x"]):
        with pytest.raises(SystemExit):
            experiments.train_main([*argv, "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        experiments.evaluate_main([str(tmp_path / "missing")])


def test_presets_and_overrides():
    assert {"quick", "full"} <= set(experiments.PRESETS["listops"])
    full = get_preset("listops", "full")
    assert (full["model"]["hidden_size"], full["model"]["num_hidden_layers"], full["train"]["learning_rate"]) == (
        80, 6, 1e-3,
    )  # fmt: skip
    quick = get_preset("listops", "quick", {"hidden_size": 48, "data.num_train": 10, "train.batch_size": 4})
    assert quick["model"]["hidden_size"] == 48
    assert quick["data"]["num_train"] == 10 and quick["train"]["batch_size"] == 4
    assert get_preset("listops", "quick")["model"]["hidden_size"] == 64  # overrides never leak into PRESETS
    with pytest.raises(ValueError, match="section"):
        get_preset("listops", "quick", {"optim.lr": 1})


# ---------------------------------------------------------------------------------------------------------------------
# Comparison table
# ---------------------------------------------------------------------------------------------------------------------


def _fake_result(task, arch, value, metric="accuracy", params=1000):
    return {"task": task, "arch": arch, "metric": metric, "higher_is_better": metric == "accuracy",
            "params": params, "steps": 10, "metrics": {"test": {metric: value}},
            "chance": 0.2 if metric == "accuracy" else None}  # fmt: skip


def test_comparison_table():
    results = [
        _fake_result("listops", "longvq", 0.40), _fake_result("listops", "llama", 0.30, params=1100),
        _fake_result("listops", "mega_chunk", 0.35), _fake_result("text_lm", "longvq", 2.5, "bpb"),
        _fake_result("text_lm", "llama", 2.4, "bpb"), _fake_result("pathfinder", "longvq", 0.5),
        _fake_result("pathfinder", "llama", 0.5),
    ]  # fmt: skip
    table = comparison_table(results, budget_s=30, notes={"speech": "skipped: not installed"})
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 4 and "30 s" in table
    assert "**" not in next(line for line in lines if line.startswith("| pathfinder"))  # a tie is nobody's win
    listops = next(line for line in lines if line.startswith("| listops"))
    assert "**40.0%**" in listops and "| 20.0% |" in listops and "30.0%" in listops and "1.0k / 1.1k / 1.0k" in listops and "63.14" in listops
    text_lm = next(line for line in lines if line.startswith("| text_lm"))
    assert "**2.400**" in text_lm and "| – |" in text_lm  # lower bpb wins; MEGA-chunk missing
    assert "skipped: not installed" in next(line for line in lines if line.startswith("| speech"))


# One short run per task family on the real `longvq.tasks` builders (tiny data, tiny model, no cache).
REAL_TINY_DATA = {
    "listops": {"num_train": 32, "num_validation": 16, "num_test": 16, "min_length": 20, "max_length": 60},
    "text_lm": {"source": "embedded", "block_size": 64},
    "mqar": {"num_train": 32, "num_validation": 16, "num_test": 16, "vocab_size": 32, "seq_len": 32,
             "num_kv_pairs": 4},
    "fashion_mnist_values": {"num_train": 32, "num_validation": 16, "num_test": 16},
    "speech": {"num_words": 2, "clips_per_word_train": 4, "clips_per_word_validation": 2,
               "clips_per_word_test": 2, "downsample": 16},
}  # fmt: skip


@pytest.mark.parametrize(
    ("task", "arch"),
    [("listops", "longvq"), ("text_lm", "longvq"), ("mqar", "longvq"), ("fashion_mnist_values", "longvq"),
     ("fashion_mnist_values", "llama"), ("speech", "longvq")],
)  # fmt: skip
def test_real_task_families(tmp_path, task, arch):
    from longvq.tasks import TaskSourceMissing

    preset = {"model": dict(TINY_MODEL), "data": REAL_TINY_DATA[task], "train": tiny_preset(max_steps=3)["train"]}
    try:
        results = run_experiment(task, arch, preset, str(tmp_path), cache_dir=False)
    except TaskSourceMissing as error:
        pytest.skip(f"data source not installed: {error}")
    _check_run(results, tmp_path, steps=3)
    info = experiments.task_info(task)
    assert results["family"] == info.family and results["kind"] == info.kind


def test_run_comparison(fake_registry, tmp_path):
    results, table = experiments.run_comparison(str(tmp_path), tasks=["fake_cls"], archs=["longvq", "llama"],
                                                time_budget_s=0.3)  # fmt: skip
    assert [r["arch"] for r in results] == ["longvq", "llama"]
    assert all(r["time_budget_s"] == 0.3 for r in results)
    assert (tmp_path / "comparison.md").read_text() == table and "| fake_cls |" in table
    assert (tmp_path / "comparison.png").exists() and (tmp_path / "fake_cls" / "llama" / "results.json").exists()
    assert len(json.loads((tmp_path / "comparison.json").read_text())) == 2
    (tmp_path / "comparison.md").unlink()
    assert experiments.compare_main(["--output-dir", str(tmp_path), "--rebuild-table"]) == table
