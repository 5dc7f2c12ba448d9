"""Layering: the import-linter contracts in pyproject.toml hold, and each catches a violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def lint_imports(*args: str, root: Path = ROOT) -> subprocess.CompletedProcess:
    """lint-imports on the sources under `root` (found first on the path, before the editable
    install's), with the contracts of its pyproject.toml."""
    lint = Path(sys.executable).with_name("lint-imports")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    return subprocess.run([str(lint), *args], cwd=root, capture_output=True, text=True, env=env)


def lint_with_probe(module: str, source: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """lint-imports on a copy of the sources with a planted module (a path under
    src/modelyard). A copy: planted in the checkout, it broke the contracts for every test
    and lint run reading the tree at the same time (seen in `make check`, another worker)."""
    for package in ("src/modelyard", "flows"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "src" / "modelyard" / module).write_text(source)
    return lint_imports("--no-cache", root=tmp_path)


def test_import_contracts_hold():
    done = lint_imports()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "The core never imports the orchestrator KEPT" in done.stdout
    assert "The core's layers KEPT" in done.stdout


def test_contract_catches_a_violation(tmp_path: Path):
    """The contract is live: a core module that imports prefect breaks it."""
    done = lint_with_probe("_contract_probe.py", "import prefect  # noqa: F401\n", tmp_path)
    assert done.returncode != 0
    assert "modelyard._contract_probe -> prefect" in done.stdout


def test_no_two_top_level_modules_import_each_other() -> None:
    """A cycle hides which of two modules is the lower layer (config and stack had one: the
    stack's state files now live in `stackstate`, which imports nothing of modelyard)."""
    import itertools

    import grimp

    graph = grimp.build_graph("modelyard")
    tops = sorted({".".join(m.split(".")[:2]) for m in graph.modules if "." in m})
    cycles = [(a, b) for a, b in itertools.combinations(tops, 2)
              if graph.chain_exists(a, b, as_packages=True)
              and graph.chain_exists(b, a, as_packages=True)]  # fmt: skip
    assert not cycles, f"modules importing each other: {cycles}"


def test_layers_contract_catches_an_import_pointing_up(tmp_path: Path) -> None:
    """The serving app importing the stages (a layer above it) breaks the layers contract."""
    done = lint_with_probe("serve/_layer_probe.py", "import modelyard.stages  # noqa: F401\n",
                           tmp_path)  # fmt: skip
    assert done.returncode != 0
    assert "The core's layers BROKEN" in done.stdout
    assert "modelyard.serve._layer_probe -> modelyard.stages" in done.stdout
