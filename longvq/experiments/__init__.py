"""Experiments over the task suite (`longvq.tasks`): LongVQ against its baselines at equal parameters and training
time, with the transformers `Trainer`. By job:

- `presets`: the quick (CPU) and full (GPU, MEGA's recipes) presets of every task, as data, and `get_preset`;
- `baselines`: the registry of baselines (`BASELINES`: a same-size Llama, the MEGA-chunk ablation, Mamba), which the
  benchmark (`longvq.benchmark`) builds from too;
- `models`: the LongVQ config of a task at a preset and the model of each architecture (`build_model`,
  `load_model`);
- `data`: the task's splits and collator (`build_datasets`, `make_collator`, `TokenLabelShift` for MQAR);
- `run`: `run_experiment`, one `Trainer` run that writes `results.json`, `curve.png` and the final model, and
  `evaluate_checkpoint`;
- `compare`: `run_comparison` and its markdown table; `plots`: the learning-curve and comparison figures;
- `cli`: the commands `longvq-train`, `longvq-eval` and `longvq-compare`.

    from longvq.experiments import run_experiment
    results = run_experiment("listops", "longvq", "quick", "runs/listops-longvq", time_budget_s=60)
    print(results["metrics"]["test"]["accuracy"])
"""

from ..cli import parse_overrides
from ..training import compute_token_accuracy
from .baselines import BASELINES, Baseline, Reference, build_baseline, count_parameters, llama_config
from .cli import compare_main, evaluate_main, train_main
from .compare import COMPARISON_TASKS, PUBLISHED, comparison_table, format_metric, run_comparison
from .data import TokenLabelShift, build_datasets, downsample_values, make_collator, majority_rate, task_info
from .models import ARCHITECTURE_LABELS, ARCHITECTURES, build_model, load_model, longvq_config
from .plots import plot_comparison, plot_curve
from .presets import PRESET_NAMES, PRESETS, QUICK_TIME_BUDGET_S, TRAIN_DEFAULTS, get_preset
from .run import BudgetClock, ExperimentTrainer, codebook_usage, evaluate_checkpoint, run_experiment

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_LABELS",
    "BASELINES",
    "COMPARISON_TASKS",
    "PRESETS",
    "PRESET_NAMES",
    "PUBLISHED",
    "QUICK_TIME_BUDGET_S",
    "TRAIN_DEFAULTS",
    "Baseline",
    "BudgetClock",
    "ExperimentTrainer",
    "Reference",
    "TokenLabelShift",
    "build_baseline",
    "build_datasets",
    "build_model",
    "codebook_usage",
    "compare_main",
    "comparison_table",
    "compute_token_accuracy",
    "count_parameters",
    "downsample_values",
    "evaluate_checkpoint",
    "evaluate_main",
    "format_metric",
    "get_preset",
    "llama_config",
    "load_model",
    "longvq_config",
    "majority_rate",
    "make_collator",
    "parse_overrides",
    "plot_comparison",
    "plot_curve",
    "run_comparison",
    "run_experiment",
    "task_info",
    "train_main",
]
