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
- `compare`: `run_comparison` and its markdown table;
- `suite`: the quality suites (`SUITES`: `standard`, `tiny`) and `run_suite`: a learning-rate sweep, several seeds
  and worker processes per suite entry and architecture, `summarize_suite` / `suite_table` with the targets;
- `plots`: the learning-curve, comparison and suite figures;
- `cli`: the commands `longvq-train`, `longvq-eval` and `longvq-compare` (`--suite` for a quality suite).

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
from .plots import plot_comparison, plot_curve, plot_position_bpb, plot_suite_curves
from .presets import PRESET_NAMES, PRESETS, QUICK_TIME_BUDGET_S, TRAIN_DEFAULTS, get_preset, quick_preset
from .run import BudgetClock, ExperimentTrainer, bpb_by_position, codebook_usage, evaluate_checkpoint, run_experiment
from .suite import SUITES, Suite, SuiteEntry, load_suite_results, run_suite, suite_table, summarize_suite

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_LABELS",
    "BASELINES",
    "COMPARISON_TASKS",
    "PRESETS",
    "PRESET_NAMES",
    "PUBLISHED",
    "QUICK_TIME_BUDGET_S",
    "SUITES",
    "TRAIN_DEFAULTS",
    "Baseline",
    "BudgetClock",
    "ExperimentTrainer",
    "Reference",
    "Suite",
    "SuiteEntry",
    "TokenLabelShift",
    "bpb_by_position",
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
    "load_suite_results",
    "longvq_config",
    "majority_rate",
    "make_collator",
    "parse_overrides",
    "plot_comparison",
    "plot_curve",
    "plot_position_bpb",
    "plot_suite_curves",
    "quick_preset",
    "run_comparison",
    "run_experiment",
    "run_suite",
    "suite_table",
    "summarize_suite",
    "task_info",
    "train_main",
]
