"""The `longvq-*` console scripts (setup.py's entry points) and the one rule for their exit status.

Each script runs a command's `main(argv)` through `run_command`: exit status 0 when `main` returns, whatever it
returns (the `main` functions hand their results to Python callers), and 1 with the single line
`longvq-<name>: error: <reason>` on stderr when it stops on an expected error: bad input (`ValueError`), a missing or
unreadable file (`OSError`), a task whose data source is not installed (`TaskSourceMissing`). Any other exception is a
bug and keeps its traceback. Command-line syntax errors are argparse's own: a usage line, `<prog>: error: ...` and
exit status 2. `parse_overrides` reads the `key=value` options of the commands that take them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from importlib import import_module
from typing import Any

from .tasks.common import TaskSourceMissing

EXPECTED_ERRORS = (ValueError, OSError, TaskSourceMissing)


def parse_overrides(items: Iterable[str] | None) -> dict[str, Any]:
    """`["model.hidden_size=32", "learning_rate=1e-3"]` -> {"model.hidden_size": 32, "learning_rate": 0.001}; values
    are parsed as JSON when possible (numbers, true/false/null, lists), else kept as strings."""
    overrides = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Overrides must be key=value, got {item!r}.")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def run_command(name: str, main: Callable, argv: list[str] | None = None) -> int:
    """Run `main(argv)` as the console script `longvq-<name>` and return its exit status (see the module docstring)."""
    try:
        main(argv)
    except EXPECTED_ERRORS as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        print(f"longvq-{name}: error: {reason}", file=sys.stderr)
        return 1
    return 0


def _console_script(name: str, target: str) -> Callable[[list[str] | None], int]:
    """The function of console script `longvq-<name>`: `run_command` on `target` ("module:function", imported when
    the script runs, so that each script loads only its own command)."""
    module, function = target.split(":")

    def script(argv: list[str] | None = None) -> int:
        return run_command(name, getattr(import_module(module), function), argv)

    script.__name__ = script.__qualname__ = name.replace("-", "_")
    script.__doc__ = f"`longvq-{name}`: runs `{target}`; returns the exit status."
    return script


demo = _console_script("demo", "longvq.demo:main")
benchmark = _console_script("benchmark", "longvq.benchmark:main")
export = _console_script("export", "longvq.hub:main")
verify = _console_script("verify", "longvq.hub:verify_main")
card = _console_script("card", "longvq.model_card:main")
train_clm = _console_script("train-clm", "longvq.training.cli:main")
train = _console_script("train", "longvq.experiments.cli:train_main")
evaluate = _console_script("eval", "longvq.experiments.cli:evaluate_main")
compare = _console_script("compare", "longvq.experiments.cli:compare_main")
