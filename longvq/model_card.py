"""Model cards (Hub `README.md`) for LongVQ checkpoints, rendered offline with `huggingface_hub.ModelCard`.

`build_model_card(model_name, results, training_recipe, repo_id=...)` fills the Jinja template
`longvq/model_cards/longvq_card_template.md` (package data) and returns a `ModelCard` whose YAML front matter carries
`library_name: transformers`, `pipeline_tag: text-generation`, the tags `longvq`, `custom_code`, `vector-quantization`,
`long-context`, the license and a `model-index` built from the evaluation results. The results are a JSON file or dict
of the form

    {"task": "text-generation",
     "dataset": {"name": "LongVQ tiny corpus", "type": "longvq-tiny-corpus", "split": "validation"},
     "metrics": [{"type": "bits_per_byte", "value": 2.8, "name": "validation bits per byte"}]}

(or a list of such objects, one per dataset). `task` may also be `{"type": ..., "name": ...}`; optional keys:
`dataset.config`, `dataset.split`, `dataset.revision`, `metric.config`, `metric.verified`, `source: {name, url}`.

`card.validate()` asks the Hub and therefore needs the network; rendering, `card.save` and `ModelCard.load` do not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = ["DEFAULT_TAGS", "build_model_card", "default_template_path", "demo_recipe", "demo_results", "eval_results"]

DEFAULT_TAGS = ("longvq", "custom_code", "vector-quantization", "long-context")
TEMPLATE_NAME = "longvq_card_template.md"

# Config fields shown in the card's hyperparameter table, when a config is given.
_ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "shared_representation_size",
    "ema_projection_size", "codebook_size", "chunk_size", "relative_positional_bias", "normalization_type",
    "bidirectional", "tie_word_embeddings",
)  # fmt: skip


def default_template_path() -> Path:
    """`longvq/model_cards/longvq_card_template.md`, package data installed with longvq."""
    return Path(__file__).resolve().parent / "model_cards" / TEMPLATE_NAME


def _load_results(results) -> list[dict]:
    if isinstance(results, (str, os.PathLike)):
        results = json.loads(Path(results).read_text(encoding="utf-8"))
    if isinstance(results, Mapping):
        results = [results]
    results = [dict(entry) for entry in results]
    if not results:
        raise ValueError("no evaluation results given")
    return results


def eval_results(results) -> list[EvalResult]:
    """`EvalResult`s (one per metric) from a results path, dict or list of dicts (format in the module docstring)."""
    out = []
    for entry in _load_results(results):
        task = entry.get("task", "text-generation")
        task = {"type": task} if isinstance(task, str) else dict(task)
        dataset = dict(entry.get("dataset") or {})
        if "name" not in dataset or "type" not in dataset:
            raise ValueError(f"results need dataset.name and dataset.type, got {dataset}")
        metrics = entry.get("metrics") or []
        if not metrics:
            raise ValueError(f"no metrics for dataset {dataset['name']!r}")
        source = dict(entry.get("source") or {})
        for metric in metrics:
            if "type" not in metric or "value" not in metric:
                raise ValueError(f"each metric needs 'type' and 'value', got {metric}")
            out.append(
                EvalResult(
                    task_type=task["type"],
                    task_name=task.get("name"),
                    dataset_type=dataset["type"],
                    dataset_name=dataset["name"],
                    dataset_config=dataset.get("config"),
                    dataset_split=dataset.get("split"),
                    dataset_revision=dataset.get("revision"),
                    metric_type=metric["type"],
                    metric_value=metric["value"],
                    metric_name=metric.get("name"),
                    metric_config=metric.get("config"),
                    verified=metric.get("verified"),
                    source_name=source.get("name"),
                    source_url=source.get("url"),
                )
            )
    return out


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return f"`{json.dumps(value)}`"
    return str(value)


def _architecture(config) -> dict:
    if config is None:
        return {}
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: values[key] for key in _ARCHITECTURE_FIELDS if key in values}


def build_model_card(
    model_name: str,
    results,
    training_recipe: Mapping | None,
    repo_id: str = "your-org/longvq",
    *,
    description: str | None = None,
    config=None,
    num_parameters: int | None = None,
    language: str | list[str] | None = "en",
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    base_model: str | None = None,
    extra_tags: tuple[str, ...] | list[str] = (),
    example_prompt: str = "The lighthouse keeper",
    tokenizer_note: str | None = None,
    limitations: list[str] | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the LongVQ model card (see the module docstring).

    Args:
        model_name: card title and `model-index` name.
        results: evaluation results (JSON path, dict or list of dicts); they become `eval_results` / `model-index`
            and the "Evaluation results" table. `None` or `[]` renders a card without results.
        training_recipe: `{setting: value}` shown as the "Training recipe" table (insertion order kept).
        repo_id: Hub repository id used in the usage snippet.
        description: first paragraph of "Model description".
        config: optional `LongVQConfig` (or dict): its main hyperparameters are tabulated.
        num_parameters: optional parameter count, added to that table.
        language, license, datasets, base_model, extra_tags: card metadata.
        example_prompt: prompt of the usage snippet.
        tokenizer_note: optional paragraph about the tokenizer (ids, vocab size).
        limitations: extra bullet points for "Limitations".
        template_path: Jinja template; defaults to `default_template_path()`.
    """
    results_list = eval_results(results) if results else []
    tags = list(dict.fromkeys([*DEFAULT_TAGS, *extra_tags]))
    card_data = ModelCardData(
        model_name=model_name,
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=datasets,
        base_model=base_model,
        eval_results=results_list or None,
    )
    architecture = {key: _format_value(value) for key, value in _architecture(config).items()}
    if num_parameters is not None:
        architecture["parameters"] = f"{num_parameters:,}"
    eval_rows = [
        {
            "dataset": result.dataset_name,
            "split": result.dataset_split or "-",
            "metric": result.metric_name or result.metric_type,
            "value": _format_value(result.metric_value),
        }
        for result in results_list
    ]
    recipe = {str(key): _format_value(value) for key, value in (training_recipe or {}).items()}
    if description is None:
        description = f"`{model_name}` is a LongVQ language model for `transformers`."
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or default_template_path()),
        model_name=model_name,
        model_description=description,
        repo_id=repo_id,
        example_prompt=example_prompt,
        architecture=architecture,
        training_recipe=recipe,
        eval_rows=eval_rows,
        tokenizer_note=tokenizer_note,
        limitations=list(limitations or []),
    )


def demo_results(metrics: Mapping, dataset_name: str = "LongVQ tiny corpus") -> dict:
    """Results dict (card format) from a `longvq-demo` `metrics.json`: the last validation bits per byte."""
    last = [entry for entry in metrics.get("history", []) if "bpb" in entry][-1]
    return {
        "task": {"type": "text-generation", "name": "Byte-level language modeling"},
        "dataset": {"name": dataset_name, "type": "longvq-tiny-corpus", "split": "validation"},
        "metrics": [
            {"type": "bits_per_byte", "value": round(float(last["bpb"]), 4), "name": "validation bits per byte"},
        ],
    }


def demo_recipe(metrics: Mapping) -> dict:
    """Training-recipe dict from a `longvq-demo` `metrics.json` (its command-line arguments and step count)."""
    args = dict(metrics.get("args", {}))
    recipe = {
        "data": "longvq/data/tiny_corpus.txt as UTF-8 bytes, its chapters separated by <|endoftext|> (first 90% "
        "train, last 10% validation)",
        "objective": "next-byte cross-entropy + vq_commitment_weight x commitment loss; EMA k-means codebooks",
        "optimizer": "AdamW, linear warmup then cosine decay to 10% of the peak",
    }
    for key in ("lr", "batch_size", "seq_len", "seed"):
        if key in args:
            recipe["peak learning rate" if key == "lr" else key] = args[key]
    if "steps" in metrics:
        recipe["steps"] = metrics["steps"]
    return recipe


def main(argv=None) -> None:
    """`longvq-card --results results.json --out README.md --model-name NAME --repo-id ORG/NAME`."""
    import argparse

    parser = argparse.ArgumentParser(description="Render a LongVQ model card (README.md with model-index) offline.")
    parser.add_argument("--results", default=None, help="results JSON ({task, dataset, metrics}); optional")
    parser.add_argument("--out", default="README.md", help="output path (default README.md)")
    parser.add_argument("--model-name", required=True, help="card title and model-index name")
    parser.add_argument("--repo-id", default="your-org/longvq", help="Hub repo id for the usage snippet")
    parser.add_argument("--recipe", default=None, help="JSON file with the training recipe {setting: value}")
    parser.add_argument("--set", dest="recipe_items", action="append", default=[], metavar="KEY=VALUE",
                        help="one training-recipe entry (repeatable; added after --recipe)")  # fmt: skip
    parser.add_argument("--config", default=None, help="checkpoint dir or config.json to tabulate hyperparameters")
    parser.add_argument("--description", default=None, help="first paragraph of the model description")
    parser.add_argument("--language", default="en")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--template", default=None, help="Jinja template (default: the packaged " + TEMPLATE_NAME + ")")
    args = parser.parse_args(argv)

    recipe = json.loads(Path(args.recipe).read_text(encoding="utf-8")) if args.recipe else {}
    for item in args.recipe_items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        recipe[key] = value
    config = None
    if args.config:
        path = Path(args.config)
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text(encoding="utf-8"))
    card = build_model_card(
        args.model_name,
        args.results,
        recipe,
        repo_id=args.repo_id,
        description=args.description,
        config=config,
        language=args.language,
        license=args.license,
        template_path=args.template,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    card.save(args.out)
    print(f"wrote {args.out}")
