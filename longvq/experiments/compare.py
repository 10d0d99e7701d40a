"""The comparison: `run_comparison` trains every architecture on the quick preset of every task for the same
training time, and writes one markdown table (`comparison_table`, with the published MEGA / MEGA-chunk / Transformer
numbers for orientation), the results and a plot of the validation curves."""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..tasks.common import TaskSourceMissing
from .models import ARCHITECTURE_LABELS, ARCHITECTURES
from .plots import plot_comparison
from .run import write_json, run_experiment

# Published test numbers for orientation (MEGA paper, Ma et al. 2023, Table 2 and its SC / enwik8 results; the
# Transformer row as re-run in MEGA's LRA table). Different data sizes, sequence lengths and models ~100x larger than
# the quick presets: they say where the full recipes land, not what a quick run should reach.
PUBLISHED = {
    "listops": ("LRA ListOps (2K tokens)", "63.14", "58.76", "37.11"),
    "text": ("LRA Text (4K bytes)", "90.43", "90.19", "65.21"),
    "retrieval": ("LRA Retrieval (2 x 4K bytes)", "91.25", "90.97", "79.14"),
    "fashion_mnist": ("LRA Image = sCIFAR-10 (other data)", "90.44", "85.80", "42.94"),
    "pathfinder": ("LRA Pathfinder (32 px)", "96.01", "94.41", "71.83"),
    "pathx": ("LRA Path-X (128 px)", "97.98", "93.81", "fails (50)"),
    "speech": ("Speech Commands raw 16 kHz", "96.92", "–", "–"),
    "text_lm": ("enwik8 bits/byte, 39M params", "1.02", "–", "–"),
    "mqar": ("–", "–", "–", "–"),
}
# Path-X is left out: 16K-token images do not train within a CPU budget (every model would sit at chance).
COMPARISON_TASKS = ("listops", "pathfinder", "mqar", "text", "retrieval", "fashion_mnist", "speech", "text_lm")


def format_metric(value: float | None, metric: str) -> str:
    """Accuracy as a percentage with one decimal, bits per byte with three."""
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.3f}"


def comparison_table(results: list[Mapping], budget_s: float | None = None, notes: Mapping[str, str] | None = None,
                     archs=ARCHITECTURES) -> str:  # fmt: skip
    """One markdown table from `run_experiment` results (any order; one per task and arch): per task the test metric
    of each architecture (the best in bold), their parameter counts and steps, and the published MEGA / MEGA-chunk /
    Transformer numbers for orientation. `notes` maps a task to a message shown instead of numbers (e.g. a task
    whose data is not installed)."""
    by_task: dict[str, dict[str, Mapping]] = {}
    for result in results:
        by_task.setdefault(result["task"], {})[result["arch"]] = result
    labels = [ARCHITECTURE_LABELS[a] for a in archs]
    header = ["Task", "Metric", "Chance", *labels, "Params (" + " / ".join(labels) + ")", "Steps (" + " / ".join(labels) + ")",
              "Paper: setting", "Paper MEGA", "Paper MEGA-chunk", "Paper Transformer"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tasks = [t for t in COMPARISON_TASKS if t in by_task or t in (notes or {})]
    tasks += sorted(t for t in {*by_task, *(notes or {})} if t not in tasks)
    for task in tasks:
        published = PUBLISHED.get(task, ("–", "–", "–", "–"))
        runs = by_task.get(task, {})
        if not runs:
            cells = [task, "–", "–", (notes or {}).get(task, "not run"), *([""] * (len(archs) + 1))]
            lines.append("| " + " | ".join([*cells, *published]) + " |")
            continue
        any_run = next(iter(runs.values()))
        metric, higher = any_run["metric"], any_run["higher_is_better"]
        values = {a: runs[a]["metrics"]["test"].get(metric) if a in runs else None for a in archs}
        present = [v for v in values.values() if v is not None]
        best = (max(present) if higher else min(present)) if present else None
        shown = []
        for arch in archs:
            text = format_metric(values[arch], metric)
            # Bold the best only when it is better than some other run (three runs at chance: nothing in bold).
            is_best = values[arch] is not None and values[arch] == best and any(v != best for v in present)
            shown.append(f"**{text}**" if is_best else text)
        params = " / ".join(f"{runs[a]['params'] / 1e3:.1f}k" if a in runs else "–" for a in archs)
        steps = " / ".join(str(runs[a]["steps"]) if a in runs else "–" for a in archs)
        metric_name = "accuracy" if metric == "accuracy" else "bits/byte (lower is better)"
        chance = format_metric(any_run.get("chance"), metric)
        lines.append("| " + " | ".join([task, metric_name, chance, *shown, params, steps, *published]) + " |")
    intro = []
    if budget_s is not None:
        intro.append(f"Every model trained for the same {budget_s:g} s of optimizer steps (quick presets, CPU).")
    intro.append("Test-split metrics; paper columns are full-size models on the full benchmarks, for orientation only "
                 "(different data, lengths and scale).")  # fmt: skip
    return " ".join(intro) + "\n\n" + "\n".join(lines) + "\n"


def run_comparison(output_dir: str, tasks=COMPARISON_TASKS, archs=ARCHITECTURES, time_budget_s: float = 60.0,
                   seed: int = 0, progress: bool = False, cache_dir=None,
                   overrides=None) -> tuple[list[dict], str]:  # fmt: skip
    """Quick presets of every task in `tasks` for every arch in `archs`, each for the same `time_budget_s`, in
    `output_dir/<task>/<arch>/`; writes `comparison.md` (the table) and `comparison.json` (the results without
    curves) to `output_dir`. A task whose data source is not installed (`TaskSourceMissing`) is noted in the table
    and skipped. Returns (results, table)."""
    os.makedirs(output_dir, exist_ok=True)
    results, notes = [], {}
    for task in tasks:
        for arch in archs:
            try:
                result = run_experiment(task, arch, "quick", os.path.join(output_dir, task, arch), seed=seed,
                                        time_budget_s=time_budget_s, progress=progress, cache_dir=cache_dir,
                                        overrides=overrides, save_model=False)  # fmt: skip
            except TaskSourceMissing as error:
                notes[task] = f"skipped: {error}".replace("|", "/").replace("\n", " ")
                break
            results.append(result)
            test = result["metrics"]["test"].get(result["metric"])
            print(f"{task:>14} {arch:>10}: test {result['metric']} {format_metric(test, result['metric'])} | "
                  f"{result['steps']} steps | {result['params']} params | {result['wall_time_s']:.0f} s wall",
                  flush=True)  # fmt: skip
    table = comparison_table(results, time_budget_s, notes, archs)
    if results:
        plot_comparison(results, os.path.join(output_dir, "comparison.png"))
    with open(os.path.join(output_dir, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(table)
    write_json(os.path.join(output_dir, "comparison.json"), [{k: v for k, v in r.items() if k != "curve"}
                                                              for r in results])  # fmt: skip
    return results, table


__all__ = ["COMPARISON_TASKS", "PUBLISHED", "comparison_table", "format_metric", "run_comparison"]
