"""Console scripts: every `longvq-*` entry point goes through `longvq.cli.run_command`, exits 0 on success whatever the
command returns, and 1 with one `longvq-<name>: error: <reason>` line (no traceback) on an expected error."""

import json
import subprocess
import sys
from importlib.metadata import distribution

import pytest

from longvq import cli
from longvq.tasks import TaskSourceMissing

CONSOLE_SCRIPTS = {
    "longvq-demo", "longvq-benchmark", "longvq-export", "longvq-verify", "longvq-card", "longvq-train-clm",
    "longvq-train", "longvq-eval", "longvq-compare",
}  # fmt: skip


def test_every_installed_console_script_is_a_cli_function():
    scripts = {ep.name: ep for ep in distribution("longvq").entry_points if ep.group == "console_scripts"}
    assert set(scripts) == CONSOLE_SCRIPTS
    for name, entry_point in scripts.items():
        function = entry_point.load()
        assert function.__module__ == "longvq.cli", f"{name} bypasses run_command: {entry_point.value}"


def test_train_clm_runs_as_a_module_with_the_console_scripts_exit_status(tmp_path):
    # Launchers start longvq-train-clm as `-m longvq.training` (torchrun -m, accelerate launch -m): the same parser
    # and the same exit status as the console script.
    def run(*arguments):
        command = [sys.executable, "-m", "longvq.training", *arguments]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)

    help_text = run("--help")
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: longvq-train-clm")
    missing = tmp_path / "none"
    failed = run("--output_dir", str(tmp_path / "clm"), "--model_name_or_path", str(missing))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    reason = f"longvq-train-clm: error: --model_name_or_path '{missing}' is not a checkpoint folder"
    assert failed.stderr.splitlines()[-1] == reason


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
