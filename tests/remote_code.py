"""Running code in a fresh interpreter that cannot import `longvq`, as a user without the package would: the way the
tests check that a saved checkpoint loads through `trust_remote_code=True` alone.

`longvq` is installed editable in the test environment, i.e. `site-packages/__editable__.longvq-0.1.0.pth` installs a
meta-path finder at interpreter start-up that maps the name `longvq` to the source checkout. `HIDE_LONGVQ`, the first
statements of every child script, removes from `sys.meta_path` every non-standard finder that resolves `longvq` and
drops `sys.path` entries that hold a `longvq` package but no `transformers` (a source checkout on PYTHONPATH or the
cwd), before transformers is imported. If the package were still importable after that (a regular, non-editable
install inside site-packages, which cannot be dropped from sys.path), it falls back to the documented import blocker
`sys.modules["longvq"] = None`. Either way the child asserts `importlib.util.find_spec("longvq") is None` and that
`import longvq` raises ImportError, and records the mechanism in `hidden_by`. `run_without_longvq` also removes
PYTHONPATH and every HF_* variable from the child's environment, points HF_HOME (and so the Hub cache) and
HF_MODULES_CACHE into a folder of the test's, sets offline mode and runs the child there with stdin closed (a
refused trust prompt must not wait for input).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

HIDE_LONGVQ = r"""
import importlib, importlib.machinery, importlib.util, json, os, sys

_STANDARD = (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter, importlib.machinery.PathFinder)


def _resolves(finder, name):
    try:
        return finder.find_spec(name, None) is not None
    except Exception:
        return False


def _holds(entry, name):
    base = entry or os.getcwd()
    return os.path.isfile(os.path.join(base, name, "__init__.py")) or os.path.isfile(os.path.join(base, name + ".py"))


for _finder in list(sys.meta_path):
    if _finder not in _STANDARD and _resolves(_finder, "longvq"):
        sys.meta_path.remove(_finder)
sys.path[:] = [p for p in sys.path if not (_holds(p, "longvq") and not _holds(p, "transformers"))]
sys.path_importer_cache.clear()
importlib.invalidate_caches()
hidden_by = "meta-path finder removed"
if importlib.util.find_spec("longvq") is not None:
    sys.modules["longvq"] = None
    hidden_by = "sys.modules sentinel"
assert importlib.util.find_spec("longvq") is None
try:
    import longvq  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("longvq is still importable")
"""

RESULT_PREFIX = "LONGVQ_RESULT "


def run_without_longvq(script: str, arguments, root: Path, timeout: int = 300) -> dict:
    """Run `HIDE_LONGVQ + script` in a fresh interpreter with HF_HOME=`root` (offline) and cwd=`root`, passing
    `arguments` as one JSON command-line argument. The script reports by printing one line
    `RESULT_PREFIX + json.dumps(result)` (`hidden_by` is a variable it can report); returns that result."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_", "PYTHON"))}
    env.pop("TRANSFORMERS_CACHE", None)
    env.update(
        HF_HOME=str(root), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=str(root / "modules"), HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    path = root / "child.py"
    path.write_text(HIDE_LONGVQ + script, encoding="utf-8")
    process = subprocess.run(
        [sys.executable, str(path), json.dumps(arguments)], cwd=root, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert process.returncode == 0 and lines, f"child failed:\n{process.stdout[-3000:]}\n{process.stderr[-6000:]}"
    return json.loads(lines[-1][len(RESULT_PREFIX) :])
