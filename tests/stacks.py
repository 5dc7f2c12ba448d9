"""A `modelyard stack` of a test's own (ports, workspace, CLI), and waiting on a condition."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from modelyard.ports import free_port
from modelyard.stack import SERVICES

# Variables of other tests' servers must not leak into the stack's commands.
FOREIGN = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MODELYARD_MLFLOW_TRACKING_URI",
           "MODELYARD_PREFECT_API_URL", "GITHUB_SHA", "GIT_COMMIT", "MODELYARD_GIT_COMMIT")  # fmt: skip


class Stack:
    def __init__(self, workspace: Path, wheelhouse: Path, prefect_db: Path) -> None:
        self.workspace = workspace
        # Prefect's database with its migrations applied (conftest.empty_prefect_db), where
        # `stack up` keeps it: Prefect then starts in seconds instead of migrating a new file.
        (workspace / "prefect").mkdir(parents=True)
        shutil.copy(prefect_db, workspace / "prefect" / "prefect.db")
        self.ports = {name: free_port() for name in SERVICES}
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in FOREIGN},
            "MODELYARD_WORKSPACE": str(workspace),
            "MODELYARD_WHEELHOUSE": str(wheelhouse),
            "MODELYARD_ACTOR": "trigger-tests",
            **{f"MODELYARD_STACK_{n.upper()}_PORT": str(p) for n, p in self.ports.items()},
        }

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def cli(self, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        exe = Path(sys.executable).with_name("modelyard")
        return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd,
                              env={**self.env, **env}, timeout=600)  # fmt: skip

    def worker(self, pool: str, name: str, log: Path, **env: str) -> subprocess.Popen:
        exe = Path(sys.executable).with_name("modelyard")
        return subprocess.Popen(
            [str(exe), "worker", "--pool", pool, "--name", name, "--limit", "1", "--poll", "1"],
            env={**self.env, **env},
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def flow_runs(self, *tags: str) -> list[dict]:
        body: dict = {"sort": "EXPECTED_START_TIME_ASC"}
        if tags:
            body["flow_runs"] = {"tags": {"all_": list(tags)}}
        response = httpx.post(f"{self.url('prefect')}/api/flow_runs/filter", json=body, timeout=10)
        response.raise_for_status()
        return response.json()


def wait_until(what: str, check: object, timeout: float = 600) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()  # type: ignore[operator]
        if found:
            return found
        time.sleep(2)
    raise TimeoutError(f"{what} within {timeout} s")
