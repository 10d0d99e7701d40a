"""The `evaluate` metric modules of `longvq.metrics`: values on hand-computed cases (ignored -100 labels, empty
input), bad input, combination with `evaluate.combine`, their use by the Trainer metric functions and the codebook
health callback, and offline loading from an installed (non-editable) wheel."""

import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from helpers import tiny_config

from longvq import LongVQForCausalLM, metrics
from longvq.experiments import codebook_usage, compute_token_accuracy
from longvq.training import CodebookHealthCallback, compute_classification_metrics, compute_lm_metrics

REPO = Path(__file__).resolve().parents[1]


def load(name, config_name=None):
    return metrics.load(name, config_name, keep_in_memory=True)


# ---------------------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------------------


def test_accuracy_counts_scored_predictions_only():
    accuracy = load("accuracy")
    assert accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 1]) == {"accuracy": 0.5}
    assert accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, -100]) == {"accuracy": 2 / 3}
    # Another ignore_index: references equal to 0 are not scored.
    assert accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 1], ignore_index=0) == {"accuracy": 0.5}


def test_token_accuracy_pools_ragged_rows():
    accuracy = load("accuracy", "tokens")
    # Scored: 5=5, 7=7, 8!=0, 9=9 (the -100 position is skipped although its prediction is wrong) -> 3/4.
    result = accuracy.compute(predictions=[[5, 6], [7, 8, 9]], references=[[5, -100], [7, 0, 9]])
    assert result == {"accuracy": 0.75}


def test_perplexity_and_bits_per_byte_of_the_mean_scored_negative_log_likelihood():
    # Scored: 0.5, 1.5, 1.0 -> mean 1.0 nat; the ignored 7.0 would move it.
    nll = [[0.5, 1.5], [1.0, 7.0]]
    labels = [[10, 11], [12, -100]]
    assert load("perplexity").compute(predictions=nll, references=labels) == {
        "perplexity": pytest.approx(math.e, rel=1e-15), "cross_entropy": pytest.approx(1.0, rel=1e-15)
    }  # fmt: skip
    assert load("bits_per_byte").compute(predictions=nll, references=labels) == {
        "bits_per_byte": pytest.approx(1 / math.log(2), rel=1e-15)
    }
    # ln 2 nats per byte is one bit per byte, 2 ln 2 is a perplexity of 4.
    two_bits = [[2 * math.log(2)] * 3]
    assert load("bits_per_byte").compute(predictions=two_bits, references=[[1, 2, 3]])["bits_per_byte"] == 2.0
    assert load("perplexity").compute(predictions=two_bits, references=[[1, 2, 3]])["perplexity"] == pytest.approx(4)


def test_perplexity_matches_torch_cross_entropy_with_ignored_labels():
    logits = torch.randn(4, 9, 256, dtype=torch.float64)
    labels = torch.randint(0, 256, (4, 9))
    labels[1, 3:] = -100
    labels[3, :5] = -100
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100).item()
    result = load("perplexity").compute(predictions=nll.numpy(), references=labels.numpy())
    assert result["cross_entropy"] == pytest.approx(expected, rel=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-12)


def test_codebook_usage_and_perplexity_per_codebook_and_their_means():
    counts = [[3, 0, 1, 0], [2, 2, 2, 2], [3, 1]]
    usage = load("codebook_usage").compute(code_counts=counts)
    assert usage == {"codebook_usage": pytest.approx(2.5 / 3), "codebook_usage_per_codebook": [0.5, 1.0, 1.0]}
    perplexity = load("codebook_perplexity").compute(code_counts=counts)
    # (3, 1, 0, 0) and (3, 1): frequencies 3/4 and 1/4, exp(entropy) = (3/4)^(-3/4) (1/4)^(-1/4) = 4 / 3^(3/4).
    uneven = 4 / 3**0.75
    assert perplexity["codebook_perplexity_per_codebook"] == pytest.approx([uneven, 4.0, uneven], rel=1e-12)
    assert perplexity["codebook_perplexity"] == pytest.approx((2 * uneven + 4) / 3, rel=1e-12)
    collapsed = load("codebook_perplexity").compute(code_counts=[[0, 0, 9, 0]])
    assert collapsed["codebook_perplexity"] == 1.0


def test_perplexity_overflow_is_infinite_not_an_error():
    result = load("perplexity").compute(predictions=[[800.0, 800.0]], references=[[1, 2]])
    assert result == {"perplexity": math.inf, "cross_entropy": 800.0}


# ---------------------------------------------------------------------------------------------------------------------
# Empty and bad input
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, config, predictions, references",
    [
        ("accuracy", None, [], []),
        ("accuracy", None, [1, 2], [-100, -100]),
        ("accuracy", "tokens", [], []),
        ("accuracy", "tokens", [[], [3]], [[], [-100]]),
        ("perplexity", None, [], []),
        ("perplexity", None, [[0.5, 2.0]], [[-100, -100]]),
        ("bits_per_byte", None, [], []),
        ("bits_per_byte", None, [[]], [[]]),
    ],
)
def test_nothing_scored_gives_nan(name, config, predictions, references):
    result = load(name, config).compute(predictions=predictions, references=references)
    assert result and all(math.isnan(value) for value in result.values()), result


def test_codebook_metrics_of_no_codebook_or_no_token():
    assert load("codebook_usage").compute(code_counts=[]) == {
        "codebook_usage": pytest.approx(math.nan, nan_ok=True), "codebook_usage_per_codebook": []
    }  # fmt: skip
    # A codebook that was assigned no token uses none of its codes; its code distribution is undefined.
    assert load("codebook_usage").compute(code_counts=[[0, 0], [1, 0]])["codebook_usage_per_codebook"] == [0.0, 0.5]
    perplexity = load("codebook_perplexity").compute(code_counts=[[0, 0], [1, 1]])
    assert math.isnan(perplexity["codebook_perplexity_per_codebook"][0])
    assert perplexity["codebook_perplexity_per_codebook"][1] == 2.0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="as many entries"):
        load("perplexity").compute(predictions=[[1.0, 2.0], [3.0]], references=[[1], [2, 3]])
    with pytest.raises(ValueError, match="non-negative"):
        load("codebook_usage").compute(code_counts=[[1, -1]])
    with pytest.raises(ValueError, match="one finite, non-negative count per code"):
        load("codebook_perplexity").compute(code_counts=[[]])
    with pytest.raises(ValueError, match="Unknown LongVQ metric 'bleu'"):
        metrics.path("bleu")
    with pytest.raises(ValueError, match="Unknown accuracy config 'multilabel'"):
        load("accuracy", "multilabel")


# ---------------------------------------------------------------------------------------------------------------------
# evaluate pipelines, and the Trainer metric functions
# ---------------------------------------------------------------------------------------------------------------------


def test_modules_combine_with_evaluate():
    language_model = evaluate.combine([load("perplexity"), load("bits_per_byte")])
    result = language_model.compute(predictions=[[1.0, 3.0]], references=[[4, 5]])
    assert result == pytest.approx(
        {"perplexity": math.exp(2.0), "cross_entropy": 2.0, "bits_per_byte": 2 / math.log(2)}
    )
    # Batches added one at a time give the same pooled value.
    language_model.add_batch(predictions=[[1.0]], references=[[4]])
    language_model.add_batch(predictions=[[3.0]], references=[[5]])
    assert language_model.compute() == result


def _recording_loader(monkeypatch):
    """Replace `longvq.metrics.load` by one that records the names it loads (and still loads them)."""
    names = []
    load_module = metrics.load

    def record(name, *args, **kwargs):
        names.append(name)
        return load_module(name, *args, **kwargs)

    monkeypatch.setattr(metrics, "load", record)
    return names


def test_trainer_metric_functions_compute_with_the_modules(monkeypatch):
    names = _recording_loader(monkeypatch)
    nll = np.array([[0.5, 1.5, 0.0], [1.0, 7.0, 0.0]], dtype=np.float32)  # nll[:, t] scores labels[:, t + 1]
    labels = np.array([[0, 10, 11], [0, 12, -100]])
    lm = compute_lm_metrics(EvalPrediction(predictions=nll, label_ids=labels))
    assert lm == pytest.approx({"cross_entropy": 1.0, "perplexity": math.e, "bpb": 1 / math.log(2)})
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    classification = compute_classification_metrics(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 1])))
    assert classification == {"accuracy": 2 / 3}
    assert names == ["perplexity", "bits_per_byte", "accuracy"]

    names = _recording_loader(monkeypatch)
    # Shifted token labels: predictions[:, t] is scored against labels[:, t + 1].
    tokens = types.SimpleNamespace(predictions=np.array([[5, 6, 7, 0]]), label_ids=np.array([[-100, 5, 1, 7]]))
    assert compute_token_accuracy(tokens) == {"accuracy": 2 / 3, "scored_positions": 3}
    assert names == ["accuracy"]


def test_trainer_metrics_of_nothing_scored_are_nan_not_a_perfect_score():
    """Before the modules, no scored label gave cross-entropy 0 and perplexity 1 (a perfect model) and accuracy 0."""
    lm = compute_lm_metrics(EvalPrediction(predictions=np.zeros((2, 3)), label_ids=np.full((2, 3), -100)))
    assert all(math.isnan(lm[key]) for key in ("cross_entropy", "perplexity", "bpb")), lm
    tokens = types.SimpleNamespace(predictions=np.zeros((1, 3), dtype=np.int64), label_ids=np.full((1, 3), -100))
    accuracy = compute_token_accuracy(tokens)
    assert math.isnan(accuracy["accuracy"]) and accuracy["scored_positions"] == 0


def test_codebook_health_callback_reports_the_modules_values(monkeypatch):
    names = _recording_loader(monkeypatch)
    health = CodebookHealthCallback()
    assert health.metrics() == {}  # nothing collected yet
    health.on_train_begin(None, None, None, model=LongVQForCausalLM(tiny_config()))
    health.counter.counts = [torch.tensor([3.0, 1.0, 0.0, 0.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])]
    uneven = 4 / 3**0.75
    assert health.metrics() == pytest.approx({
        "codebook_usage_layer0": 0.5, "codebook_perplexity_layer0": uneven,
        "codebook_usage_layer1": 1.0, "codebook_perplexity_layer1": 4.0,
        "codebook_usage": 0.75, "codebook_perplexity": (uneven + 4.0) / 2,
    }, rel=1e-6)  # fmt: skip
    assert names == ["codebook_usage", "codebook_perplexity"]


def test_experiment_codebook_usage_pools_its_batches_with_the_modules(monkeypatch):
    """`longvq.experiments.codebook_usage` counts the codes of all its batches together (one batch: the model's own
    per-batch usage and perplexity; two batches: at least the usage of either) and computes with the modules."""
    names = _recording_loader(monkeypatch)
    torch.manual_seed(0)
    model = LongVQForCausalLM(tiny_config()).eval()
    batches = [{"input_ids": torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(i))} for i in (1, 2)]
    with torch.no_grad():
        outputs = [model(**batch) for batch in batches]
    one = codebook_usage(model, batches[:1])
    assert one["usage_per_layer"] == pytest.approx(outputs[0].codebook_usage.tolist(), abs=1e-4)
    assert one["perplexity_per_layer"] == pytest.approx(outputs[0].codebook_perplexity.tolist(), abs=1e-2)
    both = codebook_usage(model, batches)
    for layer, usage in enumerate(both["usage_per_layer"]):
        assert usage >= max(float(out.codebook_usage[layer]) for out in outputs) - 1e-4
    assert both["mean_usage"] == pytest.approx(sum(both["usage_per_layer"]) / 2, abs=1e-4)
    assert names == ["codebook_usage", "codebook_perplexity"] * 2


# ---------------------------------------------------------------------------------------------------------------------
# Offline loading from an installed wheel
# ---------------------------------------------------------------------------------------------------------------------

_INSTALLED_CHECK = """
import json
import sys

import evaluate

from longvq import metrics

site = sys.argv[1]
paths = {name: metrics.path(name) for name in metrics.METRIC_NAMES}
results = {
    "module_file": metrics.__file__,
    "paths": paths,
    "accuracy": metrics.load("accuracy").compute(predictions=[1, 0, 1], references=[1, 1, -100]),
    "bits_per_byte": evaluate.load(paths["bits_per_byte"]).compute(predictions=[[0.5, 1.5]], references=[[1, 2]]),
    "codebook": evaluate.combine([metrics.load("codebook_usage"), metrics.load("codebook_perplexity")]).compute(
        code_counts=[[1, 1, 0, 0]]
    ),
}
print(json.dumps(results))
"""


def test_modules_load_offline_from_an_installed_wheel(tmp_path):
    """Build a wheel of the working tree, install it (not editable) into a folder of its own and load every module
    from there in a fresh interpreter, offline: the module files must ship as package data."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this environment")
    source, wheels, site = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    ignored = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                     ".hypothesis", "outputs")  # fmt: skip
    shutil.copytree(REPO, source, ignore=ignored)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(wheels), str(source)]
    subprocess.run(build, check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("longvq-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, text=True)  # fmt: skip

    environment = {
        **os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf_home"),
    }  # fmt: skip
    run = subprocess.run([sys.executable, "-c", _INSTALLED_CHECK, str(site)], cwd=tmp_path, env=environment,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(results["module_file"]).is_relative_to(site)
    for name, folder in results["paths"].items():
        assert Path(folder).is_relative_to(site) and (Path(folder) / f"{name}.py").is_file(), (name, folder)
    assert results["accuracy"] == {"accuracy": 0.5}
    assert results["bits_per_byte"] == {"bits_per_byte": pytest.approx(1 / math.log(2))}
    assert results["codebook"] == {
        "codebook_usage": 0.5, "codebook_usage_per_codebook": [0.5],
        "codebook_perplexity": pytest.approx(2.0), "codebook_perplexity_per_codebook": [pytest.approx(2.0)],
    }  # fmt: skip
