"""Faults injected for real, and what they leave behind.

- A run SIGKILLed between register and alias, found and repaired by `modelyard doctor`; an
  alias that disagrees with the ledger.
- The Docker engine restarted during a build, the image registry down at push, the MLflow
  server killed mid-run: what is transient is retried, what stays broken fails the run with a
  clear message and leaves no version, alias, ledger record or image behind.
- The workspace's disk full mid-run (a small tmpfs filled up).

An SSH host lost mid-rollout is in test_deploy.py, beside the other rollouts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mlflow import MlflowClient

from modelyard.config import runtime
from modelyard.deploy import ledger
from modelyard.deploy.ledger import Release
from tests.conftest import run_cli

pytestmark = pytest.mark.docker


def _registered_versions(tracking: str, model: str) -> list[dict]:
    """The model's versions, or none yet: a poll, so an MLflow busy past the timeout (the run
    and two other workers' tests share its SQLite; ci88) only means asking again."""
    try:
        response = httpx.get(f"{tracking}/api/2.0/mlflow/model-versions/search",
                             params={"filter": f"name = '{model}'"}, timeout=5)  # fmt: skip
    except httpx.TimeoutException:
        return []
    return response.json().get("model_versions", []) if response.status_code == 200 else []


def test_a_run_killed_between_register_and_alias_is_repaired_by_doctor(
    servers, ads, tmp_path, monkeypatch
):
    # The kill must land between register and the package stage's tags every time, on a busy
    # machine too (a poll that saw the version late once let the package stage finish). The
    # run reads its signing key from a FIFO: the export (before register) is given the key,
    # and the package stage's read (after register) finds no writer and waits there.
    key = tmp_path / "signing-key.pem"
    os.mkfifo(key)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    threading.Thread(target=key.write_bytes, args=(pem,), daemon=True).start()
    monkeypatch.setenv("MODELYARD_SIGNING_KEY_FILE", str(key))
    model, spec = ads.spec()["name"], str(ads.spec_path)
    log = tmp_path / "run.log"
    exe = Path(sys.executable).with_name("modelyard")
    run = subprocess.Popen([str(exe), "run", "--no-deploy", "--spec", spec],
                           stdout=log.open("w"), stderr=subprocess.STDOUT,
                           start_new_session=True)  # fmt: skip
    # SIGKILL the whole run once its version exists: after `register`, while the package stage
    # waits for its key, before it tags a bundle and the `candidate` alias moves (no handler
    # runs on SIGKILL).
    deadline = time.monotonic() + 300
    try:
        while not _registered_versions(servers["mlflow"], model):
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no version was registered"
            time.sleep(0.02)
    finally:  # killed also when the wait fails: the run would wait on the FIFO for ever
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    monkeypatch.delenv("MODELYARD_SIGNING_KEY_FILE")  # later runs sign with the workspace's key

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
    record = ledger.history(runtime(), model)[0]
    assert (record.action, record.version, record.outcome) == ("withdraw", "1", "succeeded")
    clean = run_cli("doctor", "--spec", spec)
    assert clean.returncode == 0 and "nothing half-finished" in clean.stdout

    # The other trace a killed deploy leaves: hosts switched (the ledger says v2 serves
    # staging) but the alias never moved. The ledger record is written directly here; the
    # deploy path that writes it is tested in test_deploy.py.
    settings = runtime()
    ledger.append(settings, Release(model=model, environment="staging", action="deploy",
                                    version="2", outcome=ledger.SUCCEEDED, actor="test"))  # fmt: skip
    drift = run_cli("doctor", "--spec", spec)
    assert drift.returncode == 1
    assert "alias 'staging' points at nothing but the ledger says v2 serves staging" in drift.stdout
    assert run_cli("doctor", "--spec", spec, "--fix").returncode == 0
    assert client.get_model_version_by_alias(model, "staging").version == "2"


class WatchedRun:
    """`modelyard run` in the background, its output in a file the test watches for stages."""

    def __init__(self, spec: str, log: Path, *args: str) -> None:
        self.log = log
        exe = Path(sys.executable).with_name("modelyard")
        self.process = subprocess.Popen([str(exe), "run", "--spec", spec, *args],
                                        stdout=log.open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def reaches(self, marker: str, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.text():
            assert self.process.poll() is None, f"ended before {marker!r}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {marker!r} within {timeout} s"
            time.sleep(0.1)

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        return self.process.wait(timeout=timeout), self.text()


ENGINE_SCRIPT = Path(__file__).resolve().parents[1] / "infra" / "scripts" / "docker-engine.sh"


@dataclass(frozen=True)
class Engine:
    host: str  # DOCKER_HOST
    data: Path  # the script's MODELYARD_DOCKER_DATA: dockerd.pid, dockerd.log, data-root

    def start(self) -> None:
        """Start dockerd the way infra/scripts/docker-engine.sh does for CI."""
        environment = {**os.environ, "DOCKER_HOST": self.host,
                       "MODELYARD_DOCKER_SOCK": self.host.removeprefix("unix://"),
                       "MODELYARD_DOCKER_DATA": str(self.data)}  # fmt: skip
        subprocess.run([str(ENGINE_SCRIPT)], env=environment, check=True, capture_output=True,
                       timeout=120)  # fmt: skip

    def stop(self) -> None:
        """SIGTERM, as `systemctl restart` would, and wait for it to be gone."""
        pid = int((self.data / "dockerd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture
def own_engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """A Docker engine of this test's own, holding the base image: the test restarts it, and
    the tests running beside it keep theirs."""
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        pytest.skip("starting a Docker engine of its own needs root and dockerd (CI has both)")
    data = Path(tempfile.mkdtemp(prefix="my-engine-", dir="/tmp"))  # a socket path is short
    engine = Engine(f"unix://{data}/docker.sock", data)
    engine.start()
    try:
        base = os.environ.get("MODELYARD_BASE_IMAGE", "python:3.11-slim")
        saved = subprocess.run(["docker", "save", base], capture_output=True, check=True).stdout
        subprocess.run(["docker", "-H", engine.host, "load"], input=saved, capture_output=True,
                       check=True)  # fmt: skip
        monkeypatch.setenv("DOCKER_HOST", engine.host)
        yield engine
    finally:
        engine.stop()
        # dockerd leaves its network namespace mounted under its exec-root
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(f"{data}/")), reverse=True):
            subprocess.run(["umount", mount], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_engine_restart_registry_down_and_mlflow_lost_mid_run(
    servers, ads, own_engine, tmp_path, monkeypatch
):
    from modelyard import stack
    from modelyard.config import Settings
    from modelyard.ports import free_port
    from tests.conftest import MlflowServer

    (tmp_path / "mlflow").mkdir()
    mlflow = MlflowServer(tmp_path / "mlflow").start()
    registry = Settings(workspace=tmp_path / "registry", stack_registry_port=free_port())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.url)
    monkeypatch.setenv("MODELYARD_BUILD_IMAGE", "always")  # the build and push are the point
    monkeypatch.setenv("MODELYARD_IMAGE_REGISTRY", f"127.0.0.1:{registry.stack_registry_port}")
    model, spec = ads.spec()["name"], str(ads.spec_path)
    client = MlflowClient(mlflow.url, mlflow.url)
    try:
        # 1. The engine restarts while the image builds: the build is retried and passes. The
        # registry is down for good: the push fails after its retries, and the version that
        # cannot ship is withdrawn. Nothing is left that says otherwise.
        run = WatchedRun(spec, tmp_path / "run1.log", "--no-deploy")
        run.reaches("image: Step 1/")
        own_engine.stop()
        own_engine.start()
        code, log = run.finish()
        assert code != 0, log[-3000:]
        assert log.count("image: Step 1/") >= 2, "the build was not retried"
        assert "the registry does not answer: is it running?" in log, log[-3000:]
        assert client.search_registered_models(f"name = '{model}'") == []  # as before the run
        assert ledger.history(runtime(), model) == []
        assert run_cli("doctor", "--spec", spec).returncode == 0  # nothing half-finished

        # 2. MLflow is killed just after the run opened its MLflow run and is back 8 s later;
        # the registry comes up between two push attempts. The run rides both out.
        run = WatchedRun(spec, tmp_path / "run2.log", "--no-deploy")
        run.reaches("MLflow run: ")
        mlflow.stop()
        time.sleep(8)
        mlflow.start()
        run.reaches("push: 127.0.0.1")
        stack.up(registry, ["registry"], progress=lambda _: None)
        code, log = run.finish()
        assert code == 0, log[-3000:]
        assert "after connection broken" in log  # the outage did hit calls; they were retried
        version = client.get_model_version_by_alias(model, "candidate")
        listed = client.search_model_versions(f"name = '{model}'")
        assert [v.version for v in listed] == [version.version]  # the failed one stays gone
        ref, digest = version.tags["image_ref"], version.tags["image_digest"]
        assert ref == f"{version.tags['image_repository']}@{digest}"
        repository = version.tags["image_repository"].split("/", 1)[1]
        manifest = httpx.head(
            f"http://127.0.0.1:{registry.stack_registry_port}/v2/{repository}/manifests/{digest}",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        )
        assert manifest.status_code == 200
        assert run_cli("doctor", "--spec", spec).returncode == 0
    finally:
        stack.down(registry, ["registry"], progress=lambda _: None)
        mlflow.stop()


def _fill(path: Path) -> None:
    """Write `path` until its disk is full."""
    chunk = b"\0" * (1 << 20)
    with path.open("wb") as filler:
        try:
            while True:
                filler.write(chunk)
                filler.flush()
        except OSError:
            pass


def test_a_full_workspace_disk_fails_the_run_clearly_and_loses_nothing(
    servers, ads, tmp_path, monkeypatch
):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    workspace = tmp_path / "small-disk"
    workspace.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(workspace)], check=True)
    monkeypatch.setenv("MODELYARD_WORKSPACE", str(workspace))
    monkeypatch.setenv("PREFECT_API_URL", servers["prefect"])  # only modelyard's files here
    model, spec = ads.spec()["name"], str(ads.spec_path)
    client = MlflowClient(servers["mlflow"], servers["mlflow"])
    try:
        run = WatchedRun(spec, tmp_path / "run.log", "--no-deploy")
        run.reaches("MLflow run: ")
        _fill(workspace / "filler")
        code, log = run.finish()
        assert code != 0, log[-3000:]
        assert f"the disk holding {workspace}" in log and "is full" in log, log[-3000:]
        assert client.search_model_versions(f"name = '{model}'") == []
        assert ledger.history(runtime(), model) == []
        (workspace / "filler").unlink()
        assert run_cli("doctor", "--spec", spec).returncode == 0
        again = run_cli("run", "--no-deploy", "--spec", spec)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert client.get_model_version_by_alias(model, "candidate")
    finally:
        subprocess.run(["umount", "--lazy", str(workspace)], check=True)
