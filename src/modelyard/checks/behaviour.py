"""The behaviour gate: run the built-in behaviour tests, and the project's own folder of them
(`behaviour.tests`), with pytest against the candidate.

The candidate is handed to a separate pytest process through a work folder (model, evaluation
rows, spec), so user tests run with a clean interpreter and cannot disturb the pipeline process.
Results come back as JUnit XML, one check per test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import joblib
import pandas as pd

from modelyard.checks.report import Check, GateReport
from modelyard.spec import Spec

PLUGIN = "modelyard.checks.model_tests_plugin"
BUILTIN = Path(__file__).with_name("builtin_tests")
_TIMEOUT_SECONDS = 900


def write_candidate(work_dir: Path, spec: Spec, model: Any, eval_frame: pd.DataFrame) -> None:
    """What the pytest plugin loads: the fitted pipeline, the evaluation rows and the spec."""
    work_dir.mkdir(parents=True, exist_ok=True)
    # joblib stays inside this machine's temp folder: it never crosses into a serving image.
    joblib.dump(model, work_dir / "model.joblib")
    eval_frame.to_parquet(work_dir / "eval.parquet")
    payload = spec.model_dump(mode="json", by_alias=True) | {"source_dir": str(spec.source_dir)}
    (work_dir / "spec.json").write_text(json.dumps(payload))


def run_model_tests(spec: Spec, model: Any, eval_frame: pd.DataFrame, work_dir: Path) -> GateReport:
    report = GateReport(gate="behaviour")
    folders = [BUILTIN]
    if spec.behaviour.tests is not None:
        own = spec.resolve(spec.behaviour.tests)
        if not own.is_dir():
            return report.fail(
                "model_tests folder",
                f"behaviour.tests: {own} does not exist; create it, fix the path or remove "
                "behaviour.tests to run the built-in tests alone",
            )
        folders.append(own)
    write_candidate(work_dir, spec, model, eval_frame)
    junit = work_dir / "junit.xml"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *map(str, folders),
            "-p",
            PLUGIN,
            f"--modelyard-candidate={work_dir}",
            f"--junitxml={junit}",
            f"--rootdir={folders[-1]}",
            # A project's test may share a file name with a built-in one.
            "--import-mode=importlib",
            "-o",
            "addopts=",
            # Feature names in check names as they are ('naïve é', not 'na\\xefve \\xe9').
            "-o",
            "disable_test_id_escaping_and_forfeit_all_rights_to_community_support=true",
            "-p",
            "no:cacheprovider",
            "-q",
            "--no-header",
        ],
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_SECONDS,
        cwd=folders[-1],
        # Only the plugins the tests ask for (`pytest_plugins` in their conftest.py): whatever
        # else the environment has installed costs each run seconds and may change the verdict.
        env=os.environ | {"PYTHONDONTWRITEBYTECODE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    (work_dir / "pytest.log").write_text(completed.stdout + completed.stderr)
    if not junit.is_file():
        return report.fail(
            "pytest run",
            f"pytest exited {completed.returncode} before writing results: "
            + _tail(completed.stdout + completed.stderr),
        )
    report.checks.extend(parse_junit(junit))
    skipped = report.data["skipped"] = _skipped(junit)
    if not report.checks:
        report.notes.append(
            "no behaviour test ran" + (f" ({len(skipped)} skipped)" if skipped else "")
        )
    if completed.returncode not in (0, 1, 5):  # 5: nothing collected; 2-4: usage/internal errors
        report.fail("pytest run", _tail(completed.stdout + completed.stderr))
    return report


def parse_junit(path: Path) -> list[Check]:
    checks = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.find("skipped") is not None:
            continue
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        detail = "" if problem is None else (problem.get("message") or "").splitlines()[0][:300]
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        checks.append(Check(name=name, passed=problem is None, detail=detail))
    return checks


def _skipped(path: Path) -> list[str]:
    root = ET.parse(path).getroot()
    return [c.get("name", "") for c in root.iter("testcase") if c.find("skipped") is not None]


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])
