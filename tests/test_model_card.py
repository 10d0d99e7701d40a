"""Model cards: offline rendering from the Jinja template, model-index from a results JSON, ModelCard.load round trip."""

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import longvq
from longvq import LongVQConfig
from longvq.model_card import (
    DEFAULT_TAGS,
    build_model_card,
    default_template_path,
    demo_recipe,
    demo_results,
    eval_results,
    main,
)

RESULTS = {
    "task": "text-generation",
    "dataset": {"name": "LongVQ tiny corpus", "type": "longvq-tiny-corpus", "split": "validation"},
    "metrics": [
        {"type": "bits_per_byte", "value": 2.8, "name": "validation bits per byte"},
        {"type": "perplexity", "value": 6.96, "name": "validation byte perplexity"},
    ],
}
RECIPE = {"optimizer": "AdamW (beta2=0.98)", "peak learning rate": 0.003, "batch_size": 16, "steps": 248}
REPO_ID = "longvq-org/longvq-demo"


@pytest.fixture
def results_path(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS), encoding="utf-8")
    return path


@pytest.fixture
def card(results_path):
    return build_model_card(
        "longvq-demo", results_path, RECIPE, repo_id=REPO_ID, config=LongVQConfig(vocab_size=257), num_parameters=1234
    )


def test_template_is_package_data_and_has_the_sections():
    path = default_template_path()
    # Inside the package (setup.py's package_data ships longvq/model_cards/*.md), so an installed wheel has it too.
    assert path.parent == Path(longvq.__file__).resolve().parent / "model_cards" and path.suffix == ".md"
    text = path.read_text(encoding="utf-8")
    for heading in ("## Model description", "## How to use", "## Training recipe", "## Evaluation results",
                    "## Limitations", "## Citation"):  # fmt: skip
        assert heading in text


def test_card_metadata(card):
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert list(DEFAULT_TAGS) == ["longvq", "custom_code", "vector-quantization", "long-context"]
    assert all(tag in data.tags for tag in DEFAULT_TAGS)
    assert card.content.startswith("---\n")


def test_card_body(card):
    text = card.text
    assert f'AutoTokenizer.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert "model.generate(" in text
    for key, value in RECIPE.items():
        assert f"| {key} | {value} |" in text
    assert "| LongVQ tiny corpus | validation | validation bits per byte | 2.8 |" in text
    assert "| `codebook_size` |" in text and "| `chunk_size` |" in text
    assert "| `vocab_size` | 257 |" in text and "1,234" in text
    assert "configuration_longvq.py" in text and "modeling_longvq.py" in text  # what trust_remote_code runs
    assert "rolled" in text and "back" in text  # recurrent state cannot be rolled back
    assert "2404.11163" in text and "IJCAI" in text and "Liu" in text
    assert "{{" not in text and "{%" not in text  # fully rendered


def test_card_round_trips_through_model_card_load(card, tmp_path):
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)
    assert loaded.data.library_name == "transformers" and loaded.data.pipeline_tag == "text-generation"
    assert loaded.data.tags == card.data.tags
    results = loaded.data.eval_results
    assert [(r.metric_type, r.metric_value, r.metric_name) for r in results] == [
        (m["type"], m["value"], m["name"]) for m in RESULTS["metrics"]
    ]
    assert {r.dataset_name for r in results} == {"LongVQ tiny corpus"}
    assert {r.dataset_type for r in results} == {"longvq-tiny-corpus"}
    assert {r.task_type for r in results} == {"text-generation"}
    assert {r.dataset_split for r in results} == {"validation"}
    index = loaded.data.to_dict()["model-index"]
    assert index[0]["name"] == "longvq-demo"
    metrics = index[0]["results"][0]["metrics"]
    assert {m["type"]: m["value"] for m in metrics} == {"bits_per_byte": 2.8, "perplexity": 6.96}
    assert loaded.text == card.text


def test_results_formats_and_validation():
    several = [RESULTS, {"task": {"type": "text-generation", "name": "LM"}, "dataset": {"name": "b", "type": "b"},
                         "metrics": [{"type": "accuracy", "value": 0.5}], "source": {"name": "me", "url": "http://x"}}]  # fmt: skip
    results = eval_results(several)
    assert [r.metric_type for r in results] == ["bits_per_byte", "perplexity", "accuracy"]
    assert results[-1].task_name == "LM" and results[-1].source_url == "http://x"
    with pytest.raises(ValueError, match="dataset.name"):
        eval_results({"dataset": {"name": "x"}, "metrics": [{"type": "a", "value": 1}]})
    with pytest.raises(ValueError, match="no metrics"):
        eval_results({"dataset": {"name": "x", "type": "x"}, "metrics": []})
    with pytest.raises(ValueError, match="'type' and 'value'"):
        eval_results({"dataset": {"name": "x", "type": "x"}, "metrics": [{"type": "a"}]})
    no_results = build_model_card("bare", None, {})
    assert "No evaluation results were recorded." in no_results.text
    assert "model-index" not in no_results.data.to_dict()


def test_demo_metrics_helpers():
    metrics = {
        "args": {"lr": 0.006, "batch_size": 8, "seq_len": 256, "steps": 250, "seed": 0},
        "steps": 248,
        "history": [{"step": 0, "bpb": 9.1}, {"step": 248, "bpb": 2.893024, "train_bpb": 2.3}],
    }
    results = demo_results(metrics)
    assert results["metrics"][0] == {"type": "bits_per_byte", "value": 2.893, "name": "validation bits per byte"}
    recipe = demo_recipe(metrics)
    assert recipe["steps"] == 248 and recipe["peak learning rate"] == 0.006 and recipe["seq_len"] == 256
    assert "<|endoftext|>" in recipe["data"]
    card = build_model_card("demo", results, recipe)
    assert card.data.eval_results[0].metric_value == 2.893


def test_make_card_cli(results_path, tmp_path, capsys):
    recipe_path = tmp_path / "recipe.json"
    recipe_path.write_text(json.dumps({"optimizer": "AdamW"}), encoding="utf-8")
    out = tmp_path / "card" / "README.md"
    main(["--results", str(results_path), "--out", str(out), "--model-name", "cli-model", "--repo-id", "o/cli",
          "--recipe", str(recipe_path), "--set", "warmup=20"])  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    loaded = ModelCard.load(out)
    assert loaded.data.eval_results[0].metric_value == 2.8
    assert loaded.data.to_dict()["model-index"][0]["name"] == "cli-model"
    assert '"o/cli", trust_remote_code=True' in loaded.text
    assert "| optimizer | AdamW |" in loaded.text and "| warmup | 20 |" in loaded.text
