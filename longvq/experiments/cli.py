"""The experiment commands: `longvq-train` (one run of `run_experiment`), `longvq-eval` (`evaluate_checkpoint` of a
saved run) and `longvq-compare` (`run_comparison`, or with `--suite` the quality suite `run_suite`; with
`--rebuild-table` only the table and plots rebuilt from the results already written).

    longvq-train --task listops --arch longvq --preset quick --output-dir runs/listops-longvq
    longvq-train --task mqar --arch llama --time-budget 120 --set learning_rate=1e-3 --output-dir runs/mq
    longvq-eval runs/listops-longvq --split validation
    OMP_NUM_THREADS=1 longvq-compare --output-dir runs/compare --time-budget 30
    longvq-compare --suite standard --output-dir runs/suite --workers 2      # re-run the same command to resume
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from .. import tasks
from ..cli import parse_overrides
from .compare import COMPARISON_TASKS, comparison_table, format_metric, run_comparison
from .models import ARCHITECTURE_LABELS, ARCHITECTURES
from .presets import PRESET_NAMES, QUICK_TIME_BUDGET_S
from .run import evaluate_checkpoint, run_experiment
from .suite import SUITES, load_suite_results, run_suite, select_entries, write_suite_report


def build_train_parser() -> argparse.ArgumentParser:
    """The command line of `longvq-train`."""
    parser = argparse.ArgumentParser(
        prog="longvq-train",
        description="Train LongVQ, a same-size Llama or the MEGA-chunk ablation on one task with the transformers "
        "Trainer; writes results.json, curve.png and the model (safetensors) to --output-dir.",
    )
    parser.add_argument("--task", required=True, choices=sorted(tasks.TASKS))
    parser.add_argument("--arch", default="longvq", choices=ARCHITECTURES)
    parser.add_argument("--preset", default="quick", choices=PRESET_NAMES)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="step limit (default: the preset's)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of training (default: the preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="preset override, e.g. model.hidden_size=128, learning_rate=1e-3, data.num_train=500; "
                        "repeatable")  # fmt: skip
    parser.add_argument("--cache-dir", default=None, help="task data cache (default: $LONGVQ_TASKS_CACHE or ~/.cache)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-save-model", action="store_true")
    return parser


def train_main(argv=None) -> dict:
    """`longvq-train`: one run of `run_experiment`; prints a one-line summary and returns the results."""
    args = build_train_parser().parse_args(argv)
    results = run_experiment(
        args.task, args.arch, args.preset, args.output_dir, seed=args.seed, time_budget_s=args.time_budget,
        max_steps=args.max_steps, overrides=parse_overrides(args.set), cache_dir=args.cache_dir,
        progress=not args.no_progress, save_model=not args.no_save_model,
    )  # fmt: skip
    test = results["metrics"]["test"].get(results["metric"])
    usage = results["codebook"]["mean_usage"] if results["codebook"] else None
    print(
        f"{args.task} / {ARCHITECTURE_LABELS[args.arch]} ({results['params']:,} params): test {results['metric']} "
        f"{format_metric(test, results['metric'])} after {results['steps']} steps in {results['train_time_s']:.0f} s "
        f"({results['tokens_per_s']:.0f} tokens/s)"
        + (f", codebook usage {100 * usage:.0f}%" if usage is not None else "")
        + f" -> {args.output_dir}"
    )
    return results


def evaluate_main(argv=None) -> dict:
    """`longvq-eval CHECKPOINT`: metrics of a saved model on its task's test split, as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="longvq-eval", description="Evaluate a checkpoint written by longvq-train.")
    parser.add_argument("checkpoint")
    parser.add_argument("--task", default=None, help="default: the task recorded in the checkpoint")
    parser.add_argument("--arch", default=None, choices=ARCHITECTURES, help="default: recorded in the checkpoint")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        parser.error(f"checkpoint folder {args.checkpoint!r} does not exist")
    metrics = evaluate_checkpoint(args.checkpoint, task=args.task, arch=args.arch, split=args.split,
                                  cache_dir=args.cache_dir, batch_size=args.batch_size)  # fmt: skip
    print(json.dumps(metrics, indent=2))
    return metrics


def suite_command(args) -> str:
    """`longvq-compare --suite NAME`: run the suite (resuming what `--output-dir` holds) or, with `--rebuild-table`,
    rewrite its table and plots from the per-run results there; returns the table."""
    suite = SUITES[args.suite]
    if args.rebuild_table:
        suite = dataclasses.replace(suite, entries=select_entries(suite, args.entries), archs=tuple(args.archs))
        return write_suite_report(load_suite_results(args.output_dir, suite), suite, args.output_dir)
    run_suite(suite, args.output_dir, workers=args.workers, budget_scale=args.budget_scale, entries=args.entries,
              archs=args.archs, cache_dir=args.cache_dir, progress=args.progress)  # fmt: skip
    with open(os.path.join(args.output_dir, "suite.md"), encoding="utf-8") as f:
        return f.read()


def compare_main(argv=None) -> str:
    """`longvq-compare`: the quick-preset comparison, or with `--suite` a quality suite; prints the table and writes
    it to --output-dir."""
    parser = argparse.ArgumentParser(
        prog="longvq-compare",
        description="LongVQ vs a same-size Llama vs the MEGA-chunk ablation at equal parameters and training time: "
        "the quick presets of every task (comparison.md / comparison.json), or with --suite a quality suite "
        "(learning-rate sweep, several seeds, worker processes; suite.md / suite.json / plots, resumable).",
    )
    parser.add_argument("--output-dir", default=None, help="default: runs/compare, or runs/suite-<name> with --suite")
    parser.add_argument("--tasks", nargs="+", default=list(COMPARISON_TASKS))
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--time-budget", type=float, default=QUICK_TIME_BUDGET_S, help="seconds per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--progress", action="store_true", help="progress bars for every run")
    parser.add_argument("--rebuild-table", action="store_true",
                        help="only rewrite the table from the results in --output-dir (comparison.json; with "
                        "--suite the per-run results.json files, plots included)")  # fmt: skip
    suite = parser.add_argument_group("quality suite (--suite; --tasks, --time-budget and --seed do not apply)")
    suite.add_argument("--suite", default=None, choices=sorted(SUITES))
    suite.add_argument("--workers", type=int, default=2, help="runs side by side, one process and thread each")
    suite.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every time budget")
    suite.add_argument("--entries", nargs="+", default=None, help="only these entries of the suite")
    args = parser.parse_args(argv)
    if args.suite:
        args.output_dir = args.output_dir or f"runs/suite-{args.suite}"
        table = suite_command(args)
        print(table)
        return table
    args.output_dir = args.output_dir or "runs/compare"
    if args.rebuild_table:
        with open(os.path.join(args.output_dir, "comparison.json"), encoding="utf-8") as f:
            results = json.load(f)
        budgets = {r.get("time_budget_s") for r in results}
        archs = [arch for arch in ARCHITECTURES if any(r["arch"] == arch for r in results)]
        table = comparison_table(results, budgets.pop() if len(budgets) == 1 else None, archs=archs)
        with open(os.path.join(args.output_dir, "comparison.md"), "w", encoding="utf-8") as f:
            f.write(table)
        print(table)
        return table
    unknown = [t for t in args.tasks if t not in tasks.TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(sorted(tasks.TASKS))}")
    _, table = run_comparison(args.output_dir, args.tasks, args.archs, args.time_budget, args.seed,
                              progress=args.progress, cache_dir=args.cache_dir)  # fmt: skip
    print(table)
    return table


__all__ = ["build_train_parser", "compare_main", "evaluate_main", "suite_command", "train_main"]
