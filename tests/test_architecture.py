"""Layering: the core never imports the orchestrator (import-linter contract in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "The core never imports the orchestrator KEPT" in done.stdout


def test_contract_catches_a_violation(tmp_path):
    """The contract is live: a core module that imports prefect breaks it."""
    probe = ROOT / "src" / "modelyard" / "_contract_probe.py"
    probe.write_text("import prefect  # noqa: F401\n")
    try:
        lint = Path(sys.executable).with_name("lint-imports")
        done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    finally:
        probe.unlink()
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


def test_layers_contract_catches_an_import_pointing_up() -> None:
    """The serving app importing the stages (a layer above it) breaks the layers contract."""
    probe = ROOT / "src" / "modelyard" / "serve" / "_layer_probe.py"
    probe.write_text("import modelyard.stages  # noqa: F401\n")
    try:
        lint = Path(sys.executable).with_name("lint-imports")
        done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    finally:
        probe.unlink()
    assert done.returncode != 0
    assert "The core's layers BROKEN" in done.stdout
    assert "modelyard.serve._layer_probe -> modelyard.stages" in done.stdout
