"""The figures of the experiments: a run's learning curve (`plot_curve`, `curve.png`) and the comparison's validation
metric against training time (`plot_comparison`, `comparison.png`); files only, with matplotlib's Agg backend."""

from __future__ import annotations

from collections.abc import Mapping

from .models import ARCHITECTURE_LABELS


def pyplot():
    """`matplotlib.pyplot` on the Agg backend: figures go to files and never need a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(results: Mapping, path: str) -> None:
    """Training loss and the validation metric against the step, side by side."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    label = f"{ARCHITECTURE_LABELS[results['arch']]} ({results['params'] / 1e3:.0f}k params)"
    curve, metric = results["curve"], results["metric"]
    if curve["train_loss"]:
        steps, losses = zip(*curve["train_loss"])
        left.plot(steps, losses, label=label)
    left.set(xlabel="step", ylabel="training loss", title=f"{results['task']}: training loss")
    points = [(e["step"], e[metric]) for e in curve["evaluations"] if metric in e]
    if points:
        steps, values = zip(*points)
        right.plot(steps, values, marker="o", label=label)
    right.set(xlabel="step", ylabel=f"validation {metric}", title=f"{results['task']}: validation {metric}")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.lines:  # a run shorter than one logging interval has no loss points
            axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(results: list[Mapping], path: str) -> None:
    """One panel per task: each architecture's validation metric against its training time. A budgeted run evaluates
    at equal fractions of its budget (`BudgetClock`) and once more at the end, so evaluation k of n sits at k/n of the
    training time."""
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in results))
    columns = min(4, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, task in zip(axes.flat, tasks):
        for result in (r for r in results if r["task"] == task):
            metric = result["metric"]
            values = [e[metric] for e in result["curve"]["evaluations"] if metric in e]
            times = [result["train_time_s"] * (k + 1) / len(values) for k in range(len(values))]
            label = f"{ARCHITECTURE_LABELS[result['arch']]} ({result['params'] / 1e3:.0f}k)"
            axis.plot(times, [100 * v if metric == "accuracy" else v for v in values], marker="o", label=label)
            axis.set(title=task, xlabel="training time (s)",
                     ylabel="val. accuracy (%)" if metric == "accuracy" else "val. bits/byte")  # fmt: skip
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(tasks) :]:
        axis.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["plot_comparison", "plot_curve", "pyplot"]
