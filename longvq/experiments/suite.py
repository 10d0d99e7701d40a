"""The quality suite (`longvq-compare --suite standard`): several tasks, each trained for LongVQ, a same-size Llama
and MEGA-chunk at equal parameters and equal training time, with the same learning-rate sweep for every
architecture and several seeds; per-run results, one markdown table, the targets met or missed, and plots.

Protocol (`run_suite`): phase 1 trains every entry and architecture with the first seed at every learning rate of
the entry's sweep; the best learning rate per entry and architecture is the one with the best *validation* metric;
phase 2 trains the other seeds at that learning rate. Runs go to `<output_dir>/<entry>/<arch>/lr<lr>-seed<seed>/`
(`results.json`, `curve.png`); a run whose `results.json` exists is read instead of re-run, so an interrupted suite
resumes where it stopped. Runs execute in a pool of worker processes with one thread each, so that runs side by side
see the same contention. `summarize_suite` / `suite_table` report the test metric as mean ± half the range over
seeds, the metric at equal steps, the parameters, steps and tokens, and the targets (LongVQ >= Llama everywhere;
LongVQ >= MEGA-chunk on long-range and language-modelling entries).

The suites (`SUITES`) are plain data below: `standard` (CPU-sized models, minutes per run) and `tiny` (seconds; CI).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..tasks.common import TaskSourceMissing
from ..tasks.text import source_location
from .baselines import count_parameters
from .compare import format_metric
from .data import build_datasets, resolve_info, task_info
from .models import ARCHITECTURE_LABELS, ARCHITECTURES, build_model, check_arch
from .plots import plot_position_bpb, plot_suite_curves
from .presets import LONG_SPLITS, SMALL_SPLITS, TRAIN_DEFAULTS, quick_preset
from .run import RESULTS_FILE, run_experiment, write_json

# ---------------------------------------------------------------------------------------------------------------------
# The suites, as data
# ---------------------------------------------------------------------------------------------------------------------

# The sweep, the same for every architecture. At these budgets (a few hundred steps) high rates win: LongVQ at 1K
# bytes reached 3.29 / 3.27 / 3.21 / 3.14 bits per byte after 150 steps at 1e-3 / 3e-3 / 6e-3 / 1e-2 (docs/quality.md).
LEARNING_RATES = (3e-3, 1e-2)
PARAMETER_TOLERANCE = 0.01  # every baseline within 1% of LongVQ's parameter count

# Byte-level LM: 4 layers of width 128 (about 0.9M parameters). Other tasks: the quick model (QUICK_MODEL of presets,
# about 0.12M parameters) with chunks of 32, so the attention window (current and previous chunk, 64 tokens) is
# shorter than most dependencies of the tasks (MQAR's query gaps, ListOps' nesting, an image's rows).
LM_MODEL = {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 256, "shared_representation_size": 64,
            "codebook_size": 64, "chunk_size": 128}  # fmt: skip
OTHER_MODEL = {"chunk_size": 32}
# Seconds of optimizer steps per run, per family.
BUDGETS_S = {"lm": 150.0, "mqar": 60.0, "listops": 90.0, "fashion_mnist": 60.0, "pathfinder": 90.0, "speech": 60.0}
LM_MAX_BYTES = 2_000_000  # of text per LM entry: 90/5/5 train / validation / test
MQAR_VOCAB = 256  # keys and values from 256 tokens, so the embedding does not dwarf the rest of the model
TINY_MODEL = {"hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 32, "shared_representation_size": 8,
              "ema_projection_size": 4, "codebook_size": 8, "chunk_size": 8}  # fmt: skip
TINY_TRAIN = {"batch_size": 8, "eval_batch_size": 32, "warmup_steps": 1, "logging_steps": 1, "num_evaluations": 2}
TINY_SPLITS = {"num_train": 64, "num_validation": 32, "num_test": 32}
TINY_LEARNING_RATES = (1e-3, 3e-3)


@dataclass(frozen=True)
class SuiteEntry:
    """One task of a suite: its `preset` (model / data / train sections, as `quick_preset` builds them), its budget
    (`time_budget_s` seconds of optimizer steps, or `max_steps` steps), the learning-rate sweep, whether LongVQ is
    expected to beat MEGA-chunk there (`long_range`), and a one-line description for the table."""

    name: str
    task: str
    preset: Mapping
    time_budget_s: float | None
    max_steps: int | None
    learning_rates: tuple[float, ...]
    long_range: bool
    description: str


@dataclass(frozen=True)
class Suite:
    """A named list of entries, the seeds (the first one picks the learning rate) and the architectures."""

    name: str
    entries: tuple[SuiteEntry, ...]
    seeds: tuple[int, ...] = (0, 1)
    archs: tuple[str, ...] = ARCHITECTURES


def suite_entry(name: str, task: str, description: str, *, model: Mapping, data: Mapping, train: Mapping = (),
                time_budget_s: float | None = None, max_steps: int | None = None,
                learning_rates: Sequence[float] = LEARNING_RATES, long_range: bool = False) -> SuiteEntry:  # fmt: skip
    """A `SuiteEntry` whose preset is `quick_preset(model, data, train)` with the entry's budget."""
    budget = {"time_budget_s": time_budget_s, "max_steps": max_steps or TRAIN_DEFAULTS["max_steps"]}
    preset = quick_preset(model=model, data=data, train={**dict(train), **budget})
    return SuiteEntry(name, task, preset, time_budget_s, max_steps, tuple(learning_rates), long_range, description)


def lm_sources() -> tuple[str, ...]:
    """The text of the LM entries: Shakespeare and the King James Bible, with GCIDE and the Python docs first when
    they are installed."""
    optional = []
    for name in ("gcide", "python_docs"):
        with contextlib.suppress(TaskSourceMissing):
            source_location(name)
            optional.append(name)
    return (*optional, "shakespeare", "kjv")


def standard_suite() -> Suite:
    """The standard suite: byte-level LM at 1K and 4K bytes, MQAR at two sizes, ListOps, Fashion-MNIST, Pathfinder
    and spoken keywords; CPU-sized models, one to two and a half minutes of training per run."""
    sources = lm_sources()
    lm_data = {"source": sources, "max_bytes": LM_MAX_BYTES}
    text = f"byte-level LM ({', '.join(sources)})"
    return Suite("standard", (
        suite_entry("lm_1k", "text_lm", f"{text}, 1,024-byte windows", model=LM_MODEL,
                    data={**lm_data, "block_size": 1024}, train={"batch_size": 4, "eval_batch_size": 8},
                    time_budget_s=BUDGETS_S["lm"]),
        suite_entry("lm_4k", "text_lm", f"{text}, 4,096-byte windows", model=LM_MODEL,
                    data={**lm_data, "block_size": 4096}, train={"batch_size": 1, "eval_batch_size": 2},
                    time_budget_s=BUDGETS_S["lm"]),
        suite_entry("mqar_256_16", "mqar", "MQAR, 256 tokens, 16 key-value pairs", model=OTHER_MODEL,
                    data={**SMALL_SPLITS, "vocab_size": MQAR_VOCAB, "seq_len": 256, "num_kv_pairs": 16},
                    time_budget_s=BUDGETS_S["mqar"], long_range=True),
        suite_entry("mqar_512_64", "mqar", "MQAR, 512 tokens, 64 key-value pairs", model=OTHER_MODEL,
                    data={**SMALL_SPLITS, "vocab_size": MQAR_VOCAB, "seq_len": 512, "num_kv_pairs": 64},
                    time_budget_s=BUDGETS_S["mqar"], long_range=True),
        suite_entry("listops", "listops", "ListOps, 500-2,000 tokens", model=OTHER_MODEL,
                    data={**LONG_SPLITS, "min_length": 500, "max_length": 2000},
                    train={"batch_size": 8, "eval_batch_size": 16}, time_budget_s=BUDGETS_S["listops"],
                    long_range=True),
        suite_entry("fashion_mnist", "fashion_mnist", "sequential Fashion-MNIST, 784 pixel tokens",
                    model=OTHER_MODEL, data=LONG_SPLITS, train={"batch_size": 16},
                    time_budget_s=BUDGETS_S["fashion_mnist"], long_range=True),
        suite_entry("pathfinder", "pathfinder", "Pathfinder 32 x 32, 1,024 pixel tokens", model=OTHER_MODEL,
                    data={**LONG_SPLITS, "resolution": 32}, train={"batch_size": 16},
                    time_budget_s=BUDGETS_S["pathfinder"], long_range=True),
        suite_entry("speech", "speech", "spoken keywords, raw audio pooled 8x (2,000 steps)", model=OTHER_MODEL,
                    data={"downsample": 8}, train={"batch_size": 16}, time_budget_s=BUDGETS_S["speech"]),
    ))  # fmt: skip


def tiny_suite() -> Suite:
    """Two tiny entries (the embedded LM corpus, a small MQAR) of three steps each: the whole protocol in seconds."""
    return Suite("tiny", (
        suite_entry("lm_tiny", "text_lm", "byte-level LM (embedded corpus), 64-byte windows", model=TINY_MODEL,
                    data={"source": "embedded", "block_size": 64}, train=TINY_TRAIN, max_steps=3,
                    learning_rates=TINY_LEARNING_RATES),
        suite_entry("mqar_tiny", "mqar", "MQAR, 32 tokens, 2 key-value pairs", model=TINY_MODEL,
                    data={**TINY_SPLITS, "vocab_size": 32, "seq_len": 32, "num_kv_pairs": 2}, train=TINY_TRAIN,
                    max_steps=3, learning_rates=TINY_LEARNING_RATES, long_range=True),
    ))  # fmt: skip


SUITES: dict[str, Suite] = {"standard": standard_suite(), "tiny": tiny_suite()}

# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------


def select_entries(suite: Suite, names: Sequence[str] | None) -> tuple[SuiteEntry, ...]:
    """The entries of `suite` named in `names` (all of them for None); ValueError naming unknown ones."""
    if names is None:
        return suite.entries
    known = {entry.name: entry for entry in suite.entries}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"Unknown entries {', '.join(unknown)} of suite {suite.name!r}; choose from {', '.join(known)}."
        )
    return tuple(entry for entry in suite.entries if entry.name in names)


def check_parameter_parity(entry: SuiteEntry, info, archs: Sequence[str]) -> dict[str, int]:
    """The parameter count of every arch for `entry` (built on the meta device); ValueError naming the entry when a
    baseline is more than `PARAMETER_TOLERANCE` away from LongVQ."""
    with torch.device("meta"):
        models = dict.fromkeys(("longvq", *archs))  # LongVQ once, even when `archs` names it
        counts = {arch: count_parameters(build_model(arch, info, entry.preset)) for arch in models}
    reference = counts["longvq"]
    for arch, count in counts.items():
        if abs(count - reference) > PARAMETER_TOLERANCE * reference:
            raise ValueError(
                f"Suite entry {entry.name!r}: {ARCHITECTURE_LABELS[arch]} has {count:,} parameters, LongVQ "
                f"{reference:,} (more than {PARAMETER_TOLERANCE:.0%} apart); change the entry's model."
            )
    return counts


def _prepare(entries, seeds, archs, cache_dir) -> tuple[list[SuiteEntry], dict[str, str]]:
    """Build every entry's data for every seed (so worker processes only read the cache) and check parameter parity.
    Returns the entries whose data could be built, and a note per entry whose source is not installed."""
    ready, notes = [], {}
    for entry in entries:
        info = task_info(entry.task)
        try:
            built = [build_datasets(info, entry.preset, seed=seed, cache_dir=cache_dir) for seed in seeds]
        except TaskSourceMissing as error:
            notes[entry.name] = f"skipped: {' '.join(str(error).split())}"
            print(f"{entry.name}: {notes[entry.name]}", flush=True)
            continue
        check_parameter_parity(entry, resolve_info(info, *built[0]), archs)
        ready.append(entry)
    return ready, notes


def _init_worker() -> None:
    torch.set_num_threads(1)


def _run_job(job: Mapping) -> dict:
    """One run of a suite (in a worker process or in-process): `run_experiment`, then its `results.json` rewritten
    with the suite record (suite, entry, learning rate, workers, threads, budget scale)."""
    result = run_experiment(job["task"], job["arch"], job["preset"], job["output_dir"], seed=job["seed"],
                            time_budget_s=job["time_budget_s"], max_steps=job["max_steps"],
                            overrides={"train.learning_rate": job["learning_rate"]}, cache_dir=job["cache_dir"],
                            progress=job["progress"], save_model=False)  # fmt: skip
    result["suite"] = {**job["record"], "threads": torch.get_num_threads()}
    write_json(os.path.join(job["output_dir"], RESULTS_FILE), result)
    return result


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _print_run(result: Mapping, status: str = "") -> None:
    metric, record = result["metric"], result["suite"]
    validation = result["metrics"]["validation"].get(metric)
    test = result["metrics"]["test"].get(metric)
    print(f"{record['entry']:>14} {ARCHITECTURE_LABELS[result['arch']]:>10} lr {record['learning_rate']:<6g} "
          f"seed {result['seed']}: val {metric} {format_metric(validation, metric)} | test "
          f"{format_metric(test, metric)} | {result['steps']} steps | {result['train_time_s']:.1f} s train | "
          f"{result['wall_time_s']:.0f} s wall{status}", flush=True)  # fmt: skip


def _execute(jobs: list[dict], pool) -> list[dict]:
    """Run `jobs` (in `pool`, or in-process when it is None), reading the runs whose results.json exists instead."""
    results, pending = [], []
    for job in jobs:
        path = os.path.join(job["output_dir"], RESULTS_FILE)
        if os.path.exists(path):
            result = _read_json(path)
            result.setdefault("suite", job["record"])
            _print_run(result, " (skipped: results.json exists)")
            results.append(result)
        else:
            pending.append(job)
    for result in pool.imap_unordered(_run_job, pending) if pool else map(_run_job, pending):
        _print_run(result)
        results.append(result)
    return results


def _validation_score(result: Mapping) -> float:
    """The run's validation metric, oriented so that larger is better; a missing or NaN value is the worst."""
    value = result["metrics"]["validation"].get(result["metric"])
    if value is None or math.isnan(value):
        return -math.inf
    return value if result["higher_is_better"] else -value


def best_learning_rate(runs: Sequence[Mapping]) -> float:
    """The learning rate (suite record) of the run with the best validation metric; on a tie, the first run's."""
    return max(runs, key=_validation_score)["suite"]["learning_rate"]


def best_runs(results: Sequence[Mapping], suite: Suite) -> dict[tuple[str, str], list[Mapping]]:
    """Per (entry, arch): the runs of every seed at the learning rate whose first-seed run has the best validation
    metric (the runs the suite reports)."""
    chosen = {}
    for entry in suite.entries:
        for arch in suite.archs:
            runs = [r for r in results if r["suite"]["entry"] == entry.name and r["arch"] == arch]
            first = [r for r in runs if r["seed"] == suite.seeds[0]]
            if first:
                rate = best_learning_rate(first)
                chosen[entry.name, arch] = [r for r in runs if r["suite"]["learning_rate"] == rate]
    return chosen


def run_suite(suite: Suite | str, output_dir: str, workers: int = 2, budget_scale: float = 1.0,
              entries: Sequence[str] | None = None, archs: Sequence[str] | None = None, cache_dir=None,
              progress: bool = False) -> list[dict]:  # fmt: skip
    """Run `suite` (a `Suite` or a name in `SUITES`) into `output_dir` by the protocol of the module docstring, in a
    pool of `workers` processes of one thread each (`workers=1`: in this process); `budget_scale` multiplies every
    time budget; `entries` / `archs` select a subset. Builds every entry's data first (an entry whose source is not
    installed is noted and skipped) and checks parameter parity (ValueError naming the entry). Prints one line per
    run; writes `suite.json`, `suite.md`, `suite_curves.png` and `position_bpb.png` (`write_suite_report`). Returns
    the results of every run."""
    suite = SUITES[suite] if isinstance(suite, str) else suite
    chosen = select_entries(suite, entries)
    archs = tuple(archs or suite.archs)
    for arch in archs:
        check_arch(arch)
    if workers < 1 or not budget_scale > 0:
        raise ValueError(f"`workers` must be >= 1 and `budget_scale` > 0, got {workers} and {budget_scale}.")
    suite = dataclasses.replace(suite, entries=chosen, archs=archs)
    os.makedirs(output_dir, exist_ok=True)
    ready, notes = _prepare(chosen, suite.seeds, archs, cache_dir)

    def job(entry: SuiteEntry, arch: str, rate: float, seed: int) -> dict:
        """What `_run_job` needs for one run, and the suite record it adds to the results."""
        return {
            "task": entry.task, "arch": arch, "preset": entry.preset, "seed": seed, "learning_rate": rate,
            "time_budget_s": entry.time_budget_s * budget_scale if entry.time_budget_s else None,
            "max_steps": entry.max_steps, "cache_dir": cache_dir, "progress": progress,
            "output_dir": os.path.join(output_dir, entry.name, arch, f"lr{rate:g}-seed{seed}"),
            "record": {"name": suite.name, "entry": entry.name, "learning_rate": rate, "workers": workers,
                       "budget_scale": budget_scale},
        }  # fmt: skip

    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker) if workers > 1 else None
    with pool or contextlib.nullcontext():
        first = _execute([job(e, a, rate, suite.seeds[0]) for e in ready for a in archs for rate in e.learning_rates],
                         pool)  # fmt: skip
        rates = {key: runs[0]["suite"]["learning_rate"] for key, runs in best_runs(first, suite).items()}
        rest = _execute([job(e, a, rates[e.name, a], seed) for e in ready for a in archs for seed in suite.seeds[1:]],
                        pool)  # fmt: skip
    results = first + rest
    write_suite_report(results, suite, output_dir, notes)
    return results


def load_suite_results(output_dir: str, suite: Suite) -> list[dict]:
    """The results of `suite`'s runs under `output_dir` (the per-run results.json files); ValueError if none."""
    results = []
    for path in sorted(glob.glob(os.path.join(output_dir, "*", "*", "*", RESULTS_FILE))):
        result = _read_json(path)
        if result.get("suite", {}).get("name") == suite.name:
            results.append(result)
    if not results:
        raise ValueError(f"No results of suite {suite.name!r} under {output_dir}.")
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Summary and table
# ---------------------------------------------------------------------------------------------------------------------


def metric_at_step(result: Mapping, step: float) -> float | None:
    """The run's validation metric at `step`, linearly interpolated in its evaluation curve (the last evaluation of
    a step counts); None before its first evaluation."""
    metric = result["metric"]
    points = {e["step"]: e[metric] for e in result["curve"]["evaluations"] if metric in e}
    steps = sorted(points)
    if not steps or step < steps[0]:
        return None
    return float(np.interp(step, steps, [points[s] for s in steps]))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _arch_summary(runs: Sequence[Mapping], equal_step: int) -> dict:
    metric = runs[0]["metric"]
    tests = [r["metrics"]["test"].get(metric, math.nan) for r in runs]
    codebooks = [r["codebook"] for r in runs if r.get("codebook")]
    at_step = [metric_at_step(r, equal_step) for r in runs]
    return {
        "learning_rate": runs[0]["suite"]["learning_rate"],
        "seeds": [r["seed"] for r in runs],
        "test_mean": float(np.mean(tests)),
        "test_spread": float(max(tests) - min(tests)) / 2,
        "at_equal_steps": None if None in at_step else _mean(at_step),
        "steps": _mean(r["steps"] for r in runs),
        "tokens": _mean(r["tokens_trained"] for r in runs),
        "params": runs[0]["params"],
        "time_budget_s": runs[0]["time_budget_s"],
        "codebook_usage": _mean(c["mean_usage"] for c in codebooks),
        "codebook_perplexity": _mean(np.mean(c["perplexity_per_layer"]) for c in codebooks),
    }


def _targets(entry: SuiteEntry, kind: str, archs: Mapping[str, dict], higher: bool) -> list[dict]:
    """LongVQ >= Llama, and LongVQ >= MEGA-chunk on long-range and LM entries, on the test means at equal time; the
    margin is positive where LongVQ is better."""
    baselines = ["llama", *(["mega_chunk"] if entry.long_range or kind == "lm" else [])]
    targets = []
    for baseline in (b for b in baselines if b in archs and "longvq" in archs):
        margin = archs["longvq"]["test_mean"] - archs[baseline]["test_mean"]
        margin = margin if higher else -margin
        targets.append({"target": f"LongVQ >= {ARCHITECTURE_LABELS[baseline]}", "baseline": baseline,
                        "met": bool(margin >= 0), "margin": margin})  # fmt: skip
    return targets


def summarize_suite(results: Sequence[Mapping], suite: Suite, notes: Mapping[str, str] | None = None) -> dict:
    """Per entry and arch (the best-LR runs, `best_runs`): the learning rate, the test metric's mean and spread (half
    the range over seeds), the validation metric at equal steps (the largest step every arch's runs reached,
    interpolated in each evaluation curve, averaged over seeds), mean steps and tokens trained, parameters, budget
    and codebook usage / perplexity; the targets of `_targets`; and the run settings (seeds, workers, threads,
    budget scale). `notes` maps skipped entries to why."""
    chosen = best_runs(results, suite)
    records = [r["suite"] for r in results]
    summary = {
        "suite": suite.name, "seeds": list(suite.seeds), "archs": list(suite.archs),
        "workers": sorted({r["workers"] for r in records}),
        "threads": sorted({r.get("threads") for r in records}, key=str),
        "budget_scale": sorted({r["budget_scale"] for r in records}), "notes": dict(notes or {}), "entries": [],
    }  # fmt: skip
    for entry in suite.entries:
        groups = {arch: chosen[entry.name, arch] for arch in suite.archs if (entry.name, arch) in chosen}
        if not groups:
            continue
        any_run = next(iter(groups.values()))[0]
        equal_step = min(r["steps"] for runs in groups.values() for r in runs)
        archs = {arch: _arch_summary(runs, equal_step) for arch, runs in groups.items()}
        summary["entries"].append({
            "name": entry.name, "task": entry.task, "description": entry.description, "metric": any_run["metric"],
            "higher_is_better": any_run["higher_is_better"], "chance": any_run.get("chance"),
            "long_range": entry.long_range, "max_steps": entry.max_steps, "equal_step": equal_step, "archs": archs,
            "targets": _targets(entry, any_run["kind"], archs, any_run["higher_is_better"]),
        })  # fmt: skip
    return summary


def _count(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _per_arch(values: Mapping[str, str], archs: Sequence[str]) -> str:
    return " / ".join(values.get(arch, "–") for arch in archs)


def _margin(value: float, metric: str) -> str:
    return f"{100 * value:+.1f} points" if metric == "accuracy" else f"{value:+.3f} bits/byte"


def suite_table(summary: Mapping) -> str:
    """The markdown report of `summarize_suite`: a header with the protocol and settings, one row per entry, the
    target lines and the skipped entries."""
    archs = summary["archs"]
    labels = [ARCHITECTURE_LABELS[a] for a in archs]
    joined = " / ".join(labels)
    header = ["Entry", "Task", "Metric", "Chance", *labels, f"At equal steps ({joined})", f"Params ({joined})",
              f"Steps ({joined})", f"Tokens seen ({joined})", "Budget", f"Best LR ({joined})",
              "Codebook usage / perplexity"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    targets = []
    for entry in summary["entries"]:
        metric, runs = entry["metric"], entry["archs"]
        means = {a: s["test_mean"] for a, s in runs.items() if not math.isnan(s["test_mean"])}
        best = (max if entry["higher_is_better"] else min)(means.values(), default=None)
        shown = []
        for arch in archs:
            if arch not in runs:
                shown.append("–")
                continue
            mean, spread = runs[arch]["test_mean"], runs[arch]["test_spread"]
            text = f"{format_metric(mean, metric)} ± {format_metric(spread, metric)}"
            # Bold the best only when some other arch is worse (all at chance: nothing in bold).
            is_best = means.get(arch) == best and any(v != best for v in means.values())
            shown.append(f"**{text}**" if is_best else text)
        budget = runs[next(iter(runs))]["time_budget_s"]
        codebooks = [f"{ARCHITECTURE_LABELS[a]} {100 * s['codebook_usage']:.0f}% / {s['codebook_perplexity']:.1f}"
                     for a, s in runs.items() if s["codebook_usage"] is not None]  # fmt: skip
        cells = [
            entry["name"], entry["description"],
            "accuracy" if metric == "accuracy" else "bits/byte (lower is better)",
            format_metric(entry["chance"], metric), *shown,
            _per_arch({a: format_metric(s["at_equal_steps"], metric) for a, s in runs.items()}, archs)
            + f" @ step {entry['equal_step']}",
            _per_arch({a: _count(s["params"]) for a, s in runs.items()}, archs),
            _per_arch({a: f"{s['steps']:.0f}" for a, s in runs.items()}, archs),
            _per_arch({a: _count(s["tokens"]) for a, s in runs.items()}, archs),
            f"{budget:g} s" if budget else f"{entry['max_steps']} steps",
            _per_arch({a: f"{s['learning_rate']:g}" for a, s in runs.items()}, archs),
            "; ".join(codebooks) or "–",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
        for target in entry["targets"]:
            verdict = "met" if target["met"] else "missed"
            targets.append(f"- {entry['name']}: {target['target']} at equal time: **{verdict}** (margin "
                           f"{_margin(target['margin'], metric)}; positive: LongVQ better)")  # fmt: skip
    settings = (
        f"Suite `{summary['suite']}`: seeds {', '.join(map(str, summary['seeds']))}; the learning rate of each entry "
        f"and architecture is the one of the sweep with the best validation metric of seed {summary['seeds'][0]}, "
        f"the other seeds run at it. {' / '.join(map(str, summary['workers']))} worker(s) side by side, "
        f"{' / '.join(map(str, summary['threads']))} thread(s) each; budget scale "
        f"{' / '.join(f'{s:g}' for s in summary['budget_scale'])}. Test metrics as mean ± half the range over seeds "
        f"(best in bold); at equal steps: the validation metric at the largest step every architecture reached."
    )
    skipped = [f"- {name}: {note}" for name, note in summary["notes"].items()]
    parts = [settings, "\n".join(lines)]
    if targets:
        parts.append("Targets:\n\n" + "\n".join(targets))
    if skipped:
        parts.append("Not run:\n\n" + "\n".join(skipped))
    return "\n\n".join(parts) + "\n"


def write_suite_report(results: Sequence[Mapping], suite: Suite, output_dir: str,
                       notes: Mapping[str, str] | None = None) -> str:  # fmt: skip
    """Write `suite.md` (the table), `suite.json` (the summary and every run's results without curves),
    `suite_curves.png` and, with LM entries, `position_bpb.png` into `output_dir`; returns the table."""
    summary = summarize_suite(results, suite, notes)
    table = suite_table(summary)
    with open(os.path.join(output_dir, "suite.md"), "w", encoding="utf-8") as f:
        f.write(table)
    runs = [{k: v for k, v in r.items() if k != "curve"} for r in results]
    write_json(os.path.join(output_dir, "suite.json"), {"summary": summary, "results": runs})
    reported = [r for runs in best_runs(results, suite).values() for r in runs]
    if reported:
        plot_suite_curves(reported, os.path.join(output_dir, "suite_curves.png"))
    if any("bpb_by_position" in r for r in reported):
        plot_position_bpb(reported, os.path.join(output_dir, "position_bpb.png"))
    return table


__all__ = [
    "BUDGETS_S", "LEARNING_RATES", "LM_MODEL", "OTHER_MODEL", "PARAMETER_TOLERANCE", "SUITES", "Suite",
    "SuiteEntry", "best_learning_rate", "best_runs", "check_parameter_parity", "load_suite_results", "lm_sources",
    "metric_at_step", "run_suite", "select_entries", "suite_entry", "suite_table", "summarize_suite",
    "write_suite_report",
]  # fmt: skip
