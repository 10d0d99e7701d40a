"""Packaging: every file of the `longvq` source tree is part of the wheel, every requirement stops below its next
major version, and the transformers range is the one CI tests.

The wheel itself is built, installed into a new virtual environment and its console scripts are run by the `wheel`
session of ci/matrix.py (`.ci/run`); these tests read setup.py's declarations without building anything.
"""

import fnmatch
import importlib.util
import runpy
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

setuptools = pytest.importorskip("setuptools")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_arguments():
    """The keyword arguments setup.py passes to `setuptools.setup`."""
    captured = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(setuptools, "setup", lambda **arguments: captured.update(arguments))
        patch.chdir(REPO)
        runpy.run_path(str(REPO / "setup.py"))
    return captured


def _in_a_package(relative: str, packages: set[str]) -> bool:
    """Whether `relative` (a path under longvq/) is a module of one of `packages` (which the wheel always holds)."""
    folder, _, name = relative.rpartition("/")
    return name.endswith(".py") and ".".join(["longvq", *filter(None, folder.split("/"))]) in packages


def test_every_source_file_ships_in_the_wheel(setup_arguments):
    packages = set(setup_arguments["packages"])
    patterns = setup_arguments["package_data"]["longvq"]
    source = REPO / "longvq"
    files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file() and "__pycache__" not in str(p)]
    assert {"model_cards/longvq_card_template.md", "data/tiny_corpus.txt", "cli.py"} <= set(files)
    left_out = [
        relative
        for relative in files
        if not _in_a_package(relative, packages) and not any(fnmatch.fnmatch(relative, p) for p in patterns)
    ]
    assert not left_out, f"not in the wheel (add them to setup.py's package_data): {left_out}"


def test_every_requirement_stops_below_a_next_major(setup_arguments):
    extras = [text for requirements in setup_arguments["extras_require"].values() for text in requirements]
    for text in [*setup_arguments["install_requires"], *extras]:
        specifiers = {spec.operator: Version(spec.version) for spec in Requirement(text).specifier if spec.operator != "!="}
        assert set(specifiers) == {">=", "<"}, f"{text}: needs a lower bound and an upper bound"
        low, high = specifiers[">="], specifiers["<"]
        # A major release: N (N >= 1), or for a 0.x package 0.y, whose minor releases may break the API.
        assert high > low and high.micro == 0 and (high.minor == 0 or high.major == 0), f"{text}: not at a major"


def test_transformers_range_is_the_tested_one(setup_arguments):
    spec = importlib.util.spec_from_file_location("ci_matrix", REPO / "ci" / "matrix.py")
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    tested = [Version(v) for v in matrix.tested_versions()]
    excluded = {Version(v) for v in matrix.excluded_versions()}
    assert tested == sorted(set(tested)) and not excluded & set(tested)
    (requirement,) = [Requirement(r) for r in setup_arguments["install_requires"] if r.startswith("transformers")]
    specifiers = [(spec.operator, Version(spec.version)) for spec in requirement.specifier]
    assert {version for operator, version in specifiers if operator == "!="} == excluded
    bounds = {operator: version for operator, version in specifiers if operator != "!="}
    assert bounds == {">=": tested[0], "<": Version(str(tested[0].major + 1))}
    assert tested[-1].major == tested[0].major
    assert all(tested[0] < version < tested[-1] for version in excluded)
