"""A stack set up for a team: MLflow's basic-auth app and Prefect's API auth string, started by
`modelyard stack up` from modelyard's settings, which also sign modelyard's own calls in."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from modelyard.config import Settings
from modelyard.errors import ModelyardError
from modelyard.registry import signed_in_user
from tests.stacks import Stack

# Every test here needs a server: `make check` need not even import the module.
pytestmark = pytest.mark.integration

ADMIN, PASSWORD = "yard-admin", "team-stack-password-7f3a9c"
AUTH_STRING = "ops:team-prefect-secret-51be02"
SECRETS = (PASSWORD, AUTH_STRING.split(":", 1)[1], "viewer-password-88d1e4")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("modelyard")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=600)


def test_a_team_stack_requires_sign_in_and_modelyard_signs_in(
    ads, tmp_path, wheelhouse, empty_prefect_db
):
    stack = Stack(tmp_path / "workspace", wheelhouse, empty_prefect_db)
    signed_in = {**stack.env, "MODELYARD_MLFLOW_USERNAME": ADMIN, "MODELYARD_MLFLOW_PASSWORD":
                 PASSWORD, "MODELYARD_PREFECT_AUTH_STRING": AUTH_STRING,
                 "MODELYARD_BUILD_IMAGE": "never"}  # fmt: skip
    # Beyond loopback without credentials: refused before anything starts.
    exposed = _cli({**stack.env, "MODELYARD_STACK_HOST": "0.0.0.0"}, "stack", "up", "mlflow")
    assert exposed.returncode == 1
    assert "without sign-in: set MODELYARD_MLFLOW_PASSWORD" in exposed.stderr, exposed.stderr
    up = _cli(signed_in, "stack", "up", "mlflow", "prefect")
    assert up.returncode == 0, up.stdout + up.stderr
    mlflow, prefect = stack.url("mlflow"), stack.url("prefect")
    try:
        search = f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=5"
        assert httpx.get(search, timeout=10).status_code == 401
        assert httpx.get(search, auth=(ADMIN, "wrong"), timeout=10).status_code == 401
        assert httpx.get(search, auth=(ADMIN, PASSWORD), timeout=10).status_code == 200
        flows = f"{prefect}/api/flows/filter"
        assert httpx.post(flows, json={}, timeout=10).status_code == 401
        token = base64.b64encode(AUTH_STRING.encode()).decode()
        headers = {"Authorization": f"Basic {token}"}
        assert httpx.post(flows, json={}, headers=headers, timeout=10).status_code == 200
        for health in (f"{mlflow}/health", f"{prefect}/api/health"):  # probes stay open
            assert httpx.get(health, timeout=10).status_code == 200

        # modelyard signs in with the settings' credentials: a whole run goes through both.
        spec = str(ads.spec_path)
        run = _cli(signed_in, "run", "--no-deploy", "--spec", spec)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        model = ads.spec()["name"]
        versions = httpx.get(f"{mlflow}/api/2.0/mlflow/model-versions/search",
                             params={"filter": f"name = '{model}'"}, auth=(ADMIN, PASSWORD),
                             timeout=10).json()["model_versions"]  # fmt: skip
        assert [v["version"] for v in versions] == ["1"]

        # Deployments and triggers sign in to Prefect with the settings' auth string too.
        applied = _cli(signed_in, "pipelines", "apply", spec, "--pool", "team-pool")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        started = _cli(signed_in, "trigger", "--commit", ads.head, "--branch", "main")
        assert started.returncode == 0, started.stdout + started.stderr
        queued = httpx.post(f"{prefect}/api/flow_runs/filter", headers=headers, timeout=10,
                            json={"flow_runs": {"tags": {"all_": [f"commit:{ads.head}"]}}})  # fmt: skip
        deployed = [r for r in queued.json() if r["deployment_id"]]  # not the CLI's own run
        assert [r["parameters"]["commit"] for r in deployed] == [ads.head]

        # A teammate who may read but not write: the run stops at once, nothing is added.
        created = httpx.post(f"{mlflow}/api/2.0/mlflow/users/create", auth=(ADMIN, PASSWORD),
                             json={"username": "viewer", "password": SECRETS[2]}, timeout=10)  # fmt: skip
        assert created.status_code == 200, created.text
        viewer = {**signed_in, "MODELYARD_MLFLOW_USERNAME": "viewer",
                  "MODELYARD_MLFLOW_PASSWORD": SECRETS[2]}  # fmt: skip
        refused = _cli(viewer, "run", "--no-deploy", "--spec", spec)
        assert refused.returncode != 0
        assert "MLflow refused viewer to write to experiment" in refused.stderr, refused.stderr
        again = httpx.get(f"{mlflow}/api/2.0/mlflow/model-versions/search",
                          params={"filter": f"name = '{model}'"}, auth=(ADMIN, PASSWORD),
                          timeout=10).json()["model_versions"]  # fmt: skip
        assert len(again) == 1

        # Approvals are made as the user MLflow signed in, not a name from the settings.
        as_viewer = Settings(workspace=stack.workspace, mlflow_tracking_uri=mlflow, actor="alice",
                             mlflow_username="viewer", mlflow_password=SECRETS[2])  # fmt: skip
        assert signed_in_user(as_viewer) == "viewer"
        guessed = as_viewer.model_copy(update={"mlflow_password": SecretStr("guess")})
        with pytest.raises(ModelyardError, match="refused the password of viewer"):
            signed_in_user(guessed)

        # The secrets are in no file of the stack, no server's command line, no log.
        for path in (stack.workspace / "stack").rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                text = path.read_bytes()
                assert not any(s.encode() in text for s in SECRETS), path
        for name in ("mlflow", "prefect"):
            state = json.loads((stack.workspace / "stack" / name / "state.json").read_text())
            cmdline = Path(f"/proc/{state['pid']}/cmdline").read_bytes()
            assert not any(s.encode() in cmdline for s in SECRETS)
        assert not any(s in run.stdout + run.stderr for s in SECRETS)
    finally:
        _cli(signed_in, "stack", "down")
