"""Tests of the quality suite (`longvq.experiments.suite`, `longvq-compare --suite`): the tiny suite end to end (once
per module, with a forced learning-rate winner), resumption, the parameter-parity check, the worker pool, the summary
and table on hand-made results, the test bits per byte by position, and the command line."""

import dataclasses
import json
import math

import numpy as np
import pytest

import longvq.cli
from longvq.experiments import BASELINES, bpb_by_position, compare_main, llama_config, run_experiment
from longvq.experiments import suite as suite_module
from longvq.experiments.suite import SUITES, Suite, SuiteEntry, run_suite, suite_table, summarize_suite

TINY = SUITES["tiny"]
WINNER = 3e-3  # the learning rate the fixture makes best by validation metric (the tie-break would pick 1e-3)
RUN_DIRS = ("lr0.001-seed0", "lr0.003-seed0", "lr0.003-seed1")  # phase 1 at both rates, phase 2 at the winner


def forced_winner(*args, overrides, **kwargs):
    """`run_experiment` whose validation metric makes `WINNER` the best learning rate."""
    result = run_experiment(*args, overrides=overrides, **kwargs)
    wins = overrides["train.learning_rate"] == WINNER
    better, worse = (0.9, 0.1) if result["higher_is_better"] else (1.0, 2.0)
    result["metrics"]["validation"][result["metric"]] = better if wins else worse
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny suite run once in this process (workers=1) into a temporary folder, with a forced winner."""
    root = tmp_path_factory.mktemp("suite")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(suite_module, "run_experiment", forced_winner)
        results = run_suite(TINY, str(root / "out"), workers=1, cache_dir=str(root / "cache"))
    return root / "out", str(root / "cache"), results


def test_tiny_suite_end_to_end(tiny_run):
    out, _, results = tiny_run
    assert len(results) == len(TINY.entries) * len(TINY.archs) * len(RUN_DIRS)
    for entry in TINY.entries:
        for arch in TINY.archs:
            runs = sorted(p.name for p in (out / entry.name / arch).iterdir())
            assert runs == sorted(RUN_DIRS)  # phase 2 ran at the phase-1 winner only
            record = json.loads((out / entry.name / arch / "lr0.003-seed1" / "results.json").read_text())["suite"]
            assert record == {"name": "tiny", "entry": entry.name, "learning_rate": WINNER, "workers": 1,
                              "budget_scale": 1.0, "threads": record["threads"]}  # fmt: skip
    for name in ("suite.md", "suite_curves.png", "position_bpb.png"):
        assert (out / name).stat().st_size > 500
    saved = json.loads((out / "suite.json").read_text())
    assert len(saved["results"]) == len(results) and not any("curve" in r for r in saved["results"])
    entries = saved["summary"]["entries"]
    assert [e["name"] for e in entries] == ["lm_tiny", "mqar_tiny"]
    assert all(s["learning_rate"] == WINNER and s["seeds"] == [0, 1] for e in entries for s in e["archs"].values())
    table = (out / "suite.md").read_text()
    assert "| lm_tiny |" in table and "| mqar_tiny |" in table and "LongVQ >= MEGA-chunk" in table


def test_resumption_reruns_only_missing_runs(tiny_run, monkeypatch, capsys):
    out, cache, _ = tiny_run
    (out / "mqar_tiny" / "llama" / "lr0.003-seed1" / "results.json").unlink()
    calls = []

    def counted(*args, **kwargs):
        calls.append((args[1], kwargs["seed"], kwargs["overrides"]["train.learning_rate"]))
        return forced_winner(*args, **kwargs)

    monkeypatch.setattr(suite_module, "run_experiment", counted)
    results = run_suite(TINY, str(out), workers=1, cache_dir=cache)
    assert calls == [("llama", 1, WINNER)]
    assert len(results) == 18 and capsys.readouterr().out.count("skipped: results.json exists") == 17


def test_parameter_parity_is_checked(tiny_run, tmp_path, monkeypatch):
    def wider(reference):
        config = llama_config(reference)
        config.intermediate_size *= 2
        return config

    monkeypatch.setitem(BASELINES, "llama", dataclasses.replace(BASELINES["llama"], config=wider))
    with pytest.raises(ValueError, match="Suite entry 'mqar_tiny': Llama has"):
        run_suite(TINY, str(tmp_path), workers=1, entries=["mqar_tiny"], cache_dir=tiny_run[1])
    assert not (tmp_path / "mqar_tiny").exists()


def test_worker_pool(tiny_run, tmp_path):
    results = run_suite(TINY, str(tmp_path), workers=2, entries=["mqar_tiny"], archs=["llama"], cache_dir=tiny_run[1])
    assert sorted((r["seed"], r["suite"]["learning_rate"]) for r in results)[:2] == [(0, 1e-3), (0, 3e-3)]
    assert len(results) == 3 and all(r["suite"]["threads"] == 1 and r["suite"]["workers"] == 2 for r in results)


def test_bpb_by_position_of_a_run(tiny_run):
    for result in (r for r in tiny_run[2] if r["kind"] == "lm"):
        by_position = result["bpb_by_position"]
        edges, bpb = np.asarray(by_position["bin_edges"]), np.asarray(by_position["bpb"])
        assert len(bpb) == 16 and edges[0] == 0 and edges[-1] == 63 and np.isfinite(bpb).all()
        assert np.average(bpb, weights=np.diff(edges)) == pytest.approx(result["metrics"]["test"]["bpb"], abs=1e-4)
    assert not any("bpb_by_position" in r for r in tiny_run[2] if r["kind"] != "lm")


def test_bpb_by_position_by_hand():
    nll = np.array([[1.0, 2.0, 3.0, 4.0, 0.0], [5.0, 6.0, 7.0, 8.0, 0.0]])
    labels = np.array([[9, 9, -100, 9, 9], [9, 9, 9, 9, -100]])  # position t scores labels[t + 1]
    out = bpb_by_position(nll, labels, num_bins=2)
    assert out["bin_edges"] == [0, 2, 4]
    ln2 = math.log(2)
    assert out["bpb"] == pytest.approx([(1 + 5 + 6) / 3 / ln2, (3 + 4 + 7) / 3 / ln2])


# ---------------------------------------------------------------------------------------------------------------------
# Summary and table on hand-made results
# ---------------------------------------------------------------------------------------------------------------------


def _run(entry, arch, rate, seed, validation, test, curve, metric="accuracy"):
    """A suite result with the fields the summary reads; `curve` is [(step, validation metric), ...]."""
    return {
        "arch": arch, "seed": seed, "kind": "classification" if metric == "accuracy" else "lm", "metric": metric,
        "higher_is_better": metric == "accuracy", "chance": 0.1 if metric == "accuracy" else None,
        "metrics": {"validation": {metric: validation}, "test": {metric: test}}, "steps": curve[-1][0],
        "curve": {"evaluations": [{"step": s, metric: v} for s, v in curve]}, "tokens_trained": 1000 * curve[-1][0],
        "params": 5000, "time_budget_s": 30.0, "codebook": {"mean_usage": 0.5, "perplexity_per_layer": [4.0, 6.0]}
        if arch != "llama" else None,
        "suite": {"name": "hand", "entry": entry, "learning_rate": rate, "workers": 2, "threads": 1,
                  "budget_scale": 1.0},
    }  # fmt: skip


def _entry(name, long_range):
    return SuiteEntry(name, "mqar", {}, 30.0, None, (1e-3, 3e-3), long_range, f"{name} task")


def test_summary_and_table_by_hand():
    results = [
        # LongVQ: 3e-3 wins on validation (0.5 > 0.1); its seeds reach steps 100 and 120.
        _run("a", "longvq", 1e-3, 0, 0.1, 0.9, [(50, 0.1), (100, 0.1)]),
        _run("a", "longvq", 3e-3, 0, 0.5, 0.5, [(40, 0.2), (80, 0.4), (100, 0.5)]),
        _run("a", "longvq", 3e-3, 1, 0.6, 0.6, [(50, 0.3), (100, 0.5), (120, 0.6)]),
        # Llama: a NaN validation metric loses; its seeds stop at 60 and 80 steps (60 is the equal-steps point).
        _run("a", "llama", 1e-3, 0, math.nan, 0.0, [(60, math.nan)]),
        _run("a", "llama", 3e-3, 0, 0.2, 0.6, [(30, 0.1), (60, 0.2)]),
        _run("a", "llama", 3e-3, 1, 0.3, 0.6, [(40, 0.2), (80, 0.3)]),
        _run("a", "mega_chunk", 1e-3, 0, 0.4, 0.4, [(45, 0.3), (90, 0.4)]),
        _run("a", "mega_chunk", 1e-3, 1, 0.4, 0.5, [(45, 0.3), (90, 0.4)]),
        # A lower-is-better entry: 1e-3 wins (bpb 1.5 < 2.0); not long-range but LM, so MEGA-chunk is a target.
        _run("b", "longvq", 1e-3, 0, 1.5, 1.4, [(10, 3.0), (20, 1.5)], "bpb"),
        _run("b", "longvq", 3e-3, 0, 2.0, 1.0, [(20, 2.0)], "bpb"),
        _run("b", "mega_chunk", 1e-3, 0, 1.6, 1.5, [(20, 1.6)], "bpb"),
    ]
    suite = Suite("hand", (_entry("a", long_range=True), _entry("b", long_range=False)), seeds=(0, 1))
    summary = summarize_suite(results, suite, notes={"c": "skipped: not installed"})
    a, b = summary["entries"]
    assert a["equal_step"] == 60 and b["equal_step"] == 20
    longvq, llama, mega = (a["archs"][arch] for arch in ("longvq", "llama", "mega_chunk"))
    assert (longvq["learning_rate"], llama["learning_rate"], mega["learning_rate"]) == (3e-3, 3e-3, 1e-3)
    assert (longvq["test_mean"], longvq["test_spread"]) == pytest.approx((0.55, 0.05))
    # At step 60: LongVQ seed 0 between (40, 0.2) and (80, 0.4) -> 0.3; seed 1 between (50, 0.3) and (100, 0.5) ->
    # 0.34. Llama: 0.2 and 0.25. MEGA-chunk: 0.3 + 15/45 * 0.1 for both seeds.
    assert longvq["at_equal_steps"] == pytest.approx(0.32)
    assert llama["at_equal_steps"] == pytest.approx(0.225)
    assert mega["at_equal_steps"] == pytest.approx(0.3 + 0.1 / 3)
    assert longvq["steps"] == 110 and longvq["tokens"] == 110_000 and llama["codebook_usage"] is None
    assert (longvq["codebook_usage"], longvq["codebook_perplexity"]) == (0.5, 5.0)
    assert [(t["target"], t["met"]) for t in a["targets"]] == [("LongVQ >= Llama", False), ("LongVQ >= MEGA-chunk", True)]
    assert [t["margin"] for t in a["targets"]] == pytest.approx([-0.05, 0.1])
    assert b["archs"]["longvq"]["learning_rate"] == 1e-3 and "llama" not in b["archs"]
    assert [(t["target"], t["met"]) for t in b["targets"]] == [("LongVQ >= MEGA-chunk", True)]
    assert b["targets"][0]["margin"] == pytest.approx(0.1)

    table = suite_table(summary)
    row_a = next(line for line in table.splitlines() if line.startswith("| a |"))
    assert "55.0% ± 5.0%" in row_a and "**60.0% ± 0.0%**" in row_a and "45.0% ± 5.0%" in row_a
    assert "32.0% / 22.5% / 33.3% @ step 60" in row_a and "110 / 70 / 90" in row_a and "30 s" in row_a
    assert "0.003 / 0.003 / 0.001" in row_a and "LongVQ 50% / 5.0; MEGA-chunk 50% / 5.0" in row_a
    row_b = next(line for line in table.splitlines() if line.startswith("| b |"))
    assert "**1.400 ± 0.000**" in row_b and "| – |" in row_b
    assert "- a: LongVQ >= Llama at equal time: **missed** (margin -5.0 points" in table
    assert "- a: LongVQ >= MEGA-chunk at equal time: **met** (margin +10.0 points" in table
    assert "- b: LongVQ >= MEGA-chunk at equal time: **met** (margin +0.100 bits/byte" in table
    assert "- c: skipped: not installed" in table and "2 worker(s)" in table and "seeds 0, 1" in table


def test_metric_at_step_does_not_extrapolate_backwards():
    result = _run("a", "longvq", 1e-3, 0, 0.5, 0.5, [(40, 0.2), (80, 0.4), (80, 0.6)])
    assert suite_module.metric_at_step(result, 30) is None
    assert suite_module.metric_at_step(result, 60) == pytest.approx(0.4)  # the last evaluation of a step counts


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_suite(tiny_run, capsys):
    out, cache, _ = tiny_run
    argv = ["--suite", "tiny", "--output-dir", str(out), "--workers", "1", "--cache-dir", cache]
    table = compare_main(argv)  # every run exists: read, not re-run
    assert table == (out / "suite.md").read_text() and "| mqar_tiny |" in capsys.readouterr().out
    (out / "suite.md").unlink()
    (out / "suite_curves.png").unlink()
    assert compare_main(["--suite", "tiny", "--output-dir", str(out), "--rebuild-table"]) == table
    assert (out / "suite.md").read_text() == table and (out / "suite_curves.png").exists()


def test_cli_suite_bad_input(tmp_path, capsys):
    assert longvq.cli.compare(["--suite", "tiny", "--entries", "nope", "--output-dir", str(tmp_path)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("longvq-compare: error: Unknown entries nope") and "\n" not in error
    with pytest.raises(SystemExit) as exit_info:
        compare_main(["--suite", "huge"])
    assert exit_info.value.code != 0
