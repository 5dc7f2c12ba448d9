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
