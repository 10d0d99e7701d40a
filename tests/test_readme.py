"""The README's commands and snippets, copied as written, work.

Everything runs in a temporary working directory. Shell blocks come first, in order: the two setup commands must be
the ones CI runs (`.ci/run` runs the test command; the wheel session of `ci/matrix.py` runs every console script from
an installed wheel); every other command runs for real, `longvq-*` commands through their console-script functions
(exit status 0 required) and `lm_eval` through its own CLI, each with the flags of `SMALLER` appended. Appended flags
win over the README's (argparse keeps the last value), so the command line is the README's with its job made small:
fewer steps, smaller data, a shorter time budget. Then the Python blocks run in order in one namespace (a later block
uses the `model` and `tokenizer` of earlier ones), against the demo checkpoint the first shell block wrote.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from packaging.version import Version

from longvq import cli

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
INSTALL_DEMO = 'pip install torch==2.13.0 -e .'
TEST_COMMAND = 'pip install torch==2.13.0 -e ".[test,triton]" && python -m pytest -q tests'

TASKS = "--set data.num_train=16 --set data.num_validation=8 --set data.num_test=8"
SMALLER = {
    "longvq-demo": "--steps 4 --eval-every 2 --sample-bytes 16 --batch-size 4 --seq-len 64",
    "longvq-export": "",
    "longvq-verify": "",
    "longvq-train": f"--max-steps 2 {TASKS} --no-progress --cache-dir {{cache}}",
    "longvq-eval": "--cache-dir {cache}",
    "longvq-compare": "--suite tiny --workers 1 --cache-dir {cache}",  # the README runs the standard suite
    "longvq-benchmark": "--contexts 8 16 --steps 1 --hidden-size 32 --layers 1 --chunk-size 8 --codebook-size 8",
    "lm_eval": "--limit 2",
}
CONSOLE_SCRIPTS = {
    "longvq-demo": cli.demo, "longvq-export": cli.export, "longvq-verify": cli.verify, "longvq-train": cli.train,
    "longvq-eval": cli.evaluate,
    "longvq-compare": cli.compare, "longvq-benchmark": cli.benchmark,
}  # fmt: skip


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def shell_commands() -> list[str]:
    """Every command of the README's bash blocks: continuation lines joined, comments dropped, `&&` split."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def test_the_setup_commands_are_the_ones_ci_runs():
    assert TEST_COMMAND in README and INSTALL_DEMO + " && longvq-demo" in README
    assert TEST_COMMAND in (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert '"longvq-demo"' in (REPO / "ci" / "matrix.py").read_text(encoding="utf-8")  # run from the wheel


@pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.24"),
    reason="the README shows the current transformers API (generate's `cache=` and the output's `.cache`, 5.24+)",
)
def test_readme_commands_and_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "lm_eval_tasks").symlink_to(REPO / "tests" / "lm_eval_tasks")  # the README runs in the repo
    cache = tmp_path / "tasks-cache"
    setup = set(TEST_COMMAND.split(" && ")) | {INSTALL_DEMO}
    commands = [command for command in shell_commands() if command not in setup]
    assert commands and commands[0].startswith("longvq-demo"), "the main job must run first"
    assert {shlex.split(command)[0] for command in commands} == set(SMALLER)  # every documented command ran
    for command in commands:
        name, *arguments = shlex.split(command)
        assert name in SMALLER, f"README command without a test equivalent: {command}"
        arguments += shlex.split(SMALLER[name].format(cache=cache))
        if name == "lm_eval":
            lm_eval = Path(sys.executable).with_name("lm_eval")
            env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
            process = subprocess.run(
                [lm_eval, *arguments], env=env, capture_output=True, text=True, timeout=600, check=False
            )
            assert process.returncode == 0, f"{command}\n{process.stdout[-2000:]}\n{process.stderr[-4000:]}"
        else:
            assert CONSOLE_SCRIPTS[name](arguments) == 0, command

    namespace = {"__name__": "readme"}
    for index, block in enumerate(code_blocks("python")):
        try:
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"README python block {index} failed: {type(error).__name__}: {error}\n{block}")
    assert (tmp_path / "exports" / "longvq-demo" / "modeling_longvq.py").is_file()
