"""Console scripts: every `longvq-*` entry point goes through `longvq.cli.run_command`, exits 0 on success whatever the
command returns, and 1 with one `longvq-<name>: error: <reason>` line (no traceback) on an expected error."""

import importlib.util
import json
from importlib.metadata import distribution
from pathlib import Path

import pytest

from longvq import cli
from longvq.tasks import TaskSourceMissing

CONSOLE_SCRIPTS = {
    "longvq-demo", "longvq-benchmark", "longvq-export", "longvq-card", "longvq-train-clm", "longvq-train",
    "longvq-eval", "longvq-compare",
}  # fmt: skip


def test_every_installed_console_script_is_a_cli_function():
    scripts = {ep.name: ep for ep in distribution("longvq").entry_points if ep.group == "console_scripts"}
    assert set(scripts) == CONSOLE_SCRIPTS
    for name, entry_point in scripts.items():
        function = entry_point.load()
        assert function.__module__ == "longvq.cli", f"{name} bypasses run_command: {entry_point.value}"


def test_no_script_shadows_an_importable_module():
    # `python scripts/NAME.py` puts scripts/ first on sys.path, so a scripts/evaluate.py replaced the `evaluate` package
    # for everything the scripts import (train_clm.py under torchrun failed on `evaluate.combine`).
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    names = [path.stem for path in scripts.glob("*.py")]
    assert "train_clm" in names
    assert [name for name in names if importlib.util.find_spec(name) is not None] == []


def test_success_is_status_zero_whatever_main_returns():
    for result in ({"metrics": 1}, "a table", None, 3):
        assert cli.run_command("x", lambda argv, result=result: result, ["--flag"]) == 0


@pytest.mark.parametrize(
    "error", [ValueError("bad\n  value"), FileNotFoundError("no such\nfile"), TaskSourceMissing("apt-get\ninstall x")]
)
def test_expected_errors_are_status_one_and_one_line(error, capsys):
    def main(argv):
        raise error

    assert cli.run_command("thing", main) == 1
    captured = capsys.readouterr()
    reason = " ".join(str(error).split())
    assert captured.err == f"longvq-thing: error: {reason}\n" and captured.out == ""


def test_other_exceptions_are_bugs_and_propagate():
    def main(argv):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        cli.run_command("thing", main)


def test_train_eval_compare_card_commands(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.train([
        "--task", "mqar", "--output-dir", str(run), "--max-steps", "2", "--set", "data.num_train=16",
        "--set", "data.num_validation=8", "--set", "data.num_test=8", "--no-progress", "--no-save-model",
        "--cache-dir", str(tmp_path / "cache"),
    ]) == 0  # fmt: skip
    assert "mqar / LongVQ" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2

    (tmp_path / "comparison.json").write_text(json.dumps([results]))
    assert cli.compare(["--output-dir", str(tmp_path), "--rebuild-table"]) == 0
    assert "| mqar |" in (tmp_path / "comparison.md").read_text()

    card = tmp_path / "card" / "README.md"
    assert cli.card(["--model-name", "m", "--out", str(card)]) == 0
    assert "## How to use" in card.read_text()
    capsys.readouterr()

    assert cli.card(["--model-name", "m", "--out", str(card), "--results", str(tmp_path / "missing.json")]) == 1
    assert cli.export([str(tmp_path / "no-checkpoint"), str(tmp_path / "out")]) == 1
    assert cli.train_clm(["--output_dir", str(tmp_path / "clm"), "--model_name_or_path", str(tmp_path / "none")]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3
    assert errors[0].startswith("longvq-card: error: ") and "missing.json" in errors[0]
    assert errors[1].startswith("longvq-export: error: ") and "no-checkpoint" in errors[1]
    assert errors[2] == f"longvq-train-clm: error: --model_name_or_path '{tmp_path / 'none'}' is not a checkpoint folder"
