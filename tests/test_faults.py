"""Faults injected for real, and what they leave behind: a run killed between register and
alias, found and repaired by `modelyard doctor`; an alias that disagrees with the ledger."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from modelyard.config import get_settings
from modelyard.deploy import ledger
from modelyard.deploy.ledger import Release
from tests.conftest import run_cli

pytestmark = pytest.mark.docker


def _registered_versions(tracking: str, model: str) -> list[dict]:
    response = httpx.get(f"{tracking}/api/2.0/mlflow/model-versions/search",
                         params={"filter": f"name = '{model}'"}, timeout=5)  # fmt: skip
    return response.json().get("model_versions", []) if response.status_code == 200 else []


def test_a_run_killed_between_register_and_alias_is_repaired_by_doctor(
    servers, ads, tmp_path, monkeypatch
):
    monkeypatch.setenv("MODELYARD_BUILD_IMAGE", "never")  # no image needed: quicker runs
    model, spec = ads.spec()["name"], str(ads.spec_path)
    log = tmp_path / "run.log"
    exe = Path(sys.executable).with_name("modelyard")
    run = subprocess.Popen([str(exe), "run", "--no-deploy", "--spec", spec],
                           stdout=log.open("w"), stderr=subprocess.STDOUT,
                           start_new_session=True)  # fmt: skip
    # SIGKILL the whole run the moment its version exists: after `register`, long before the
    # package stage tags a bundle and the `candidate` alias moves (no handler runs on SIGKILL).
    deadline = time.monotonic() + 300
    while not _registered_versions(servers["mlflow"], model):
        assert run.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no version was registered"
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=30)

    client = MlflowClient(servers["mlflow"], servers["mlflow"])  # not a global registry URI
    left = client.get_model_version(model, "1")
    assert "bundle_digest" not in left.tags, "the kill came too late to test anything"
    assert not client.get_registered_model(model).aliases

    found = run_cli("doctor", "--spec", spec)
    assert found.returncode == 1, found.stdout + found.stderr
    assert f"{model} v1 was registered but never packaged" in found.stdout
    # A rerun of the same commit does not reuse the leftover: it registers a whole version.
    again = run_cli("run", "--no-deploy", "--spec", spec)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert client.get_model_version_by_alias(model, "candidate").version == "2"

    fixed = run_cli("doctor", "--spec", spec, "--fix")
    assert fixed.returncode == 0 and "repaired" in fixed.stdout, fixed.stdout + fixed.stderr
    assert [v.version for v in client.search_model_versions(f"name = '{model}'")] == ["2"]
    record = ledger.history(get_settings(), model)[0]
    assert (record.action, record.version, record.outcome) == ("withdraw", "1", "succeeded")
    clean = run_cli("doctor", "--spec", spec)
    assert clean.returncode == 0 and "nothing half-finished" in clean.stdout

    # The other trace a killed deploy leaves: hosts switched (the ledger says v2 serves
    # staging) but the alias never moved. The ledger record is written directly here; the
    # deploy path that writes it is tested in test_deploy.py.
    settings = get_settings()
    ledger.append(settings, Release(model=model, environment="staging", action="deploy",
                                    version="2", outcome=ledger.SUCCEEDED, actor="test"))  # fmt: skip
    drift = run_cli("doctor", "--spec", spec)
    assert drift.returncode == 1
    assert "alias 'staging' points at nothing but the ledger says v2 serves staging" in drift.stdout
    assert run_cli("doctor", "--spec", spec, "--fix").returncode == 0
    assert client.get_model_version_by_alias(model, "staging").version == "2"
