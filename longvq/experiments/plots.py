"""The figures of the experiments: a run's learning curve (`plot_curve`, `curve.png`), the comparison's validation
metric against training time (`plot_comparison`, `comparison.png`), and the quality suite's validation curves and
test bits per byte by position (`plot_suite_curves`, `plot_position_bpb`); files only, with matplotlib's Agg
backend."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

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


def _panels(plt, count: int):
    """A figure with `count` panels in rows of at most four (the spare ones hidden) and its axes."""
    columns = min(4, count)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis in list(axes.flat)[count:]:
        axis.set_visible(False)
    return fig, list(axes.flat)[:count]


def _save(fig, plt, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _timed_evaluations(result: Mapping) -> tuple[list[float], list[float]]:
    """The validation metric of a run (accuracy in %) against its training time: a budgeted run evaluates at equal
    fractions of its budget (`BudgetClock`) and once more at the end, so evaluation k of n sits at k/n of the
    training time."""
    metric = result["metric"]
    values = [100 * e[metric] if metric == "accuracy" else e[metric]
              for e in result["curve"]["evaluations"] if metric in e]  # fmt: skip
    times = [result["train_time_s"] * (k + 1) / len(values) for k in range(len(values))]
    return times, values


def _validation_label(metric: str) -> str:
    return "val. accuracy (%)" if metric == "accuracy" else "val. bits/byte"


def plot_comparison(results: list[Mapping], path: str) -> None:
    """One panel per task: each architecture's validation metric against its training time (`_timed_evaluations`)."""
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = _panels(plt, len(tasks))
    for axis, task in zip(axes, tasks):
        for result in (r for r in results if r["task"] == task):
            label = f"{ARCHITECTURE_LABELS[result['arch']]} ({result['params'] / 1e3:.0f}k)"
            axis.plot(*_timed_evaluations(result), marker="o", label=label)
            axis.set(title=task, xlabel="training time (s)", ylabel=_validation_label(result["metric"]))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    _save(fig, plt, path)


def _by_entry_and_arch(results: list[Mapping]) -> dict[str, dict[str, list[Mapping]]]:
    groups: dict[str, dict[str, list[Mapping]]] = {}
    for result in results:
        groups.setdefault(result["suite"]["entry"], {}).setdefault(result["arch"], []).append(result)
    return groups


def plot_suite_curves(results: list[Mapping], path: str) -> None:
    """One panel per suite entry: each architecture's validation metric against training time, the mean over its
    runs (the seeds at the chosen learning rate) evaluation by evaluation."""
    plt = pyplot()
    groups = _by_entry_and_arch(results)
    fig, axes = _panels(plt, len(groups))
    for axis, (entry, archs) in zip(axes, groups.items()):
        for arch, runs in archs.items():
            curves = [_timed_evaluations(r) for r in runs]
            length = min(len(values) for _, values in curves)
            times, values = (np.mean([curve[i][:length] for curve in curves], axis=0) for i in (0, 1))
            axis.plot(times, values, marker="o", label=f"{ARCHITECTURE_LABELS[arch]} ({len(runs)} seeds)")
        metric = next(iter(archs.values()))[0]["metric"]
        axis.set(title=entry, xlabel="training time (s)", ylabel=_validation_label(metric))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    _save(fig, plt, path)


def plot_position_bpb(results: list[Mapping], path: str) -> None:
    """One panel per language-modelling suite entry: test bits per byte against the position in the window
    (`bpb_by_position` bins, at their centres), per architecture, the mean over its runs."""
    plt = pyplot()
    groups = _by_entry_and_arch([r for r in results if "bpb_by_position" in r])
    fig, axes = _panels(plt, len(groups))
    for axis, (entry, archs) in zip(axes, groups.items()):
        for arch, runs in archs.items():
            edges = np.asarray(runs[0]["bpb_by_position"]["bin_edges"])
            bpb = np.mean([r["bpb_by_position"]["bpb"] for r in runs], axis=0)
            label = f"{ARCHITECTURE_LABELS[arch]} ({len(runs)} seeds)"
            axis.plot((edges[:-1] + edges[1:]) / 2, bpb, marker=".", label=label)
        axis.set(title=entry, xlabel="position in the window", ylabel="test bits/byte")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    _save(fig, plt, path)


__all__ = ["plot_comparison", "plot_curve", "plot_position_bpb", "plot_suite_curves", "pyplot"]
