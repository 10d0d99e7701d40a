"""One experiment: `run_experiment` trains an architecture on a task with a `transformers.Trainer` at a preset,
evaluates it and writes `results.json`, `curve.png` and the final model; `evaluate_checkpoint` re-evaluates a saved
model on its task.

Budgets: with `time_budget_s`, training stops once the summed duration of the optimizer steps (evaluation and
logging excluded) reaches the budget, and the learning rate follows a warmup + cosine schedule over *that wall-clock
budget* (`BudgetClock`), so every architecture finishes its decay at the budget however fast its steps are: runs at
equal budget are comparisons at equal training time.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from ..metrics import IGNORE_INDEX
from ..training import (
    CodebookHealthCallback,
    CodeCounter,
    codebook_summary,
    compute_classification_metrics,
    compute_lm_metrics,
    compute_token_accuracy,
    preprocess_logits_for_metrics,
    preprocess_token_predictions,
    trainer_defaults,
)
from .baselines import count_parameters
from .data import build_datasets, make_collator, majority_rate, resolve_info, task_info
from .models import build_model, check_arch, load_model
from .plots import plot_curve
from .presets import TRAIN_DEFAULTS, get_preset

RESULTS_FILE = "results.json"
EXPERIMENT_FILE = "experiment.json"  # next to the saved model: what longvq-eval needs to rebuild the test split
CURVE_FILE = "curve.png"
POSITION_BINS = 16  # bins of `bpb_by_position` over the window

# The metric each task kind is judged by, and whether higher is better.
PRIMARY_METRIC = {
    "classification": ("accuracy", True),
    "token_labels": ("accuracy", True),
    "lm": ("bpb", False),
}

# The Trainer metric functions of each task kind: (compute_metrics, preprocess_logits_for_metrics).
METRIC_FUNCTIONS = {
    "classification": (compute_classification_metrics, None),
    "lm": (compute_lm_metrics, preprocess_logits_for_metrics),
    "token_labels": (compute_token_accuracy, preprocess_token_predictions),
}


class BudgetClock(TrainerCallback):
    """Measures training time as the summed duration of optimizer steps (evaluation, logging and saving excluded),
    stops training at `budget_s` seconds, and requests `num_evaluations` evenly spaced evaluations (by time with a
    budget, by step otherwise) for the learning curve. `progress()` in [0, 1] drives the budget LR schedule."""

    def __init__(self, budget_s: float | None = None, max_steps: int | None = None, num_evaluations: int = 0):
        self.budget_s, self.max_steps, self.num_evaluations = budget_s, max_steps, num_evaluations
        self.elapsed = 0.0
        self.steps = 0
        self._started = None
        self._next_evaluation = 1

    def progress(self) -> float:
        fractions = []
        if self.budget_s:
            fractions.append(self.elapsed / self.budget_s)
        if self.max_steps:
            fractions.append(self.steps / self.max_steps)
        return min(1.0, max(fractions, default=0.0))

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._started is not None:
            self.elapsed += time.perf_counter() - self._started
            self._started = None
        self.steps = state.global_step
        if self.budget_s is not None and self.elapsed >= self.budget_s:
            control.should_training_stop = True
        due = self.num_evaluations and self._next_evaluation < self.num_evaluations
        if due and self.progress() >= self._next_evaluation / self.num_evaluations:
            self._next_evaluation += 1
            control.should_evaluate = True
        return control


class ExperimentTrainer(Trainer):
    """`Trainer` with a warmup + cosine learning-rate schedule over the `BudgetClock`'s progress (wall-clock budget
    or steps), decaying to `min_learning_rate_ratio` of the peak, and a count of the real tokens trained on."""

    def __init__(self, *args, clock: BudgetClock, warmup_steps: int = 0, min_learning_rate_ratio: float = 0.1,
                 **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.clock, self.schedule_warmup, self.min_ratio = clock, warmup_steps, min_learning_rate_ratio
        self.tokens_trained = 0

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            warmup, low, clock = self.schedule_warmup, self.min_ratio, self.clock

            def factor(step):
                ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
                return ramp * (low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * clock.progress())))

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        reference = inputs.get("input_ids", inputs.get("inputs_embeds"))
        self.tokens_trained += int(mask.sum()) if mask is not None else int(np.prod(reference.shape[:2]))
        return super().training_step(model, inputs, num_items_in_batch)


@torch.no_grad()
def codebook_usage(model: nn.Module, dataloader, max_batches: int = 8) -> dict[str, Any] | None:
    """Per-layer codebook usage (fraction of codes assigned at least one real token) and code perplexity over the
    real tokens of up to `max_batches` evaluation batches together (counted by `CodeCounter`, computed by the metric
    modules), plus the fingerprint of `codebook_summary`; None for non-LongVQ models."""
    if not hasattr(model.config, "codebook_size"):
        return None
    was_training = model.training
    model.eval()
    counter = CodeCounter(model)
    device = next(model.parameters()).device
    try:
        for batch in itertools.islice(dataloader, max_batches):
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
    finally:
        counter.remove()
        model.train(was_training)
    health = counter.health()
    if health is None:
        return None
    return {
        "codebook_size": model.config.codebook_size,
        "usage_per_layer": [round(u, 4) for u in health["codebook_usage_per_codebook"]],
        "perplexity_per_layer": [round(p, 2) for p in health["codebook_perplexity_per_codebook"]],
        "mean_usage": health["codebook_usage"],
        "sha256": codebook_summary(model)["sha256"],
    }


def _strip_prefix(metrics: Mapping, prefix: str) -> dict:
    """Trainer metrics without their `eval_`/`test_` prefix and without runtime bookkeeping."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")
    out = {}
    for key, value in metrics.items():
        name = key[len(prefix) + 1 :] if key.startswith(prefix + "_") else key
        if name not in skip:
            out[name] = value
    return out


def _curve(log_history) -> dict:
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evaluations = [{"step": e["step"], **_strip_prefix(e, "eval")} for e in log_history if "eval_loss" in e]
    usage = [(e["step"], e["codebook_usage"]) for e in log_history if "codebook_usage" in e]
    return {"train_loss": train, "evaluations": evaluations, "codebook_usage": usage}


def write_json(path: str, payload) -> None:
    """`payload` as indented JSON at `path` (values JSON cannot hold written as their `str`)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=str)


def bpb_by_position(nll: np.ndarray, labels: np.ndarray, num_bins: int = POSITION_BINS) -> dict[str, list]:
    """Bits per byte by position in the window, from the (B, T) next-token NLLs in nats that
    `preprocess_logits_for_metrics` gives (position t scores `labels[:, t + 1]`) and the labels: the positions
    0..T-2 (the last one scores nothing) in `num_bins` near-equal bins; per bin the mean NLL / ln 2 over the scored
    positions. Returns {"bin_edges": [start of each bin..., T - 1], "bpb": [one value per bin]}."""
    nll, scored = np.asarray(nll)[:, :-1], np.asarray(labels)[:, 1:] != IGNORE_INDEX
    bins = np.array_split(np.arange(nll.shape[1]), min(num_bins, nll.shape[1]))
    bpb = [float(nll[:, b][scored[:, b]].sum() / max(scored[:, b].sum(), 1) / math.log(2)) for b in bins]
    return {"bin_edges": [int(b[0]) for b in bins] + [nll.shape[1]], "bpb": bpb}


def _training_arguments(
    output_dir: str, train: Mapping, seed: int, max_steps: int, progress: bool
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        seed=seed,
        max_steps=max_steps,
        per_device_train_batch_size=train["batch_size"],
        per_device_eval_batch_size=train["eval_batch_size"],
        learning_rate=train["learning_rate"],
        weight_decay=train["weight_decay"],
        max_grad_norm=train["max_grad_norm"],
        adam_beta2=train["adam_beta2"],
        logging_steps=train["logging_steps"],
        eval_strategy="no",  # evaluations come from BudgetClock, spaced over the budget
        save_strategy="no",
        disable_tqdm=not progress,
        remove_unused_columns=False,  # the collator reads `values`/`label` columns no forward() names
        **trainer_defaults(),
    )


def run_experiment(
    task: str,
    arch: str = "longvq",
    preset: str | Mapping = "quick",
    output_dir: str = "runs/experiment",
    seed: int = 0,
    time_budget_s: float | None = None,
    max_steps: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    cache_dir=None,
    progress: bool = False,
    save_model: bool = True,
    plot: bool = True,
) -> dict:
    """Train architecture `arch` on `task` with `preset` (+ `overrides`), evaluate on the test split, and write
    `results.json`, `curve.png` and (with `save_model`) the model (safetensors) plus `experiment.json` into
    `output_dir`. Returns the results dict.

    `time_budget_s` / `max_steps` override the preset's budget: training stops at whichever comes first (a time budget
    with no step limit runs until the budget). With neither set anywhere, ValueError.

    results: task, family, kind, arch, preset, seed, params, steps, train_time_s (summed optimizer-step time, what the
    budget measures), wall_time_s (the whole call, data building and evaluation included), tokens_trained (real
    tokens trained on), tokens_per_s (of train_time_s), metric / higher_is_better (the task's primary metric), metrics
    (validation and test, Trainer's metrics without prefix), codebook (usage on the test split; LongVQ only),
    curve (logged training loss and evaluations by step), config (the model config), resolved preset, data arguments;
    for language modelling also bpb_by_position (test bits per byte by position in the window, `bpb_by_position`).
    """
    started = time.perf_counter()
    check_arch(arch)
    info = task_info(task)
    resolved = get_preset(task, preset, overrides)
    train = resolved["train"]
    if time_budget_s is not None:
        train["time_budget_s"] = time_budget_s
    if max_steps is not None:
        train["max_steps"] = max_steps
    elif time_budget_s is not None and not isinstance(preset, Mapping):
        train["max_steps"] = TRAIN_DEFAULTS["max_steps"]
    budget, step_limit = train["time_budget_s"], train["max_steps"]
    if not budget and not step_limit:
        raise ValueError("Give a time budget or a step limit.")
    os.makedirs(output_dir, exist_ok=True)

    datasets, data_args = build_datasets(info, resolved, seed=seed, cache_dir=cache_dir)
    info = resolve_info(info, datasets, data_args)
    set_seed(seed)
    model = build_model(arch, info, resolved)
    compute_metrics, preprocess = METRIC_FUNCTIONS[info.kind]
    clock = BudgetClock(budget, step_limit, train["num_evaluations"])
    health = [CodebookHealthCallback()] if hasattr(model.config, "codebook_size") else []
    trainer = ExperimentTrainer(
        model=model,
        args=_training_arguments(output_dir, train, seed, step_limit or TRAIN_DEFAULTS["max_steps"], progress),
        data_collator=make_collator(info),
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
        callbacks=[*health, clock],
        clock=clock,
        warmup_steps=train["warmup_steps"],
        min_learning_rate_ratio=train["min_learning_rate_ratio"],
    )
    if not progress:  # without progress bars Trainer prints every log dict; keep quiet runs quiet
        trainer.remove_callback(PrinterCallback)
    trainer.train()
    validation = _strip_prefix(trainer.evaluate(), "eval")
    # `predict` gives the metrics `evaluate` would and keeps the predictions (for LM: the per-position NLLs).
    prediction = trainer.predict(datasets["test"], metric_key_prefix="test")
    test = _strip_prefix(prediction.metrics, "test")
    codebook = codebook_usage(trainer.model, trainer.get_test_dataloader(datasets["test"]))
    metric, higher = PRIMARY_METRIC[info.kind]
    results = {
        "task": task,
        "family": info.family,
        "kind": info.kind,
        "arch": arch,
        "preset": preset if isinstance(preset, str) else "custom",
        "seed": seed,
        "params": count_parameters(trainer.model),
        "steps": trainer.state.global_step,
        "train_time_s": round(clock.elapsed, 2),
        "time_budget_s": budget,
        "tokens_trained": trainer.tokens_trained,
        "tokens_per_s": round(trainer.tokens_trained / max(clock.elapsed, 1e-9), 1),
        "metric": metric,
        "higher_is_better": higher,
        "metrics": {"validation": validation, "test": test},
        "codebook": codebook,
        "curve": _curve(trainer.state.log_history),
        "config": trainer.model.config.to_diff_dict(),
        "model_class": type(trainer.model).__name__,
        "preset_settings": resolved,
        "data_args": data_args,
        "dataset_sizes": {split: len(ds) for split, ds in datasets.items()},
        "chance": majority_rate(datasets["test"]) if info.kind == "classification" else None,
    }
    if info.kind == "lm":
        results["bpb_by_position"] = bpb_by_position(prediction.predictions, prediction.label_ids)
    if save_model:
        trainer.save_model(output_dir)
        experiment = {k: results[k] for k in ("task", "arch", "preset", "seed", "data_args", "model_class")}
        experiment["eval_batch_size"] = train["eval_batch_size"]
        write_json(os.path.join(output_dir, EXPERIMENT_FILE), experiment)
    results["wall_time_s"] = round(time.perf_counter() - started, 2)
    write_json(os.path.join(output_dir, RESULTS_FILE), results)
    if plot:
        plot_curve(results, os.path.join(output_dir, CURVE_FILE))
    return results


def evaluate_checkpoint(checkpoint: str, task: str | None = None, arch: str | None = None, split: str = "test",
                        seed: int | None = None, cache_dir=None, batch_size: int | None = None) -> dict:  # fmt: skip
    """Metrics of a model saved by `run_experiment` on a split of its task (rebuilt from `experiment.json`, so the
    same data arguments and seed give the same examples). `task`/`arch`/`seed` override what the file says."""
    path = os.path.join(checkpoint, EXPERIMENT_FILE)
    experiment = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            experiment = json.load(f)
    task = task or experiment.get("task")
    if task is None:
        raise ValueError(f"{checkpoint} has no {EXPERIMENT_FILE}; pass the task.")
    info = task_info(task)
    arch = arch or experiment.get("arch") or "longvq"
    seed = experiment.get("seed", 0) if seed is None else seed
    model = load_model(checkpoint, arch, info)
    datasets, _ = build_datasets(info, {"data": experiment.get("data_args", {})}, seed=seed, cache_dir=cache_dir)
    if split not in datasets:
        raise ValueError(f"Unknown split {split!r}; the task has {', '.join(datasets)}.")
    compute_metrics, preprocess = METRIC_FUNCTIONS[info.kind]
    with tempfile.TemporaryDirectory() as scratch:  # Trainer wants an output folder; evaluation writes nothing
        args = TrainingArguments(
            output_dir=scratch, per_device_eval_batch_size=batch_size or experiment.get("eval_batch_size", 64),
            disable_tqdm=True, remove_unused_columns=False, **trainer_defaults(),
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, data_collator=make_collator(info), compute_metrics=compute_metrics,
                          preprocess_logits_for_metrics=preprocess)  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # stdout carries the JSON only
        metrics = _strip_prefix(trainer.evaluate(datasets[split], metric_key_prefix=split), split)
    metric, _ = PRIMARY_METRIC[info.kind]
    return {"checkpoint": checkpoint, "task": task, "arch": arch, "split": split, "metric": metric,
            "metrics": metrics}  # fmt: skip


__all__ = [
    "CURVE_FILE", "EXPERIMENT_FILE", "METRIC_FUNCTIONS", "POSITION_BINS", "PRIMARY_METRIC", "RESULTS_FILE",
    "BudgetClock", "ExperimentTrainer", "bpb_by_position", "codebook_usage", "evaluate_checkpoint", "run_experiment",
    "write_json",
]  # fmt: skip
