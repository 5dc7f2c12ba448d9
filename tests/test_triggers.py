"""From a push to a run: the local stack, pipeline deployments, workers, the git hook and the
GitHub webhook, all against the real servers `modelyard stack up` starts on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modelyard.config import Settings, runtime
from modelyard.ports import free_port, free_ports
from modelyard.stack import SERVICES
from modelyard.webhook import sign
from tests.conftest import Project
from tests.hosts import stop_services, version_at
from tests.stacks import FOREIGN, Stack, wait_until

pytestmark = pytest.mark.docker

HEALTH = {"prefect": "/api/health", "mlflow": "/health", "registry": "/v2/",
          "prometheus": "/-/ready", "alertmanager": "/-/ready"}  # fmt: skip


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, empty_prefect_db: Path
) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("stack") / "workspace", wheelhouse, empty_prefect_db)
    up = stack.cli("stack", "up")
    assert up.returncode == 0, up.stdout + up.stderr
    yield stack
    stack.cli("stack", "down")
    stop_services(stack.workspace)


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 15)
    process.wait(timeout=60)


# --- the stack -----------------------------------------------------------------------------------


def test_stack_serves_each_service_and_settings_follow_it(stack, monkeypatch):
    for name in SERVICES:
        response = httpx.get(stack.url(name) + HEALTH[name], timeout=10)
        assert response.status_code == 200, f"{name}: {response.status_code}"
    shown = stack.cli("stack", "status")
    assert shown.returncode == 0, shown.stdout
    assert shown.stdout.count(" up ") == len(SERVICES) and stack.url("prefect") in shown.stdout
    # While the stack runs, modelyard in this workspace talks to its servers.
    for name in FOREIGN:
        monkeypatch.delenv(name, raising=False)
    settings = runtime(Settings(workspace=stack.workspace))
    assert settings.tracking_uri == stack.url("mlflow")
    assert settings.api_url == stack.url("prefect") + "/api"
    # Telemetry that would call out is off in every server's environment.
    state = json.loads((stack.workspace / "stack" / "prefect" / "state.json").read_text())
    environ = Path(f"/proc/{state['pid']}/environ").read_bytes().split(b"\0")
    assert b"PREFECT_SERVER_ANALYTICS_ENABLED=false" in environ
    assert b"MLFLOW_DISABLE_TELEMETRY=true" in environ
    # Prometheus discovers deployed servers from files in the stack's folder.
    config = json.loads((stack.workspace / "stack" / "prometheus" / "prometheus.yml").read_text())
    assert config["scrape_configs"][1]["file_sd_configs"][0]["files"][0].endswith("targets/*.json")


def test_stack_down_and_up_one_service_and_a_taken_port(stack, tmp_path):
    assert stack.cli("stack", "down", "registry").returncode == 0
    shown = stack.cli("stack", "status")
    assert shown.returncode == 1 and "not running" in shown.stdout
    assert stack.cli("stack", "up", "registry").returncode == 0
    assert httpx.get(stack.url("registry") + "/v2/", timeout=10).status_code == 200
    # A port another program holds: a clear error, and nothing left running.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        other = stack.cli("stack", "up", "registry", MODELYARD_WORKSPACE=str(tmp_path / "ws"),
                          MODELYARD_STACK_REGISTRY_PORT=str(port))  # fmt: skip
    assert other.returncode == 1
    assert f"port {port}" in other.stderr and "MODELYARD_STACK_REGISTRY_PORT" in other.stderr
    assert not (tmp_path / "ws" / "stack" / "registry" / "state.json").exists()
    unknown = stack.cli("stack", "up", "grafana")
    assert unknown.returncode == 1 and "unknown stack service" in unknown.stderr


# --- a push runs the pipeline ----------------------------------------------------------------


def test_push_to_a_hooked_repository_runs_the_pipeline_to_the_approval(stack, tmp_path):
    project = Project(tmp_path / "work", "ad_clicks", "hook-ads")
    staging = free_ports(3)
    environments = {"staging": {"target": "local", "port": staging},
                    "production": {"target": "local", "port": free_ports(3)}}  # fmt: skip
    project.write_spec(project.spec() | {"deploy": {"environments": environments}}, "deploy")
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    project.git("remote", "add", "origin", str(origin))

    installed = stack.cli("hooks", "install", str(origin))
    assert installed.returncode == 0, installed.stderr
    applied = stack.cli("pipelines", "apply", str(project.spec_path), "--repository", str(origin),
                        "--pool", "hook-pool")  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    worker = stack.worker("hook-pool", "hook-worker", tmp_path / "worker.log",
                          MODELYARD_BUILD_IMAGE="always")  # fmt: skip
    try:
        project.git("push", "origin", "main")  # the hook runs `modelyard trigger`
        sha = project.head
        runs = wait_until(
            "a run paused for approval",
            lambda: (
                [r for r in stack.flow_runs(f"commit:{sha}") if r["state"]["type"] == "PAUSED"]
                or _fail_fast(stack.flow_runs(f"commit:{sha}"), tmp_path / "worker.log")
            ),
        )
    finally:
        _stop(worker)
    run = runs[0]  # type: ignore[index]
    assert run["name"] == f"hook-ads@{sha[:8]}"
    assert {"branch:main", "trigger:git-hook", "model:hook-ads"} <= set(run["tags"])
    assert run["labels"]["prefect.worker.name"] == "hook-worker"
    assert run["parameters"]["repository"] == str(origin)
    assert version_at(f"http://127.0.0.1:{staging}") == "1"
    # The same push delivered twice (a hook run again) starts nothing new.
    again = stack.cli("trigger", "--commit", sha, "--branch", "main", "--source", "git-hook",
                      "--repository", str(origin), "--key", f"git-hook:refs/heads/main:{sha}")  # fmt: skip
    assert again.returncode == 0 and "already started" in again.stdout
    assert len(stack.flow_runs(f"commit:{sha}")) == 1
    # What a Jenkins input step or a tag push does: answer by commit, not by run id.
    rejected = stack.cli("reject", "--commit", sha, "--model", "hook-ads", "--reason", "test over")
    assert rejected.returncode == 0 and run["id"] in rejected.stdout, rejected.stderr


def _all_completed(stack: Stack, model: str, logs: Path) -> list[dict] | None:
    runs = stack.flow_runs(f"model:{model}")
    _fail_fast(runs, logs / "worker-a.log")
    return runs if runs and all(r["state"]["type"] == "COMPLETED" for r in runs) else None


def _fail_fast(runs: list[dict], log: Path) -> None:
    failed = [r for r in runs if r["state"]["type"] in ("FAILED", "CRASHED")]
    if failed:
        raise AssertionError(f"{failed[0]['state']['message']}\n{log.read_text()[-3000:]}")


def test_two_workers_share_queued_runs(stack, tmp_path):
    project = Project(tmp_path / "work", "ad_clicks", "shared-ads")  # no PMML export: quicker
    applied = stack.cli("pipelines", "apply", str(project.spec_path), "--pool", "shared-pool")
    assert applied.returncode == 0, applied.stderr
    commit = project.head
    for i in range(4):  # queued before any worker runs
        started = stack.cli("trigger", "--commit", commit, "--branch", "main",
                            "--model", "shared-ads", "--key", f"share-{i}")  # fmt: skip
        assert started.returncode == 0, started.stderr
    workers = [stack.worker("shared-pool", name, tmp_path / f"{name}.log",
                            MODELYARD_BUILD_IMAGE="never") for name in ("worker-a", "worker-b")]  # fmt: skip
    try:
        runs = wait_until(
            "four completed runs", lambda: _all_completed(stack, "shared-ads", tmp_path)
        )
        # --wait follows the stages and says how the run ended in its exit code: a commit the
        # repository does not have fails at checkout, and the trigger fails with it.
        missing = stack.cli("trigger", "--commit", "0" * 40, "--branch", "main",
                            "--model", "shared-ads", "--wait")  # fmt: skip
    finally:
        for worker in workers:
            _stop(worker)
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "checkout: Failed" in missing.stdout and "is not in" in missing.stdout
    by = [r["labels"]["prefect.worker.name"] for r in runs]  # type: ignore[union-attr]
    assert len(by) == 4 and set(by) == {"worker-a", "worker-b"}, by
    # Each run started from its worker's pre-imported fork server, not a fresh interpreter.
    log = (tmp_path / "worker-a.log").read_text()
    assert "fork server ready" in log and "Beginning flow run" in log
    assert "Downloading flow code" not in log


# --- the GitHub webhook --------------------------------------------------------------------------


def test_webhook_starts_one_run_per_verified_delivery(stack, tmp_path):
    project = Project(tmp_path / "work", "house_prices", "webhook-house")
    # No worker serves this pool: the runs stay queued, and nothing ever clones from GitHub.
    applied = stack.cli("pipelines", "apply", str(project.spec_path), "--pool", "webhook-pool",
                        "--repository", "git@github.com:acme/house.git")  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    port, secret = free_port(), "webhook-test-secret"
    exe = Path(sys.executable).with_name("modelyard")
    server = subprocess.Popen(
        [str(exe), "webhook", "--port", str(port)],
        env={**stack.env, "MODELYARD_WEBHOOK_SECRET": secret},
        stdout=(tmp_path / "webhook.log").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/hooks/github"
    sha = project.head
    body = json.dumps({
        "ref": "refs/heads/main", "after": sha, "deleted": False, "pusher": {"name": "octocat"},
        "repository": {"clone_url": "https://github.com/acme/house.git",
                       "ssh_url": "git@github.com:acme/house.git"},
    }).encode()  # fmt: skip

    def deliver(delivery: str, signature: str | None, event: str = "push") -> httpx.Response:
        headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
                   "Content-Type": "application/json"}  # fmt: skip
        if signature:
            headers["X-Hub-Signature-256"] = signature
        return httpx.post(url, content=body, headers=headers, timeout=30)

    try:
        wait_until("the webhook listening", lambda: _answers(url), timeout=60)
        assert deliver("d-unsigned", None).status_code == 401
        assert deliver("d-forged", sign("not-the-secret", body)).status_code == 401
        assert stack.flow_runs(f"commit:{sha}") == []
        first = deliver("d-1", sign(secret, body))
        assert first.status_code == 200 and first.json()["started"] == [f"webhook-house@{sha[:8]}"]
        replayed = deliver("d-1", sign(secret, body))
        assert replayed.status_code == 200 and replayed.json() == {"duplicate": "d-1"}
        assert len(stack.flow_runs(f"commit:{sha}")) == 1
        second = deliver("d-2", sign(secret, body))  # a new delivery is a new request to run
        assert second.status_code == 200
        assert deliver("d-ping", sign(secret, body), event="ping").status_code == 200
    finally:
        _stop(server)
    runs = stack.flow_runs(f"commit:{sha}")
    assert len(runs) == 2 and {"trigger:github", "branch:main"} <= set(runs[0]["tags"])
    assert "webhook-test-secret" not in (tmp_path / "webhook.log").read_text()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 405
    except httpx.HTTPError:
        return False


# --- the UIs, in a real browser ------------------------------------------------------------------

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-dev-shm-usage"]  # fmt: skip


def test_the_prefect_and_mlflow_uis_show_the_run_and_the_model(stack, tmp_path):
    from playwright.sync_api import sync_playwright

    project = Project(tmp_path / "work", "ad_clicks", "ui-ads")
    run = stack.cli("run", "--no-deploy", "--spec", str(project.spec_path),
                    MODELYARD_BUILD_IMAGE="never")  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    name = f"ui-ads@{project.head[:8]}"  # named, like triggered runs, by model and commit
    flow_run = next(r for r in stack.flow_runs() if r["name"] == name)
    screens = tmp_path / "screens"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=CHROMIUM_FLAGS, headless=True)  # fmt: skip
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # Prefect: the runs list names the run by its commit, its page shows the stages.
        page.goto(f"{stack.url('prefect')}/runs", wait_until="load")
        page.get_by_text(name).first.wait_for(timeout=60_000)
        page.screenshot(path=screens / "prefect-runs.png", full_page=True)
        page.goto(
            f"{stack.url('prefect')}/runs/flow-run/{flow_run['id']}", wait_until="networkidle"
        )
        page.get_by_text("Completed").first.wait_for(timeout=60_000)
        page.get_by_text("register", exact=False).first.wait_for(timeout=60_000)
        page.screenshot(path=screens / "prefect-flow-run.png", full_page=True)
        # MLflow: the registered model, its version and the alias the pipeline set.
        page.goto(f"{stack.url('mlflow')}/#/models/ui-ads", wait_until="load")
        page.get_by_text("Version 1").first.wait_for(timeout=60_000)
        page.get_by_text("candidate").first.wait_for(timeout=60_000)
        page.screenshot(path=screens / "mlflow-model.png", full_page=True)
        text = page.inner_text("body")
        browser.close()
    assert "ui-ads" in text and "candidate" in text
    assert all((screens / f).stat().st_size > 10_000 for f in
               ("prefect-runs.png", "prefect-flow-run.png", "mlflow-model.png"))  # fmt: skip
