"""CI sessions beyond the main test run (`.ci/run` runs this after the README's test command, in the same virtual
environment, which has longvq installed editable with its test extras):

* `oldest`: a new virtual environment with the README's install command plus `transformers==<oldest supported>`,
  then the whole default test suite (the renames of transformers 5.x show up anywhere: generation, training, loading);
* `remote-code`: export one small trained checkpoint with the package (`ci/remote_code.py export`), then, in a
  virtual environment holding only torch and transformers (never longvq), install each tested transformers version in
  turn and check that the checkpoint loads with `trust_remote_code=True` and generates what the exporter recorded;
* `wheel`: build the wheel, install it (not editable) into a new virtual environment and run every console script once
  on a tiny real job (exit status 0) and once on bad input (exit status 1, or 2 for an argparse error, one
  `longvq-<name>: error:` line, no traceback), from a folder outside the repository;
* `canary` (never fails CI): the newest transformers on PyPI, whatever its version: `pip install --upgrade
  transformers` in the environment running this script (CI's throw-away one, so run it last) and the `SUBSET` tests
  there, then the remote-code check, each skipped when the runs above already covered that version; a failure is
  printed as a warning.

The transformers versions come from `ci/transformers-versions.txt`, which setup.py reads as well. Every session runs in
a work folder (`--work`, default a new temporary folder) and prints its time; the exit status is 1 if a blocking
session failed. `python ci/matrix.py --sessions remote-code wheel` runs a selection.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VERSIONS_FILE = REPO / "ci" / "transformers-versions.txt"
TORCH = "torch==2.13.0"  # the README's pin: the CPU wheel
SUBSET = [
    "tests/test_generation.py", "tests/test_hub.py", "tests/test_sharing.py", "tests/test_inputs.py",
    "tests/test_save_load.py", "tests/test_safe_loading.py",
]  # fmt: skip
SESSIONS = ("oldest", "remote-code", "wheel", "canary")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _version_entries() -> list[str]:
    lines = VERSIONS_FILE.read_text(encoding="utf-8").splitlines()
    return [entry for entry in (line.split("#")[0].strip() for line in lines) if entry]


def tested_versions() -> list[str]:
    """The transformers versions of ci/transformers-versions.txt, oldest first (comments, blank lines and excluded
    releases dropped)."""
    return [entry for entry in _version_entries() if not entry.startswith("!=")]


def excluded_versions() -> list[str]:
    """The releases ci/transformers-versions.txt excludes (`!= X` lines)."""
    return [entry[2:].strip() for entry in _version_entries() if entry.startswith("!=")]


def run(command, cwd=REPO, env=None, check=True) -> subprocess.CompletedProcess:
    """Run `command`, echoing it; output goes straight to the log. Raises CalledProcessError if `check` and it fails."""
    print("+", " ".join(map(str, command)), flush=True)
    return subprocess.run([str(part) for part in command], cwd=cwd, env=env, check=check, stdin=subprocess.DEVNULL)


def output(command, cwd=REPO) -> str:
    return subprocess.run([str(part) for part in command], cwd=cwd, check=True, capture_output=True, text=True).stdout


def new_venv(path: Path) -> Path:
    """A new virtual environment at `path` (removed first if present); returns its python."""
    shutil.rmtree(path, ignore_errors=True)
    run([sys.executable, "-m", "venv", path])
    return path / "bin" / "python"


def installed_transformers(python: Path) -> str:
    return output([python, "-c", "import transformers; print(transformers.__version__)"]).strip()


def pip_install(python: Path, *requirements, cwd=REPO) -> None:
    run([python, "-m", "pip", "install", "-q", *requirements], cwd=cwd)


def subset_passes(python: Path) -> bool:
    """Run the SUBSET tests with `python`; True if they passed."""
    return run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET], check=False).returncode == 0


def session_oldest(work: Path) -> None:
    oldest = tested_versions()[0]
    python = new_venv(work / "venv-oldest")
    pip_install(python, TORCH, "-e", ".[test]", f"transformers=={oldest}")
    version = installed_transformers(python)
    if version != oldest:
        raise RuntimeError(f"asked for transformers {oldest}, pip installed {version}")
    if run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], check=False).returncode != 0:
        raise RuntimeError(f"tests failed on transformers {oldest}")


def remote_code_check(python: Path, folder: Path) -> bool:
    """`ci/remote_code.py check` with `python` (which must not import longvq; the script asserts that), run from
    `folder` outside the repository, offline, with a new modules cache and nothing on PYTHONPATH; True if it passed."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHON", "TRANSFORMERS_"))}
    shutil.rmtree(folder / "modules", ignore_errors=True)
    env.update(OFFLINE, HF_MODULES_CACHE=str(folder / "modules"), HF_HOME=str(folder / "hf-home"))
    checked = run([python, REPO / "ci" / "remote_code.py", "check", folder], cwd=folder, env=env, check=False)
    return checked.returncode == 0


def remote_code_venv(work: Path) -> Path:
    """The environment without longvq: torch only, transformers installed per version (created once)."""
    path = work / "venv-remote-code"
    if not (path / "bin" / "python").exists():
        pip_install(new_venv(path), TORCH)
    return path / "bin" / "python"


def exported_checkpoint(work: Path) -> Path:
    """The folder holding the exported checkpoint and its expected generations (exported on first use)."""
    folder = work / "remote-code"
    if not (folder / "expected.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        run([sys.executable, REPO / "ci" / "remote_code.py", "export", folder], cwd=folder)
    return folder


def session_remote_code(work: Path) -> None:
    folder, python = exported_checkpoint(work), remote_code_venv(work)
    results = {}
    for version in tested_versions():
        start = time.perf_counter()
        pip_install(python, f"transformers=={version}", cwd=work)
        results[version] = (remote_code_check(python, folder), time.perf_counter() - start)
    print("\nremote-code check per transformers version:")
    for version, (passed, seconds) in results.items():
        print(f"  {version:<8} {'passed' if passed else 'FAILED'}  {seconds:5.1f} s")
    failed = [version for version, (passed, _) in results.items() if not passed]
    if failed:
        raise RuntimeError(f"remote-code check failed on transformers {', '.join(failed)}")


# Each console script once on a tiny real job and once on bad input (see check_console_script). `{w}` is the session
# folder; the jobs run in order (export, card and eval read what demo and train wrote).
CONSOLE_JOBS = [
    ("longvq-demo", "--steps 2 --eval-every 1 --sample-bytes 16 --batch-size 4 --seq-len 64 --out {w}/demo",
     "--seq-len 0 --out {w}/demo-bad"),
    ("longvq-export", "{w}/demo {w}/export --repo-id ci/longvq-demo", "{w}/missing {w}/export-bad"),
    ("longvq-verify", "{w}/export", "{w}/demo-bad"),
    ("longvq-card", "--model-name ci --config {w}/export --out {w}/card/README.md",
     "--model-name ci --results {w}/missing.json --out {w}/card-bad/README.md"),
    ("longvq-train", "--task mqar --output-dir {w}/train --max-steps 2 --set data.num_train=16 "
     "--set data.num_validation=8 --set data.num_test=8 --no-progress --cache-dir {w}/tasks",
     "--task mqar --output-dir {w}/train-bad --set data.num_train=-1 --no-progress --cache-dir {w}/tasks"),
    ("longvq-eval", "{w}/train --cache-dir {w}/tasks", "{w}/demo"),
    ("longvq-compare", "--tasks mqar --archs longvq --time-budget 1 --output-dir {w}/compare --cache-dir {w}/tasks",
     "--output-dir {w}/missing --rebuild-table"),
    ("longvq-train-clm", "--output_dir {w}/clm --max_steps 2 --block_size 32 --per_device_train_batch_size 2 "
     "--config_overrides hidden_size=32,intermediate_size=64,shared_representation_size=16,codebook_size=8,"
     "chunk_size=8,num_hidden_layers=1 --logging_steps 1 --use_cpu",
     "--output_dir {w}/clm-bad --model_name_or_path {w}/missing"),
    ("longvq-benchmark", "decode --contexts 8 16 --steps 1 --hidden-size 32 --layers 1 --chunk-size 8 "
     "--codebook-size 8 --out {w}/benchmark",
     "decode --contexts 0 --steps 1 --hidden-size 32 --layers 1 --chunk-size 8 --codebook-size 8 --out {w}/bench-bad"),
]  # fmt: skip


def check_console_script(bin_dir: Path, name: str, arguments: str, folder: Path, expect_failure: bool) -> str | None:
    """Run one console script; None if it behaved, else the problem. Good input must give exit status 0; bad input
    exit status 1 (`run_command`) or 2 (argparse) with exactly one `<name>: error: ` line on stderr and no traceback."""
    command = [bin_dir / name, *arguments.format(w=folder).split()]
    print("+", name, arguments.format(w=folder), flush=True)
    env = {**os.environ, **OFFLINE, "TQDM_DISABLE": "1"}
    process = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if not expect_failure:
        print(process.stdout[-600:], end="")
        return None if process.returncode == 0 else f"exit status {process.returncode}:\n{process.stderr[-3000:]}"
    lines = process.stderr.strip().splitlines()
    error_lines = [line for line in lines if line.startswith(f"{name}: error: ")]
    print(f"  -> exit status {process.returncode}: {(error_lines or lines or ['(nothing on stderr)'])[-1]}")
    if process.returncode not in (1, 2) or "Traceback" in process.stderr or len(error_lines) != 1:
        return f"bad input gave exit status {process.returncode} and stderr:\n{process.stderr[-3000:]}"
    return None


def session_wheel(work: Path) -> None:
    dist = work / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, "."])
    wheel = next(dist.glob("longvq-*.whl"))
    python = new_venv(work / "venv-wheel")
    pip_install(python, TORCH, wheel, cwd=work)
    folder = work / "console-scripts"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    location = output([python, "-c", "import longvq; print(longvq.__file__)"], cwd=folder)
    if str(REPO) in location:
        raise RuntimeError(f"the wheel's environment imports longvq from the repository: {location}")
    problems = {}
    for name, good, bad in CONSOLE_JOBS:
        for arguments, expect_failure in ((good, False), (bad, True)):
            problem = check_console_script(python.parent, name, arguments, folder, expect_failure)
            if problem:
                problems[f"{name} {arguments}"] = problem
    for command, problem in problems.items():
        print(f"\nFAILED: {command}\n{problem}")
    if problems:
        raise RuntimeError(f"{len(problems)} console-script runs misbehaved")


def session_canary(work: Path) -> None:
    python = Path(sys.executable)
    before = installed_transformers(python)
    pip_install(python, "--upgrade", "transformers")
    newest = installed_transformers(python)
    print(f"newest transformers on PyPI: {newest} (the CI run used {before})")
    failed = []
    if newest != before and not subset_passes(python):
        failed.append("the tests")
    if newest in tested_versions():
        print(f"transformers {newest} is in {VERSIONS_FILE.name}: the remote-code session checked it")
    else:
        remote_python = remote_code_venv(work)
        pip_install(remote_python, "--upgrade", "transformers", cwd=work)
        if not remote_code_check(remote_python, exported_checkpoint(work)):
            failed.append("the remote-code check")
    if failed:
        raise RuntimeError(f"transformers {newest} breaks {' and '.join(failed)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", nargs="+", choices=SESSIONS, default=list(SESSIONS))
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary folder)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="longvq-matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    sessions = {"oldest": session_oldest, "remote-code": session_remote_code, "wheel": session_wheel,
                "canary": session_canary}  # fmt: skip
    summary, blocking_failures = [], 0
    for name in args.sessions:
        print(f"\n===== session {name} =====", flush=True)
        start = time.perf_counter()
        try:
            sessions[name](work)
            outcome = "passed"
        except (subprocess.CalledProcessError, RuntimeError) as error:
            outcome = f"FAILED: {error}"
            if name == "canary":
                outcome = f"WARNING (non-blocking canary, CI still passes): {error}"
            else:
                blocking_failures += 1
        summary.append(f"{name:<12} {time.perf_counter() - start:7.1f} s  {outcome}")
        print(f"===== session {name}: {summary[-1]}", flush=True)
    print("\nmatrix summary:\n  " + "\n  ".join(summary))
    return 1 if blocking_failures else 0


if __name__ == "__main__":
    sys.exit(main())
