"""Deploys with the real playbooks through ansible-runner: this machine and two SSH hosts.

Versions come from real pipeline runs (real MLflow server, Prefect API, Docker images). Hosts
are sshd instances on loopback ports; their services run in this machine's Docker engine or
under supervisord, each behind its own nginx front door.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pandas as pd
import pytest
import yaml
from cryptography import x509
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run
from prefect.input import read_flow_run_input

from flows.pipeline import pipeline
from modelyard import certs
from modelyard.config import Settings, runtime
from modelyard.deploy import card, ledger, release
from modelyard.errors import DeployFailed, SpecError
from modelyard.monitor.drift import Prometheus
from modelyard.outcomes import PipelineOutcome
from modelyard.ports import free_ports
from modelyard.spec import Spec, load_spec
from tests import tls
from tests.conftest import Project, example_data, run_cli
from tests.conftest import environment as process_environment
from tests.hosts import (
    V2_ROW,
    LoadLoop,
    SshHosts,
    lose_host,
    restore_host,
    start_ssh_hosts,
    stop_services,
    stop_ssh_hosts,
    v2_batches,
    version_at,
)
from tests.serving import SERVING_IMPORTS, children_of, unused_distributions
from tests.stacks import wait_until
from tests.tls import assert_modern_tls_only

pytestmark = pytest.mark.docker
TOKEN = "deploy-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshHosts]:
    hosts = start_ssh_hosts(tmp_path_factory.mktemp("ssh"), 2)
    yield hosts
    stop_ssh_hosts(hosts)


@pytest.fixture(scope="module")
def registered(
    mlflow_server: str, prefect_api: str, wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Project]:
    """ad_clicks registered twice (v1, v2) with serving images, in a workspace of its own."""
    root = tmp_path_factory.mktemp("deploy")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        env.setenv("MODELYARD_WORKSPACE", str(root / "workspace"))
        env.setenv("MODELYARD_BUILD_IMAGE", "always")
        env.setenv("MODELYARD_WHEELHOUSE", str(wheelhouse))
        env.setenv("MODELYARD_SERVE_TOKEN", TOKEN)
        env.setenv("MODELYARD_ACTOR", "deploy-tests")
        project = Project(root / "repo", "ad_clicks", "deploy-ads")
        for commit in ("first", "second"):
            project.commit(commit)
            state = pipeline(spec_path=str(project.spec_path), deploy=False, return_state=True)
            assert state.is_completed(), state.message
        yield project
        stop_services(root / "workspace")


@pytest.fixture(autouse=True)
def _stop_test_services(tmp_path: Path) -> Iterator[None]:
    yield
    stop_services(tmp_path)


def env_spec(project: Project, name: str, environments: dict, **deploy: object) -> Spec:
    """The project's spec with its own deploy section, written beside it."""
    data = project.spec() | {"deploy": {"environments": environments, **deploy}}
    path = project.spec_path.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_spec(path)


def ssh_env(
    hosts: SshHosts,
    folder: Path,
    runtime: str = "container",
    names: tuple[str, ...] = ("host-a", "host-b"),
    **group: object,
) -> dict:
    """An ssh environment over `names`, each host with its own root and front-door port."""
    per_host = {
        name: {"model_service_root": str(folder / name), "model_service_port": free_ports(3)}
        for name in names
    }
    docker = os.environ.get("DOCKER_HOST", "")
    inventory = hosts.inventory(
        folder / "inventory.yml", per_host, model_service_docker_host=docker, **group
    )
    fronts = [f"http://127.0.0.1:{v['model_service_port']}" for v in per_host.values()]
    return {"target": "ssh", "inventory": str(inventory), "runtime": runtime, "fronts": fronts}


def _environment(env: dict) -> dict:
    return {k: v for k, v in env.items() if k != "fronts"}


def test_ssh_rollout_and_rollback_drop_no_request(registered, ssh_hosts, tmp_path):
    env = ssh_env(ssh_hosts, tmp_path)
    # Both hosts per batch: the other SSH tests cover one at a time (the default), and this one
    # shows a batch of several switches without a dropped request too.
    spec = env_spec(registered, "rollout", {"production": _environment(env) | {"batch": 2}})
    settings, progress = runtime(), []

    first = release.deploy(settings, spec, "production", "1", progress.append)
    assert first.outcome == "succeeded" and first.previous_version == ""
    assert [version_at(url) for url in env["fronts"]] == ["1", "1"]

    with LoadLoop(env["fronts"], spec.name, TOKEN) as load:
        second = release.deploy(settings, spec, "production", "2", progress.append)
        assert [version_at(url) for url in env["fronts"]] == ["2", "2"]
        back = run_cli("rollback", "production", "--spec", str(spec.source_dir / "rollout.yaml"))
        assert back.returncode == 0, back.stdout + back.stderr
        assert "rolled back from v2" in back.stdout
        assert [version_at(url) for url in env["fronts"]] == ["1", "1"]
    assert load.failures == []
    for url in env["fronts"]:  # traffic really crossed over and back on every host
        assert load.versions[url]["1"] > 0 and load.versions[url]["2"] > 0

    assert second.previous_version == "1"
    client = MlflowClient()
    assert client.get_model_version_by_alias(spec.name, "production").version == "1"
    records = ledger.history(settings, spec.name, "production")
    assert [(r.action, r.version, r.outcome) for r in records] == [
        ("rollback", "1", "succeeded"), ("deploy", "2", "succeeded"), ("deploy", "1", "succeeded"),
    ]  # fmt: skip
    assert records[0].previous_version == "2" and records[0].actor == "deploy-tests"
    assert set(records[1].hosts.split(",")) == {"host-a", "host-b"}
    image = client.get_model_version(spec.name, "2").tags
    assert (records[1].image, records[1].image_digest) == (image["image_ref"], image["image_id"])
    assert records[1].bundle_digest == image["bundle_digest"]
    assert any("host-b: Start the container in the idle slot" in line for line in progress)
    # The ledger keeps Ansible's full output, and no secret made it there or to disk.
    stdout = client.download_artifacts(records[1].record_id, "ansible/stdout", str(tmp_path))
    assert "Roll out the model service" in Path(stdout).read_text()
    workspace = settings.workspace / "releases"
    leaked = subprocess.run(["grep", "-rl", TOKEN, str(workspace), str(tmp_path)],
                            capture_output=True, text=True).stdout  # fmt: skip
    assert leaked == ""

    shown = run_cli("history", spec.name, "--env", "production")
    assert shown.returncode == 0 and shown.stdout.count("succeeded") == 3
    # Each slot runs as the image's non-root user, with no capability and none to gain.
    for container in _containers(f"{spec.name}-production", tmp_path):
        inspected = json.loads(subprocess.run(["docker", "inspect", container], check=True,
                                              capture_output=True, text=True).stdout)[0]  # fmt: skip
        assert inspected["Config"]["User"] not in ("", "0", "root", "0:0")
        assert inspected["HostConfig"]["CapDrop"] == ["ALL"]
        assert "no-new-privileges" in inspected["HostConfig"]["SecurityOpt"]

    # Rollback also works when the current version's container is gone.
    release.deploy(settings, spec, "production", "2", progress.append)
    gone = _containers(f"{spec.name}-production", tmp_path)
    subprocess.run(["docker", "rm", "-f", *gone], check=True)
    release.rollback(settings, spec, "production", progress.append)
    assert [version_at(url) for url in env["fronts"]] == ["1", "1"]


def _containers(service: str, under: Path) -> list[str]:
    """Running containers of `service` whose service root is below `under`."""
    found = subprocess.run(
        ["docker", "ps", "--filter", f"label=io.modelyard.service={service}",
         "--format", '{{.ID}} {{.Label "io.modelyard.root"}}'],
        capture_output=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    ids = [line.split()[0] for line in found if line.split(maxsplit=1)[1].startswith(str(under))]
    assert ids, f"no running container of {service} under {under}"
    return ids


class _NotReady(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_failure_on_the_second_host_puts_every_host_back(
    registered, ssh_hosts, prometheus_stack, tmp_path
):
    """Two failures on host-b after host-a switched: a failed health check, then host-b lost
    (its sshd and sessions killed) mid-rollout. Each time host-a goes back to v1 and the alias
    and the ledger's idea of what serves stay on v1."""
    # Short enough that the blocked slot fails quickly, long enough that a healthy container
    # on a busy machine is never taken for a failure.
    env = ssh_env(ssh_hosts, tmp_path, model_service_ready_timeout=20)
    spec = env_spec(registered, "failing", {"fragile": _environment(env)})
    settings = prometheus_stack  # this machine's settings, and a Prometheus for the canary
    release.deploy(settings, spec, "fragile", "1", lambda _: None)

    # On host-b something else holds the idle slot's port: v2's container cannot listen there,
    # and the port answers 503 to the readiness probe.
    inventory = yaml.safe_load(Path(env["inventory"]).read_text())
    host_b_port = inventory["all"]["children"]["model_hosts"]["hosts"]["host-b"][
        "model_service_port"
    ]
    blocker = http.server.HTTPServer(("127.0.0.1", host_b_port + 2), _NotReady)
    threading.Thread(target=blocker.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DeployFailed) as failed:
            release.deploy(settings, spec, "fragile", "2", lambda _: None)
    finally:
        blocker.shutdown()
        blocker.server_close()  # the port is the idle slot's again
    message = str(failed.value)
    assert "host-b" in message and "Wait for the idle slot to be ready" in message
    assert "every host is back on v1" in message

    assert [version_at(url) for url in env["fronts"]] == ["1", "1"]
    assert MlflowClient().get_model_version_by_alias(spec.name, "fragile").version == "1"
    latest = ledger.history(settings, spec.name, "fragile")[0]
    assert (latest.action, latest.version, latest.outcome) == ("deploy", "2", "failed")
    assert "host-b" in latest.reason and latest.previous_version == "1"
    assert ledger.live(settings, spec.name, "fragile").version == "1"

    # host-b drops off the network the moment host-a serves v2.
    host_b = next(h for h in ssh_hosts.hosts if h.name == "host-b")
    lost = threading.Event()

    def lose_host_b_after_host_a_switches() -> None:
        while not lost.is_set():
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                if version_at(env["fronts"][0]) == "2":
                    lose_host(host_b)
                    lost.set()
            time.sleep(0.05)

    watcher = threading.Thread(target=lose_host_b_after_host_a_switches, daemon=True)
    watcher.start()
    try:
        with pytest.raises(DeployFailed) as failed:
            release.deploy(settings, spec, "fragile", "2", lambda _: None)
    finally:
        lost.set()
        watcher.join(10)
        if host_b.process.poll() is not None:
            restore_host(ssh_hosts, host_b)
    message = str(failed.value)
    assert "host-b: unreachable: " in message, message
    # Lost before its batch, host-b was never changed; lost during it, it could not be put back
    # but never switched either. host-a is back on v1 either way.
    assert "every host it changed is back on v1" in message or "host-a back on v1" in message
    assert [version_at(url) for url in env["fronts"]] == ["1", "1"]
    assert MlflowClient().get_model_version_by_alias(spec.name, "fragile").version == "1"
    assert ledger.live(settings, spec.name, "fragile").version == "1"
    assert ledger.history(settings, spec.name, "fragile")[0].outcome == "failed"

    # A canary of v2 that loses host-b during its first step: the walk cannot move host-b's
    # share, so it sends host-a back to v1 at once; host-b keeps its share until it answers,
    # and `rollout abort` then ends it there too. No client request fails meanwhile.
    from modelyard.deploy import progressive

    strategy = {"kind": "canary", "steps": [50, 100], "bake": 10, "timeout": 60,
                "checks": {"min_requests": 10, "psi": 0.5}}  # fmt: skip
    canary = env_spec(registered, "failing-canary",
                      {"fragile": _environment(env) | {"strategy": strategy}})  # fmt: skip
    lost.clear()

    def lose_host_b_once_the_canary_has_its_share() -> None:
        while not lost.is_set():
            if progressive.status(settings, spec.name, "fragile") is not None:
                lose_host(host_b)
                lost.set()
            time.sleep(0.1)

    watcher = threading.Thread(target=lose_host_b_once_the_canary_has_its_share, daemon=True)
    watcher.start()
    with (
        LoadLoop(env["fronts"], spec.name, TOKEN, pause=0.05) as load,
        pytest.raises(DeployFailed) as failed,
    ):
        progressive.deploy(settings, canary, "fragile", "2", lambda _: None)
    lost.set()
    watcher.join(10)
    message = str(failed.value)
    assert "host-b: unreachable" in message and "sending traffic back failed too" in message
    assert "`modelyard rollout abort fragile` finishes it" in message, message
    assert load.failures == []
    front_a, front_b = env["fronts"]
    assert {version_at(front_a) for _ in range(20)} == {"1"}
    assert {version_at(front_b) for _ in range(40)} == {"1", "2"}  # its share, unreached
    assert progressive.status(settings, spec.name, "fragile") is not None
    restore_host(ssh_hosts, host_b)
    aborted = run_cli("rollout", "abort", "fragile", "--spec",
                      str(canary.source_dir / "failing-canary.yaml"))  # fmt: skip
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    assert "aborted: v1 serves fragile alone" in aborted.stdout
    assert [version_at(url) for url in env["fronts"]] == ["1", "1"]
    assert {version_at(front_b) for _ in range(20)} == {"1"}
    assert progressive.status(settings, spec.name, "fragile") is None
    assert MlflowClient().get_model_version_by_alias(spec.name, "fragile").version == "1"


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user may enter, as /var/lib is (pytest's own are closed to others)."""
    folder = Path(tempfile.mkdtemp(prefix="modelyard-open-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    stop_services(folder)
    shutil.rmtree(folder, ignore_errors=True)


def test_process_runtime_on_this_machine_and_an_ssh_host(
    registered, ssh_hosts, prometheus_stack, open_folder, tmp_path
):
    """The process runtime here and over SSH, over HTTPS from the local CA; on the SSH host
    v2 goes in as a shadow of v1 (its slot loads v1's bundle as its reference from the host's
    releases, not an image), judged on what Prometheus scrapes from its port over TLS.
    The SSH host's service folder is open to other users: its slot and nginx's workers drop to
    the service user, reading the keys through its group. This machine's is in pytest's closed
    folder: they run as root, and the deploy says why. Plain HTTP is redirected here."""
    from modelyard import servetls
    from modelyard.deploy import progressive

    port = free_ports(3)
    ssh = ssh_env(ssh_hosts, open_folder, runtime="process", names=("host-a",))
    shadow = {"kind": "shadow", "sample": 0.5, "duration": 10, "timeout": 60,
              "checks": {"min_requests": 10, "psi": 0.5, "latency_ratio": 3.0}}  # fmt: skip
    environments = {
        "edge-local": {"target": "local", "runtime": "process", "port": port},
        "edge-ssh": _environment(ssh) | {"strategy": shadow},
    }
    spec = env_spec(registered, "edge", environments)
    settings = prometheus_stack.model_copy(
        update={"serve_tls": "local", "serve_plain_http": "redirect"}
    )
    said: list[str] = []
    for version in ("1", "2"):
        release.deploy(settings, spec, "edge-local", version, said.append)
    assert any("run as root: modelyard cannot enter" in line for line in said), said
    progressive.deploy(settings, spec, "edge-ssh", "1", lambda _: None)  # the first goes in whole
    verify = tls.client(servetls.trust(settings))
    ssh_fronts = [url.replace("http://", "https://") for url in ssh["fronts"]]
    with LoadLoop(ssh_fronts, spec.name, TOKEN, pause=0.05, verify=verify) as load:
        progressive.deploy(settings, spec, "edge-ssh", "2", lambda _: None)
    assert load.failures == []
    promoted, analysis = ledger.history(settings, spec.name, "edge-ssh")[:2]
    assert (promoted.version, promoted.outcome, analysis.action) == ("2", "succeeded", "analysis")
    assert analysis.outcome == "passed", analysis.reason
    assert re.search(r"agreement [\d.]+ \(threshold 0\.95\): ok", analysis.reason)
    fronts = [f"https://127.0.0.1:{port}", *ssh_fronts]
    assert [version_at(url, verify=verify) for url in fronts] == ["2", "2"]
    for url in fronts:
        answer = httpx.post(f"{url}/invocations", json={"inputs": [[29, "female", 41, 4, 17.5, "desktop"]]},
                            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10, verify=verify)  # fmt: skip
        assert answer.status_code == 200 and answer.json()["predictions"] in ([0], [1])
        assert (
            httpx.post(f"{url}/invocations", json={}, timeout=10, verify=verify).status_code == 401
        )
    redirected = httpx.get(f"http://127.0.0.1:{port}/version", timeout=10)
    assert redirected.status_code == 308
    assert redirected.headers["location"] == f"https://127.0.0.1:{port}/version"
    # The process runtime ran no container.
    containers = subprocess.run(["docker", "ps", "-q", "--filter", "label=io.modelyard.service=deploy-ads-edge-local"],
                                capture_output=True, text=True).stdout  # fmt: skip
    assert containers == ""
    supervised = subprocess.run(["supervisorctl", "-c", str(settings.workspace / "services" / "supervisord.conf"), "status"],
                                capture_output=True, text=True).stdout  # fmt: skip
    assert "deploy-ads-edge-local-green" in supervised and "RUNNING" in supervised
    # Least privilege on the SSH host: its slots and nginx's workers run as the service user,
    # never as root; the release and the keys are root's, readable by the service user's group
    # and closed to others. Here, behind pytest's closed folder, they run as root.
    processes = _processes()
    home = open_folder / "host-a" / "deploy-ads-edge-ssh"
    assert _users(processes, home) == ({"modelyard"}, {"modelyard"})
    assert _users(processes, settings.workspace / "services" / "deploy-ads-edge-local") == (
        {"root"}, {"root"})  # fmt: skip
    # The host's environment holds only what serving imports (infra/docker/install-serving.sh):
    # its own python, with the slot's environment, on the slot's release.
    slot = next(p for p in processes if f"{home}/releases/" in p["args"])
    environ = Path(f"/proc/{slot['pid']}/environ").read_bytes().split(b"\0")
    printed = subprocess.run([slot["args"].split()[0], "-c", SERVING_IMPORTS, slot["args"].split()[-1]],
                             env=dict(v.decode().split("=", 1) for v in environ if b"=" in v),
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert unused_distributions(printed) == []
    # A body larger than nginx's memory buffer goes through a temporary file the unprivileged
    # workers write under the service's folder.
    rows = [[29, "female", 41, 4, 17.5, "desktop"]] * 3000
    big = httpx.post(f"{ssh_fronts[0]}/invocations", json={"inputs": rows}, verify=verify,
                     headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)  # fmt: skip
    assert big.status_code == 200 and len(big.json()["predictions"]) == 3000, big.text[:300]
    keys = [*home.glob("tls/slots/*/key.pem"), *home.glob("tls/front/*/key.pem")]
    assert len(keys) >= 2, keys  # the live slot's copy and the front door's
    for path in (home / "trusted_keys", home / "releases" / "2" / "manifest.json", *keys):
        mode = path.stat().st_mode
        assert path.owner() == "root" and path.group() == "modelyard", path
        assert mode & 0o007 == 0 and mode & 0o020 == 0, f"{path}: {oct(mode)}"


def _users(processes: list[dict[str, str]], home: Path) -> tuple[set[str], set[str]]:
    """Who runs the slots of the service at `home`, and who its nginx's workers."""
    slots = {p["user"] for p in processes if f"{home}/releases/" in p["args"]}
    masters = [p for p in processes if f"-p {home}/nginx" in p["args"]]
    assert masters, [p["args"] for p in processes if "nginx" in p["args"]]
    return slots, {p["user"] for p in processes if p["ppid"] == masters[0]["pid"]}


def _processes() -> list[dict[str, str]]:
    """Every process on the machine: pid, parent, user and command line."""
    listed = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,user:32=,args="], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    rows = [line.split(None, 3) for line in listed.splitlines()]
    return [
        dict(zip(("pid", "ppid", "user", "args"), row, strict=True))
        for row in rows
        if len(row) == 4
    ]


def test_bad_deploy_requests_name_the_field(registered, tmp_path):
    settings = runtime()
    spec = env_spec(registered, "bad", {"staging": {"target": "local", "port": free_ports(3)}})
    with pytest.raises(SpecError, match=r"deploy\.environments\.nowhere"):
        release.deploy(settings, spec, "nowhere", "1", lambda _: None)
    with pytest.raises(DeployFailed, match="version 99 is not registered"):
        release.deploy(settings, spec, "staging", "99", lambda _: None)
    with pytest.raises(DeployFailed, match="nothing to roll back to"):
        release.rollback(settings, spec, "staging", lambda _: None)
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump(registered.spec() | {"deploy": {"environments": {"x": {"target": "ssh"}}}})
    )
    shown = run_cli("validate-spec", "--spec", str(tmp_path / "bad.yaml"))
    assert shown.returncode == 2 and "deploy.environments.x" in shown.stderr
    assert "inventory" in shown.stderr
    assert ledger.history(settings, spec.name, "staging") == []  # nothing was recorded


class FlowInThread:
    """A pipeline run in a background thread, as `modelyard run` would run it."""

    def __init__(self, project: Project) -> None:
        self.states: list = []
        self.thread = threading.Thread(
            target=lambda: self.states.append(
                pipeline(spec_path=str(project.spec_path), return_state=True)
            ),
            daemon=True,  # a failed test must not leave the interpreter waiting on a paused run
        )
        self.thread.start()

    def state(self, timeout: float = 300) -> Any:
        self.thread.join(timeout)
        assert self.states, "the flow run did not finish"
        return self.states[0]

    def result(self, timeout: float = 300) -> PipelineOutcome:
        state = self.state(timeout)
        assert state.is_completed(), state.message
        return state.result()


def paused_run(
    after: set[str] = frozenset(),
    timeout: float = 400,
    ended: Callable[[], str | None] | None = None,
) -> str:
    """The id of a flow run waiting for approval (not one of `after`, already answered).
    `ended`: why the run being waited for ended without pausing, else None (then no pause can
    come: the wait stops with that reason instead of at the timeout)."""
    paused = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
    )
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            why = ended() if ended is not None else None
            if why is not None:
                raise AssertionError(f"the flow run ended without pausing for approval: {why}")
            runs = [r for r in client.read_flow_runs(flow_run_filter=paused)]
            fresh = [r for r in runs if f"{r.id}:{r.state.state_details.pause_key}" not in after]
            if fresh:
                return f"{fresh[0].id}:{fresh[0].state.state_details.pause_key}"
            time.sleep(1)
    raise TimeoutError("no flow run paused for approval")


def test_flow_waits_for_approval_and_a_rejection_keeps_production(servers, monkeypatch, tmp_path):
    monkeypatch.setenv("MODELYARD_SERVE_TOKEN", TOKEN)
    # Three runs about approvals: the process runtime spares each an image build and its infra
    # gate (the flow's image to a container is test_ssh_rollout's and the trigger tests').
    project = Project(tmp_path / "repo", "ad_clicks", "approval-ads")
    staging, production = free_ports(3), free_ports(3)
    environments = {
        "staging": {"target": "local", "runtime": "process", "port": staging},
        "production": {"target": "local", "runtime": "process", "port": production,
                       "approvers": ["alice"]},
    }  # fmt: skip
    project.write_spec(project.spec() | {"deploy": {"environments": environments}}, "deploy")
    staging_url, production_url = f"http://127.0.0.1:{staging}", f"http://127.0.0.1:{production}"
    settings = runtime()

    first = FlowInThread(project)
    pause = paused_run()
    run_id, pause_key = pause.split(":")
    assert version_at(staging_url) == "1"  # staging deployed before anyone was asked
    # What the Prefect UI shows above the form: the version's metrics, gates and MLflow link.
    form = read_flow_run_input(f"paused-{pause_key}-description", flow_run_id=UUID(run_id))
    assert "Deploy approval-ads v1 to production?" in form and "| roc_auc |" in form
    assert "| behaviour | passed |" in form and "/#/models/approval-ads/versions/1" in form
    # Someone not on the approvers list: the run asks again, production is untouched.
    resume_flow_run(UUID(run_id), run_input={"approve": True, "approver": "mallory", "comment": ""})
    pause = paused_run(after={pause})
    resume_flow_run(
        UUID(run_id), run_input={"approve": True, "approver": "alice", "comment": "lgtm"}
    )
    outcome = first.result()
    assert outcome.serving == ["staging", "production"]
    assert version_at(production_url) == "1"
    promoted, refused = ledger.history(settings, "approval-ads", "production")[:2]
    assert (promoted.action, promoted.actor, promoted.reason) == ("promote", "alice", "lgtm")
    # mallory's attempt is on record: who, what, and that it moved nothing.
    assert (refused.action, refused.outcome, refused.actor) == ("approve", "refused", "mallory")
    assert "not an approver of production (approvers: alice)" in refused.reason

    project.commit("second version")
    second = FlowInThread(project)
    run_id = paused_run(after={pause}).split(":")[0]
    env = {"PREFECT_API_URL": servers["prefect"], "MODELYARD_ACTOR": "bob"}
    answered = run_cli("reject", run_id, "--reason", "not on a Friday", env=env)
    assert answered.returncode == 0, answered.stdout + answered.stderr
    outcome = second.result()
    assert [r.version for r in outcome.releases] == ["2"]  # staging only
    assert version_at(staging_url) == "2" and version_at(production_url) == "1"
    client = MlflowClient()
    assert client.get_model_version_by_alias("approval-ads", "production").version == "1"
    rejected = ledger.history(settings, "approval-ads", "production")[0]
    assert (rejected.action, rejected.outcome, rejected.actor) == ("reject", "rejected", "bob")
    assert rejected.reason == "not on a Friday" and rejected.previous_version == "1"
    again = run_cli("approve", run_id, env=env)
    assert again.returncode == 1 and "not waiting for approval" in again.stderr

    # Two releases racing for production: a run of the same commit waits for approval (it saw
    # v1 serving production), meanwhile an operator deploys v2 there by hand. The approval
    # comes too late: the run moves nothing and says why, production keeps the operator's v2.
    third = FlowInThread(project)
    run_id = paused_run(after={pause}).split(":")[0]
    manual = run_cli("deploy", "production", "--version", "2", "--spec", str(project.spec_path),
                     env=env)  # fmt: skip
    assert manual.returncode == 0, manual.stdout[-2000:] + manual.stderr[-2000:]
    resume_flow_run(UUID(run_id), run_input={"approve": True, "approver": "alice", "comment": ""})
    state = third.state()
    assert state.is_failed()
    assert "approval-ads/production moved from v1 to v2 (deploy by bob" in state.message
    assert version_at(production_url) == "2"
    assert client.get_model_version_by_alias("approval-ads", "production").version == "2"
    newest = ledger.history(settings, "approval-ads", "production")[0]
    assert (newest.action, newest.version, newest.actor) == ("deploy", "2", "bob")


def test_token_rotation_moves_traffic_without_a_failed_request(registered):
    """Rotate the serving token with the same version: old → old,new → new. Each step starts
    the version again in the idle slot (its settings changed) and switches; clients on the old
    token keep working until the last step, clients on the new one from the second."""
    from pydantic import SecretStr

    old, new = "rotate-old-" + "a" * 20, "rotate-new-" + "b" * 20
    port = free_ports(3)
    spec = env_spec(registered, "rotation", {"staging": {"target": "local", "port": port}})
    front = f"http://127.0.0.1:{port}"

    def deploy(tokens: str) -> None:
        settings = runtime().model_copy(update={"serve_token": SecretStr(tokens)})
        release.deploy(settings, spec, "staging", "1", print)

    def predicts(token: str) -> int:
        response = httpx.post(f"{front}/v2/models/{spec.name}/infer", json=V2_ROW, timeout=10,
                              headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        return response.status_code

    deploy(old)
    assert (predicts(old), predicts(new)) == (200, 401)
    with LoadLoop([front], spec.name, old) as on_old:
        deploy(f"{old},{new}")  # the same version: not a no-op, its token list changed
    assert on_old.failures == [] and sum(on_old.versions[front].values()) > 0
    assert (predicts(old), predicts(new)) == (200, 200)
    with LoadLoop([front], spec.name, new) as on_new:
        deploy(new)
    assert on_new.failures == [] and sum(on_new.versions[front].values()) > 0
    assert (predicts(old), predicts(new)) == (401, 200)
    switches = ledger.history(runtime(), spec.name, "staging")
    assert [r.outcome for r in switches] == ["succeeded"] * 3


def test_a_client_over_its_rate_limit_gets_429s_and_the_others_do_not(registered):
    """An environment with a rate limit per client key: one key sending as fast as it can gets
    429s with Retry-After beyond its rate and burst, and never a 5xx; another key sending
    within its rate meanwhile gets every answer; probes and /version are never limited."""
    port = free_ports(3)
    limit = {"per_second": 5, "burst": 5, "by": "key"}
    spec = env_spec(registered, "limited", {"limited": {"target": "local", "port": port,
                                                        "rate_limit": limit}})  # fmt: skip
    release.deploy(runtime(), spec, "limited", "1", print)
    front = f"http://127.0.0.1:{port}"

    def send(key: str, path: str = f"/v2/models/{spec.name}/infer") -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKEN}", "X-Modelyard-Key": key}
        if path.endswith("/infer"):
            return httpx.post(f"{front}{path}", json=V2_ROW, headers=headers, timeout=10)
        return httpx.get(f"{front}{path}", headers=headers, timeout=10)

    greedy: list[httpx.Response] = []
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            greedy.append(send("greedy"))

    flooder = threading.Thread(target=flood)
    started = time.monotonic()
    flooder.start()
    try:
        calm = []
        for _ in range(8):  # 4 a second, within 5
            calm.append(send("calm").status_code)
            time.sleep(0.25)
        probes = [send("greedy", p).status_code for p in ("/health/ready", "/version") * 5]
    finally:
        stop.set()
        flooder.join(timeout=30)
    seconds = time.monotonic() - started
    assert calm == [200] * 8
    assert probes == [200] * 10
    codes = Counter(r.status_code for r in greedy)
    assert set(codes) == {200, 429}, codes  # refused, never failed
    assert codes[200] <= 5 * seconds + 5 + 2, (codes, seconds)  # its rate and burst, no more
    refused = next(r for r in greedy if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert "rate limit: at most 5 requests a second per client" in refused.json()["error"]


def test_https_front_door_verifies_refuses_weak_clients_and_rotates_without_a_failed_request(
    registered, prometheus_stack
):
    """MODELYARD_SERVE_TLS=local with mutual TLS: the front door and the slot's port present a
    certificate from the local CA that a client verifies, and refuse TLS 1.0/1.1, weak suites
    and plain HTTP; /metrics and the slot's port need a client certificate, which Prometheus
    shows (its configuration brought in line by the deploy, without a restart). A new
    certificate, deployed under load on kept-alive and on fresh connections, drops no request,
    and new handshakes see it."""
    from modelyard import servetls, signin

    port = free_ports(3)
    spec = env_spec(registered, "secure", {"secure": {"target": "local", "port": port}})
    settings = prometheus_stack.model_copy(
        update={"serve_tls": "local", "serve_client_ca": "local"}
    )
    release.deploy(settings, spec, "secure", "1", print)
    ca = servetls.trust(settings)
    assert ca is not None
    front = f"https://127.0.0.1:{port}"
    verify = tls.client(ca)
    assert_modern_tls_only("127.0.0.1", port, ca)
    assert httpx.get(f"{front}/version", verify=verify, timeout=10).json()["model_version"] == "1"
    plain = httpx.get(f"http://127.0.0.1:{port}/version", timeout=10)
    assert plain.status_code == 400 and "speaks HTTPS only: use https://" in plain.json()["error"]
    # Mutual TLS: /metrics at the front door and everything on the slot's own port.
    client = servetls.client_files(settings)
    assert client is not None
    shown = tls.client(ca, certificate=(client.certificate, client.key))
    assert httpx.get(f"{front}/metrics", verify=verify, timeout=10).status_code == 403
    assert httpx.get(f"{front}/metrics", verify=shown, timeout=10).status_code == 200
    state = settings.workspace / "services" / f"{spec.name}-secure" / "state.json"
    slot = json.loads(state.read_text())["active"]
    slot_port = port + (1 if slot == "blue" else 2)
    tls.handshake("127.0.0.1", slot_port, shown)
    tls.refused("127.0.0.1", slot_port, verify, "", "certificate required", "closed the connection")
    # Prometheus scrapes the slot over TLS, showing the client certificate.
    scrape = Prometheus(prometheus_stack.prometheus_url or "")
    deadline = time.monotonic() + 60
    while not scrape.query(f'up{{model="{spec.name}",environment="secure"}} == 1'):
        assert time.monotonic() < deadline, scrape.query(f'up{{model="{spec.name}"}}')
        time.sleep(1)
    # Rotation: a certificate (and key) issued anew, deployed with the same version.
    before = tls.handshake("127.0.0.1", port, verify).serial_number
    issued = certs.local_files(signin.tls_dir(settings), f"serve-{spec.name}-secure")
    issued.certificate.unlink()
    issued.key.unlink()
    urls = [front]
    with (
        LoadLoop(urls, spec.name, TOKEN, verify=verify) as kept,
        LoadLoop(urls, spec.name, TOKEN, verify=verify, keep_alive=False, pause=0.02) as fresh,
    ):
        release.deploy(settings, spec, "secure", "1", print)
    assert kept.failures == [] and fresh.failures == []
    assert sum(kept.versions[front].values()) > 0 and sum(fresh.versions[front].values()) > 0
    after = tls.handshake("127.0.0.1", port, verify).serial_number
    assert after != before
    assert after == x509.load_pem_x509_certificate(issued.certificate.read_bytes()).serial_number


def test_a_versions_model_card_matches_its_run_and_shows_a_later_rollback(registered, tmp_path):
    """The pipeline gave each version a card; a deploy, a second and a rollback later, the
    card of the version rolled away from says so, in the CLI, in its run's artifacts and in
    the MLflow version's description; its numbers are its run's; Chromium renders the HTML
    page with every section on it."""
    from playwright.sync_api import sync_playwright

    from tests.test_triggers import CHROMIUM_FLAGS

    port = free_ports(3)
    spec = env_spec(registered, "carded", {"carded": {"target": "local", "port": port}})
    settings = runtime()
    for version in ("1", "2"):
        release.deploy(settings, spec, "carded", version, print)
    release.rollback(settings, spec, "carded", print)
    client = MlflowClient()
    version = client.get_model_version(spec.name, "2")
    run = client.get_run(version.run_id)
    page = tmp_path / "card.html"
    shown = run_cli("card", spec.name, "2", "--html", str(page))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    text = shown.stdout
    for name, value in run.data.metrics.items():  # the run's numbers, each with its interval
        if name in ("roc_auc", "f1", "log_loss"):
            assert re.search(rf"\| {name} \| {value:.4g} \| [0-9.e-]+ – [0-9.e-]+ \|", text), name
    rolled = re.compile(r"\| rollback \| carded \| 1 \| 2 \| succeeded \|")
    assert rolled.search(text) and "| deploy | carded | 2 | 1 | succeeded |" in text
    assert f"git_commit | {version.tags['git_commit']}" in text
    # Kept with the version: the run's card artifact and the version's description, refreshed.
    kept = Path(client.download_artifacts(version.run_id, "card/card.md", str(tmp_path)))
    assert rolled.search(kept.read_text())
    described = client.get_model_version(spec.name, "2").description
    assert "replaced in carded by v1 (rollback" in described, described
    by_alias = run_cli("card", spec.name, "@carded", "--json")
    assert json.loads(by_alias.stdout)["version"] == "1"  # the alias went back with the rollback
    # Chromium renders the page: every section's heading is there and on the screenshot.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=CHROMIUM_FLAGS, headless=True)  # fmt: skip
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        tab.goto(page.as_uri(), wait_until="load")
        headings = tab.locator("h2").all_inner_texts()
        boxes = [tab.locator("h2").nth(i).bounding_box() for i in range(len(headings))]
        shot = tab.screenshot(path=str(tmp_path / "card.png"), full_page=True)
        browser.close()
    assert headings == list(card.SECTIONS)
    assert all(b is not None and b["width"] > 0 and b["height"] > 0 for b in boxes)
    assert len(shot) > 20_000  # a page of tables, not a blank


def test_a_version_rebuilds_from_its_lineage_and_says_what_changed(
    registered, tmp_path, monkeypatch
):
    """v1 rebuilt from its commit in a clean worktree predicts exactly as registered; a
    recorded library version that differs is named; a data file kept out of git (ignored,
    beside the code) that changed after training stops the rebuild, naming it, exit 1."""
    from modelyard.rebuild import rebuild

    settings, client = runtime(), MlflowClient()
    name = registered.spec()["name"]
    done = rebuild(settings, name, "1", registered.root, print)
    assert done.outcome == "identical", done  # a seeded estimator: the same ONNX, bit for bit
    assert client.get_model_version(name, "1").tags["rebuild.outcome"] == done.outcome
    recorded = client.get_model_version(name, "1").tags["lib.numpy"]
    client.set_model_version_tag(name, "1", "lib.numpy", "1.0.0")
    try:
        told = run_cli("rebuild", name, "1", "--repo", str(registered.root))
    finally:
        client.set_model_version_tag(name, "1", "lib.numpy", recorded)
    assert told.returncode == 0, told.stdout + told.stderr
    assert f"library differs: numpy: 1.0.0 → {recorded}" in told.stdout + told.stderr
    # Data the commit does not hold: read from the checkout, and checked by its fingerprint.
    project = Project(tmp_path / "csv", "ad_clicks", "rebuild-csv")
    csv = project.spec_path.parent / "data" / "clicks.csv"
    csv.parent.mkdir()
    example_data("ad_clicks").generate(8000, 7).to_csv(csv, index=False)  # the example's rows
    (project.root / ".gitignore").write_text("examples/ad_clicks/data/\n")
    project.write_spec(project.spec() | {"dataset": {"path": "data/clicks.csv"}}, "csv data")
    monkeypatch.setenv("MODELYARD_BUILD_IMAGE", "never")
    state = pipeline(spec_path=str(project.spec_path), deploy=False, return_state=True)
    assert state.is_completed(), state.message
    assert rebuild(settings, "rebuild-csv", "1", project.root, print).matched
    csv.write_text("\n".join(csv.read_text().splitlines()[:-1]) + "\n")  # one row fewer
    stopped = run_cli("rebuild", "rebuild-csv", "1", "--repo", str(project.root))
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert "stopped: the data changed: " in stopped.stdout + stopped.stderr
    assert client.get_model_version("rebuild-csv", "1").tags["rebuild.outcome"] == "stopped"


def test_batch_scoring_of_200k_rows_agrees_with_the_server_and_resumes_after_a_kill(
    registered, tmp_path
):
    """`modelyard predict` over 200,000 CSV rows (three bad) with v1: killed (SIGKILL) once a
    chunk is recorded, run again, it ends with every good row scored once (count and hash as a
    run never killed), the bad rows in the rejects file with the server's reason, and answers
    equal to a served v1's on a sample."""
    from modelyard import registry
    from modelyard.package.keys import trusted_keys
    from tests.serving import TOKEN as SERVER_TOKEN
    from tests.serving import Server

    frame = example_data("ad_clicks").generate(200_000, 5).drop(columns=["clicked"])
    frame = frame.astype({"device": object, "age": object})
    frame.loc[[10, 150_000], "device"] = "smart fridge"
    frame.loc[199_999, "age"] = "forty"
    source = tmp_path / "visitors.csv"
    frame.to_csv(source, index=False)
    name = registered.spec()["name"]

    def predict(out: str) -> subprocess.Popen:
        exe = Path(sys.executable).with_name("modelyard")
        return subprocess.Popen([str(exe), "predict", f"{name}/1", "--input", str(source),
                                 "--output", str(tmp_path / out), "--chunk-rows", "20000"],
                                env=process_environment(None), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip

    straight = predict("straight.parquet")
    assert straight.wait(timeout=600) == 0, straight.stdout.read() if straight.stdout else ""
    killed = predict("resumed.parquet")
    state = tmp_path / "resumed.parquet.parts" / "state.json"
    deadline = time.monotonic() + 300
    while not (state.is_file() and json.loads(state.read_text())["done"]):
        assert killed.poll() is None and time.monotonic() < deadline, "no chunk was recorded"
        time.sleep(0.05)
    # The whole process group, as a crash of the machine would: the temporary Prefect server
    # the command started dies with it (killed alone, the CLI left it running, ci64).
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert len(json.loads(state.read_text())["done"]) < 10  # it died mid-way
    again = predict("resumed.parquet")
    said = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and "resuming: chunks [" in said, said[-2000:]
    scores = {n: pd.read_parquet(tmp_path / f"{n}.parquet") for n in ("straight", "resumed")}
    assert len(scores["resumed"]) == 199_997 and scores["resumed"]["row"].is_unique
    digests = {n: hashlib.sha256(f.to_csv(index=False).encode()).hexdigest()
               for n, f in scores.items()}  # fmt: skip
    assert digests["resumed"] == digests["straight"]
    rejects = pd.read_csv(tmp_path / "resumed.rejects.csv")
    assert sorted(rejects["row"]) == [10, 150_000, 199_999]
    assert "smart fridge" in rejects.set_index("row").loc[10, "reason"]
    tags = MlflowClient().get_model_version(name, "1").tags
    assert set(scores["resumed"]["bundle_digest"]) == {tags["bundle_digest"]}
    # A served v1 answers a sample exactly as the batch did.
    bundle = registry.bundle_folder(runtime(), name, "1") / "bundle"
    server = Server(bundle, trusted_keys(runtime()), workers=1).start()
    try:
        sample = frame.drop(index=[10, 150_000, 199_999]).sample(300, random_state=1)
        split = json.loads(sample.to_json(orient="split", index=False))
        answer = httpx.post(f"{server.url}/invocations", json={"dataframe_split": split},
                            headers={"Authorization": f"Bearer {SERVER_TOKEN}"}, timeout=30)  # fmt: skip
        assert answer.status_code == 200, answer.text[:300]
    finally:
        server.stop()
    batch_says = scores["resumed"].set_index("row").loc[sample.index, "prediction"].tolist()
    assert answer.json()["predictions"] == batch_says


def test_two_releases_at_once_move_the_alias_once(registered):
    """v1 and v2 released to one environment (its own: the module's other tests use staging)
    at the same moment, both by callers that saw
    nothing serving: one rolls out, the other is refused at once and changes nothing; asked
    again later, it is refused for the move it missed. The ledger holds one record."""
    from modelyard.deploy.locks import ReleaseConflict

    port = free_ports(3)
    spec = env_spec(registered, "race", {"race": {"target": "local", "port": port}})
    settings = runtime()
    started = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def release_version(version: str) -> None:
        started.wait()
        try:
            outcomes[version] = release.deploy(settings, spec, "race", version, print,
                                               expected="")  # fmt: skip
        except ReleaseConflict as exc:
            outcomes[version] = exc

    racers = [threading.Thread(target=release_version, args=(v,)) for v in ("1", "2")]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(300)
    conflicts = {v: o for v, o in outcomes.items() if isinstance(o, ReleaseConflict)}
    assert len(outcomes) == 2 and len(conflicts) == 1, outcomes
    (loser, refusal), winner = next(iter(conflicts.items())), ({"1", "2"} - set(conflicts)).pop()
    assert f"another release of {spec.name}/race is in progress" in str(refusal)
    assert f"v{winner} by deploy-tests" in str(refusal)  # who holds it
    assert version_at(f"http://127.0.0.1:{port}") == winner
    client = MlflowClient()
    assert client.get_model_version_by_alias(spec.name, "race").version == winner
    # The loser tries again, still believing nothing serves: the move it missed is named.
    with pytest.raises(ReleaseConflict, match=f"moved from nothing to v{winner}"):
        release.deploy(settings, spec, "race", loser, print, expected="")
    records = ledger.history(settings, spec.name, "race")
    assert [(r.version, r.outcome) for r in records] == [(winner, "succeeded")]


def test_an_inventory_without_hosts_is_a_failure_not_a_silent_success(tmp_path):
    from modelyard.deploy.playbooks import run_playbook

    empty = tmp_path / "hosts.yml"
    empty.write_text("all:\n  children:\n    model_hosts:\n      hosts: {}\n")
    result = run_playbook(
        "deploy.yml", empty, {"model_service_token": TOKEN}, tmp_path / "run", print, (TOKEN,)
    )
    assert not result.ok and "no host in group model_hosts" in result.reason()
    broken = tmp_path / "broken.yml"
    broken.write_text("all: [this is: not an inventory\n")
    result = run_playbook("deploy.yml", broken, {}, tmp_path / "run2", print)
    assert not result.ok and result.reason()


@contextlib.contextmanager
def _stack_prometheus() -> Iterator[Settings]:
    """The stack's real Prometheus for the workspace the environment names, scraping every
    second: what a canary's analysis reads."""
    from modelyard import stack

    settings = runtime().model_copy(update={"stack_prometheus_port": free_ports(1),
                                            "prometheus_interval": 1})  # fmt: skip
    stack.up(settings, ["prometheus"], progress=lambda _: None)
    try:
        yield settings.model_copy(
            update={"prometheus_url": f"http://127.0.0.1:{settings.stack_prometheus_port}"}
        )
    finally:
        stack.down(settings, ["prometheus"], progress=lambda _: None)


@pytest.fixture
def prometheus_stack(registered) -> Iterator[Settings]:
    """A Prometheus for the registered versions' workspace."""
    with _stack_prometheus() as settings:
        yield settings


@pytest.fixture
def own_prometheus(servers, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """A Prometheus for a test's own workspace (`servers`), whose settings serve with the
    deploy tests' token. No module fixture: the test goes to whichever worker is free."""
    monkeypatch.setenv("MODELYARD_SERVE_TOKEN", TOKEN)
    monkeypatch.setenv("MODELYARD_ACTOR", "deploy-tests")
    with _stack_prometheus() as settings:
        yield settings


def test_a_shadow_gets_copies_clients_never_see_and_switches_in_once_approved(
    registered, prometheus_stack
):
    """v2 as a shadow of v1 under steady load, in an environment with an approver: v2's slot
    answers copies of half the requests, compares each with v1's bundle and passes on agreement
    read from the real Prometheus, while clients get v1's answers alone; the flow run then
    pauses before any traffic moves. Rejected, the shadow stops (the mirror off, v1 alone, the
    alias unmoved); a second run, approved, switches v2 in."""
    from modelyard.deploy import progressive
    from tests.test_monitoring import dashboard_queries

    settings = prometheus_stack
    port = free_ports(3)
    # p99 of ~100 copies beside a busy machine's other tests is noisy; the ratio check is the
    # canary test's and test_rollout's to prove, agreement and the pauses are this test's.
    strategy = {"kind": "shadow", "sample": 0.5, "duration": 10, "timeout": 120,
                "checks": {"min_requests": 20, "psi": 0.5, "latency_ratio": 3.0}}  # fmt: skip
    spec = env_spec(registered, "shadow", {"shadow": {
        "target": "local", "port": port, "strategy": strategy, "approvers": ["alice"]}})  # fmt: skip
    front = f"http://127.0.0.1:{port}"
    service = f"{spec.name}-shadow"
    progressive.deploy(settings, spec, "shadow", "1", lambda _: None)
    workers = _front_workers(service, settings.workspace)
    with LoadLoop([front], spec.name, TOKEN, pause=0.05) as load:
        rejected = ShadowRun(settings, spec, "2", expected="1")
        run_id = rejected.paused()
        assert set(load.versions[front]) == {"1"}, load.versions  # a shadow answers no client
        assert _shares(service, port, settings.workspace) == {"canary": 0, "shadow": 500}
        analysis = ledger.history(settings, spec.name, "shadow")[0]
        assert (analysis.action, analysis.outcome) == ("analysis", "passed"), analysis.reason
        assert analysis.reason.startswith("shadow (50% of requests copied): passed")
        assert re.search(r"agreement [\d.]+ \(threshold 0\.95\): ok", analysis.reason)
        recorded = MlflowClient().get_run(analysis.record_id).data.metrics  # MLflow charts it
        assert recorded["agreement"] >= 0.95 and recorded["agreement.threshold"] == 0.95
        # It got about its sample of the requests the baseline answered in the same window.
        assert 0.3 < recorded["requests"] / recorded["baseline_requests"] < 0.7, recorded
        prometheus = Prometheus(settings.prometheus)
        for title, expr in dashboard_queries(spec.name, shadow=True):  # Grafana's panel too
            assert prometheus.query(expr), f"dashboard panel {title!r} has no data: {expr}"
        resume_flow_run(run_id, run_input={"approve": False, "approver": "bob",
                                           "comment": "not this week"})  # fmt: skip
        assert rejected.released().outcome == "rejected"
    assert load.failures == [] and set(load.versions[front]) == {"1"}
    assert version_at(front) == "1"
    assert MlflowClient().get_model_version_by_alias(spec.name, "shadow").version == "1"
    assert len(_containers(service, settings.workspace)) == 1
    assert _shares(service, port, settings.workspace) == {"canary": 0, "shadow": 0}  # no copies
    failed, rejection = ledger.history(settings, spec.name, "shadow")[:2]
    assert (rejection.action, rejection.outcome, rejection.actor) == ("reject", "rejected", "bob")
    assert (failed.action, failed.outcome) == ("promote", "failed")
    assert "the switch was not approved" in failed.reason

    with LoadLoop([front], spec.name, TOKEN, pause=0.05) as load:
        approved = ShadowRun(settings, spec, "2", expected="1")
        resume_flow_run(approved.paused(after=rejected.pauses), run_input={
            "approve": True, "approver": "alice", "comment": "agrees on real traffic"})  # fmt: skip
        assert approved.released().outcome == "succeeded"
    assert load.failures == [] and version_at(front) == "2"
    assert MlflowClient().get_model_version_by_alias(spec.name, "shadow").version == "2"
    promoted, approval = ledger.history(settings, spec.name, "shadow")[:2]
    assert (approval.action, approval.outcome, approval.actor) == ("approve", "approved", "alice")
    assert (promoted.action, promoted.version, promoted.outcome) == ("promote", "2", "succeeded")
    # Started, stopped and switched with no reload, which closes idle keep-alive connections.
    assert _front_workers(service, settings.workspace) == workers


class ShadowRun:
    """A flow run of the deploy task for a progressive environment with approvers, in a
    background thread: it pauses for the approval at the last step."""

    def __init__(self, settings: Settings, spec: Spec, version: str, expected: str) -> None:
        from prefect import flow

        from flows.pipeline import deploy_task

        @flow(name="shadow-release")
        def release_flow() -> Any:
            return deploy_task(settings, spec, "shadow", version, "promote", None, expected,
                               asking="## Switch to the new version?")  # fmt: skip

        self.states: list[Any] = []
        self.pauses: set[str] = set()
        self.thread = threading.Thread(
            target=lambda: self.states.append(release_flow(return_state=True)), daemon=True
        )
        self.thread.start()

    def paused(self, after: set[str] = frozenset()) -> UUID:
        pause = paused_run(after=after, timeout=240, ended=self._ended)
        self.pauses = set(after) | {pause}
        return UUID(pause.split(":")[0])

    def _ended(self) -> str | None:
        """The run's end state when it ended (a failed analysis: the reason), else None."""
        return f"{self.states[0].type.value}: {self.states[0].message}" if self.states else None

    def released(self, timeout: float = 240) -> Any:
        self.thread.join(timeout)
        assert self.states, "the flow run did not finish"
        assert self.states[0].is_completed(), self.states[0].message
        return self.states[0].result()


def test_a_canary_walks_its_steps_under_load_and_a_failing_one_goes_back(
    registered, prometheus_stack
):
    """v1 goes in whole (nothing to compare a canary with), v2 walks 30 % then 100 % under
    steady load, judged from the real Prometheus, and is promoted; v1 back as a canary with a
    latency budget no version meets fails its first window and is rolled back: traffic on v2
    again, v1's slot stopped, the alias unmoved. No client request fails in either."""
    from modelyard.deploy import progressive

    settings = prometheus_stack
    port = free_ports(3)
    # The judge allows for a small window's chance (test_canary), but a busy CI machine can slow
    # one slot for a whole window (identical versions read 1.66x in ci36, 5x twice in a row in
    # the landing run of 8011b8b): the ratio check is proven on generated windows, and this
    # test's failing version is the impossible budget below.
    # Two failed windows tolerated: ci44 saw identical versions' step judged failed once and
    # passed on its re-bake. A step failed by the host's noise is judged again, which is what
    # max_failures is for; the test holds the walk to ending promoted with every step passed.
    strategy = {"kind": "canary", "steps": [30, 100], "bake": 10, "timeout": 180,
                "max_failures": 2,
                "checks": {"min_requests": 20, "psi": 0.5, "latency_ratio": 3.0}}  # fmt: skip
    spec = env_spec(registered, "canary", {"canary": {"target": "local", "port": port,
                                                      "strategy": strategy}})  # fmt: skip
    front = f"http://127.0.0.1:{port}"
    progress: list[str] = []

    service = f"{spec.name}-canary"
    first = progressive.deploy(settings, spec, "canary", "1", progress.append)
    assert first.reason == "first version: nothing to compare a canary with"
    workers = _front_workers(service, settings.workspace)
    # ~20 requests/s: enough for min_requests at 30 %, and the cores stay with Ansible.
    with LoadLoop([front], spec.name, TOKEN, pause=0.05) as load:
        second = progressive.deploy(settings, spec, "canary", "2", progress.append)
    assert load.failures == []
    assert load.versions[front]["1"] > 0 and load.versions[front]["2"] > 0  # both served
    assert version_at(front) == "2" and second.outcome == "succeeded"
    assert MlflowClient().get_model_version_by_alias(spec.name, "canary").version == "2"
    records = ledger.history(settings, spec.name, "canary")
    shown = [(r.action, r.version, r.outcome, r.reason) for r in records]
    assert [shown[0][:3], shown[-1][:3]] == [
        ("deploy", "2", "succeeded"), ("deploy", "1", "succeeded")], shown  # fmt: skip
    analyses = records[-2:0:-1]  # between the two deploys, oldest first
    assert {(r.action, r.version) for r in analyses} == {("analysis", "2")}, shown
    assert sum(r.outcome == "failed" for r in analyses) <= 2, shown  # inconclusive: re-baked
    passed = [r.reason for r in analyses if r.outcome == "passed"]
    # Each step passed once, in order: a failed window is re-baked at its own step.
    assert [reason.split(":")[0] for reason in passed] == ["step 1 (30 %)", "step 2 (100 %)"], shown
    assert passed[0].startswith("step 1 (30 %): passed: success_rate 1 (threshold 0.99)"), shown
    assert "latency_p99_ratio" in passed[0] and "prediction_psi" in passed[0], shown
    targets = json.loads((settings.workspace / "stack/prometheus/targets" /
                          f"{spec.name}-canary.json").read_text())  # fmt: skip
    assert [t["labels"]["version"] for t in targets] == ["2"]  # v1's slot is gone

    impossible = strategy | {"max_failures": 0,
                             "checks": strategy["checks"] | {"latency_budget_ms": 1e-6}}  # fmt: skip
    strict = env_spec(registered, "canary-strict", {"canary": {"target": "local", "port": port,
                                                               "strategy": impossible}})  # fmt: skip
    with (
        LoadLoop([front], spec.name, TOKEN, pause=0.05) as load,
        pytest.raises(DeployFailed) as failed,
    ):
        progressive.deploy(settings, strict, "canary", "1", progress.append)
    assert load.failures == []
    assert "rolled back to v2: step 1 (30 %): failed" in str(failed.value)
    assert "latency_p99_ms" in str(failed.value)
    assert version_at(front) == "2"
    assert MlflowClient().get_model_version_by_alias(spec.name, "canary").version == "2"
    assert len(_containers(f"{spec.name}-canary", settings.workspace)) == 1  # v2's slot alone
    latest = ledger.history(settings, spec.name, "canary")[0]
    assert (latest.action, latest.version, latest.outcome) == ("deploy", "1", "failed")
    assert ledger.live(settings, spec.name, "canary").version == "2"

    # A walk whose process is killed leaves its canary at its share; `rollout abort` then finds
    # the release lock free and sends the traffic back itself.
    unhurried = strategy | {"bake": 600, "timeout": 1200}
    slow = env_spec(registered, "canary-slow", {"canary": {"target": "local", "port": port,
                                                           "strategy": unhurried}})  # fmt: skip
    spec_file = str(slow.source_dir / "canary-slow.yaml")
    walker = subprocess.Popen(
        [str(Path(sys.executable).with_name("modelyard")), "deploy", "canary", "--version", "1",
         "--spec", spec_file], start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=process_environment({"MODELYARD_PROMETHEUS_URL": settings.prometheus}),
    )  # fmt: skip

    try:
        wait_until("the canary to take its share",
                   lambda: progressive.status(settings, spec.name, "canary"), timeout=180)  # fmt: skip
    finally:
        os.killpg(walker.pid, signal.SIGKILL)
        walker.wait(timeout=30)
    # Still split (nobody ended it): 300 of the 1000 buckets, a request's by its request id,
    # a client's by its X-Modelyard-Key (one version per key).
    assert _shares(service, port, settings.workspace) == {"canary": 300, "shadow": 0}
    answers = Counter(version_at(front) for _ in range(200))
    assert 30 <= answers["1"] <= 95, answers  # 60 expected; outside: over 4.5 sd off
    keyed = [{version_at(front, f"client-{i}") for _ in range(4)} for i in range(40)]
    assert all(len(versions) == 1 for versions in keyed), keyed
    assert set.union(*keyed) == {"1", "2"}  # 40 keys all on one side: 0.7**40
    shown = run_cli("rollout", "status", "canary", "--spec", spec_file)
    assert shown.returncode == 0 and "30 % on v1, 70 % on v2" in shown.stdout, shown.stdout
    aborted = run_cli("rollout", "abort", "canary", "--spec", spec_file)
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    assert "aborted: v2 serves canary alone, v1 stopped" in aborted.stdout
    assert {version_at(front) for _ in range(20)} == {"2"}
    assert len(_containers(f"{spec.name}-canary", settings.workspace)) == 1
    latest = ledger.history(settings, spec.name, "canary")[0]
    assert (latest.version, latest.outcome) == ("1", "failed")
    assert latest.reason == "abort by an operator after the canary's walk stopped"
    assert progressive.status(settings, spec.name, "canary") is None
    assert _shares(service, port, settings.workspace) == {"canary": 0, "shadow": 0}
    # Every step, promotion, rollback and abort moved symlinks: nginx was never reloaded, so
    # no idle keep-alive connection was closed under a client about to send on it.
    assert _front_workers(service, settings.workspace) == workers


def _without_tablets(spec: dict) -> None:
    next(f for f in spec["features"] if f["name"] == "device")["categories"] = ["desktop", "mobile"]


def _front_door(service: str, workspace: Path) -> Path:
    """The service's folder (model_service_home) on this machine."""
    return next((workspace / "services").rglob(f"{service}/nginx/nginx.conf")).parent.parent


def _front_workers(service: str, workspace: Path) -> set[int]:
    """The front door's nginx worker processes: a reload replaces every one."""
    pid = (_front_door(service, workspace) / "nginx/nginx.pid").read_text().strip()
    return set(children_of(pid))


def _shares(service: str, port: int, workspace: Path) -> dict[str, int]:
    """How many of the front door's 1000 buckets the canary and the shadow hold."""
    folder = next(
        p for p in (Path(f"/run/modelyard/{service}-{port}"), _front_door(service, workspace) / "run")
        if p.exists()
    ) / "shares"  # fmt: skip
    return {name: len(list((folder / name).iterdir())) for name in ("canary", "shadow")}


def _a_forest(spec: dict) -> None:
    # 200 shallow-ish trees on half-samples: its log loss and gender invariance pass the gates
    # (0.497 against 0.50 at most; gender moves a prediction by 0.04 at most, 0.05 allowed).
    params = {"n_estimators": 200, "min_samples_leaf": 40, "max_features": 0.7,
              "max_samples": 0.5}  # fmt: skip
    spec["estimator"] = {"class": "sklearn.ensemble.RandomForestClassifier", "params": params}
    spec["behaviour"].pop("directional")  # a forest is not monotonic row by row: the user drops it
    spec["behaviour"]["latency"]["budget_ms"] = 100  # and allows scikit-learn's walk of 200 trees


@dataclass(frozen=True)
class BadVersion:
    """A version a user could register that only live traffic shows to be bad."""

    story: str
    data_edit: tuple[str, str] | None  # (old, new) in the example's data.py
    spec_edit: Callable[[dict], None] | None
    caught_by: str  # the canary check that must send it back


BAD_VERSIONS = (
    # Its data lost the tablet category, so its schema refuses what clients still send.
    BadVersion(
        "refuses tablets",
        ("p=[0.35, 0.55, 0.10]", "p=[0.40, 0.60, 0.0]"),
        _without_tablets,
        "success_rate",
    ),
    # A forest instead of a linear model: legitimately heavier, within the budget its user set.
    BadVersion("heavier", None, _a_forest, "model_cost_ratio"),
    # Trained on labels from a shifted process: fewer clicks, so lower scores for the same rows.
    BadVersion("shifted labels", ("-5.6", "-7.0"), None, "prediction_psi"),
)


def _register_variant(project: Project, bad: BadVersion, baseline: dict[str, str]) -> str:
    """The project changed as `bad.story` says and committed, then the pipeline run on it as a
    push would: the version it registered."""
    source = baseline["data.py"]
    if bad.data_edit is not None:
        assert bad.data_edit[0] in source
        source = source.replace(*bad.data_edit)
    project.spec_path.with_name("data.py").write_text(source)
    spec = yaml.safe_load(baseline["spec"])
    if bad.spec_edit is not None:
        bad.spec_edit(spec)
    project.write_spec(spec, commit=bad.story)
    state = pipeline(spec_path=str(project.spec_path), deploy=False, return_state=True)
    assert state.is_completed(), f"{bad.story}: {state.message}"
    return state.result().version


def test_bad_versions_are_each_sent_back_by_the_check_for_their_fault(
    own_prometheus, tmp_path, monkeypatch
):
    """Real versions registered by the pipeline, on the process runtime: one refuses values
    clients send, one is a heavier model, one predicts shifted scores. Each walks in as a canary
    beside v1 under batches of generated traffic and is sent back by its own check: all traffic
    on v1 again, the alias unmoved, the ledger naming the metric."""
    from modelyard.deploy import progressive

    project = Project(tmp_path / "guarded-repo", "ad_clicks", "guarded-ads")
    baseline = {"data.py": project.spec_path.with_name("data.py").read_text(),
                "spec": project.spec_path.read_text()}  # fmt: skip
    state = pipeline(spec_path=str(project.spec_path), deploy=False, return_state=True)
    assert state.is_completed(), state.message
    versions = {bad.story: _register_variant(project, bad, baseline) for bad in BAD_VERSIONS}

    port = free_ports(3)
    # p99 judged loosely (3x) as in the walk test: a busy CI machine slows one slot for a whole
    # window, and a heavier version's p99 with it (a 1000-tree forest, 3.9x its baseline's on
    # an idle machine, passed 1.5x in ci38 beside the other worker). Its row cost, read on each
    # server's own CPU clock, does not move with the machine's load.
    strategy = {"kind": "canary", "steps": [30, 100], "bake": 10, "timeout": 120,
                "max_failures": 0, "checks": {"min_requests": 20, "latency_ratio": 3.0,
                                              "cost_ratio": 3.0}}  # fmt: skip
    spec = env_spec(project, "guarded", {"guard": {"target": "local", "runtime": "process",
                                                   "port": port, "strategy": strategy}})  # fmt: skip
    settings = own_prometheus
    front = f"http://127.0.0.1:{port}"
    progressive.deploy(settings, spec, "guard", "1", lambda _: None)  # the first goes in whole
    traffic = example_data("ad_clicks").generate(4000, 2026).drop(columns="clicked")
    # ~10 batches of 100 rows a second: each slot's p99 is its model's, not the queue's.
    batches = v2_batches(traffic, rows=100)
    for bad in BAD_VERSIONS:
        story, check, version = bad.story, bad.caught_by, versions[bad.story]
        with (
            LoadLoop([front], spec.name, TOKEN, pause=0.1, bodies=batches) as load,
            pytest.raises(DeployFailed) as failed,
        ):
            progressive.deploy(settings, spec, "guard", version, lambda _: None)
        message = str(failed.value)
        assert "rolled back to v1: step 1 (30 %): failed" in message, f"{story}: {message}"
        analysis = ledger.history(settings, spec.name, "guard")[1]
        assert (analysis.action, analysis.outcome) == ("analysis", "failed"), story
        assert analysis.version == version
        failed_checks = re.findall(r"(\w+) \S+ \(threshold [^)]*\): FAILED", analysis.reason)
        print(f"{story}: {analysis.reason}")  # readings, for a run with -s
        if story == "heavier":  # a forest's scores are not a line's: PSI may see them too
            assert check in failed_checks, f"{story}: {analysis.reason}"
            assert set(failed_checks) <= {check, "prediction_psi"}, f"{story}: {analysis.reason}"
        else:
            assert failed_checks == [check], f"{story}: {analysis.reason}"
        # Clients got answers from both versions; refusals only from the one that refuses.
        assert set(load.versions[front]) <= {"1", version}
        refused = [f for f in load.failures if " 400 " in f and "tablet" in f]
        assert load.failures == (refused if story == "refuses tablets" else []), load.failures[:3]
        assert {version_at(front) for _ in range(20)} == {"1"}, story
        assert MlflowClient().get_model_version_by_alias(spec.name, "guard").version == "1"
        assert ledger.live(settings, spec.name, "guard").version == "1"
        assert progressive.status(settings, spec.name, "guard") is None
