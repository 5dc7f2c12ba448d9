"""The stack signs in: its registry, Prometheus and Alertmanager over TLS with a password.

In process: the local CA and its certificates, the servers' configuration (promtool), the
refusals. Against the real servers: each refuses no or wrong credentials, plain HTTP and TLS
older than 1.2, and answers modelyard's own clients; Prometheus scrapes itself and reaches
Alertmanager signed in; an image is pushed with the sign-in and pulled by digest only with it.
"""

from __future__ import annotations

import datetime
import io
import json
import ssl
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest
from cryptography import x509

from modelyard import certs, signin, stack
from modelyard.config import Settings
from modelyard.errors import ModelyardError
from modelyard.monitor.drift import Prometheus, prometheus_for
from modelyard.package.push import push_image, registry_pull_vars
from modelyard.ports import free_port, free_ports
from tests.conftest import Project
from tests.hosts import remove_image, stop_services, version_at
from tests.stacks import Stack, wait_until

PASSWORD = "stack-pass-41c9"
SIGNED_IN = list(signin.SERVICES)


def signed_in_settings(workspace: Path, **changes: object) -> Settings:
    ports = {f"stack_{name}_port": free_port() for name in SIGNED_IN}
    return Settings(workspace=workspace, stack_password=PASSWORD, prometheus_interval=1,
                    **(ports | changes))  # fmt: skip


def quiet(_: str) -> None:
    pass


# --- in process ----------------------------------------------------------------------------------


def test_the_local_ca_issues_a_certificate_for_the_host_and_renews_it_when_needed(tmp_path):
    files = certs.local_server_files(tmp_path, ["127.0.0.1", "localhost"])
    context = ssl.create_default_context(cafile=str(files.ca))
    context.load_cert_chain(files.certificate, files.key)  # the key is the certificate's
    host = x509.load_pem_x509_certificate(files.certificate.read_bytes())
    names = host.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"127.0.0.1", "localhost"}
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "modelyard local CA"),),)
    ]
    for private in (files.key, tmp_path / "ca-key.pem"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # The same hosts: nothing issued again. Another host: a new certificate, the same CA.
    first = files.certificate.read_bytes()
    assert (
        certs.local_server_files(tmp_path, ["127.0.0.1", "localhost"]).certificate.read_bytes()
        == first
    )
    ca = files.ca.read_bytes()
    certs.local_server_files(tmp_path, ["stack.internal"])
    assert files.certificate.read_bytes() != first and files.ca.read_bytes() == ca
    # One that ends within 30 days is issued again.
    assert not certs._needs_issuing(files.certificate, ["stack.internal"])
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=380)
    assert later > host.not_valid_after_utc - certs.RENEW_WITHIN


def test_the_servers_configuration_asks_for_tls_and_the_password(tmp_path):
    settings = signed_in_settings(tmp_path / "ws")
    signin.prepare(settings)  # the local CA and the host's certificate, as `up` makes them
    services = {s.name: s for s in stack.plan(settings)}
    for name in SIGNED_IN:
        assert services[name].url.startswith("https://"), name
        folder = services[name].folder(settings)
        stack.write_files(services[name], folder)
        assert PASSWORD not in repr(services[name])
    for name in ("mlflow", "prefect"):  # their own sign-in settings; unchanged here
        assert services[name].url.startswith("http://")
    prometheus = stack.stack_dir(settings) / "prometheus"
    web = json.loads((prometheus / "web.yml").read_text())
    assert web["tls_server_config"]["min_version"] == "TLS12"
    assert bcrypt.checkpw(PASSWORD.encode(), web["basic_auth_users"]["modelyard"].encode())
    assert PASSWORD not in (prometheus / "web.yml").read_text()
    checked = subprocess.run(["promtool", "check", "web-config", str(prometheus / "web.yml")],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Prometheus's own scrape and its alerts sign in with the password from a private file.
    config = json.loads((prometheus / "prometheus.yml").read_text())
    own = config["scrape_configs"][0]
    assert own["scheme"] == "https" and own["basic_auth"]["username"] == "modelyard"
    assert Path(own["basic_auth"]["password_file"]).read_text() == PASSWORD
    assert config["alerting"]["alertmanagers"][0]["scheme"] == "https"
    registry = json.loads((stack.stack_dir(settings) / "registry" / "config.yml").read_text())
    assert registry["http"]["tls"]["minimumtls"] == "tls1.2"
    user, hashed = (stack.stack_dir(settings) / "registry" / "htpasswd").read_text().split(":", 1)
    assert user == "modelyard" and bcrypt.checkpw(PASSWORD.encode(), hashed.strip().encode())


def test_sign_in_mistakes_are_refused_naming_the_setting(tmp_path):
    cases = {
        "MODELYARD_STACK_TLS_CERT and MODELYARD_STACK_TLS_KEY go together":
            {"stack_tls_cert": tmp_path / "cert.pem"},
        "MODELYARD_STACK_CA=": {"stack_ca": tmp_path / "missing-ca.pem"},
    }  # fmt: skip
    for expected, change in cases.items():
        settings = signed_in_settings(tmp_path / "ws", **change)
        with pytest.raises(stack.StackError, match=expected):
            stack.up(settings, ["prometheus"], progress=quiet)
    # Beyond loopback the three need the password, as MLflow and Prefect need theirs.
    exposed = Settings(workspace=tmp_path / "ws2", stack_host="0.0.0.0")
    with pytest.raises(stack.StackError, match="set MODELYARD_STACK_PASSWORD"):
        stack.up(exposed, ["registry"], progress=quiet)
    assert not list((tmp_path / "ws").glob("stack/*/state.json"))


def test_hosts_get_the_sign_in_for_the_stacks_registry_only(tmp_path, monkeypatch):
    settings = signed_in_settings(tmp_path / "ws", image_registry="stack")
    monkeypatch.setattr(stack, "running_url", lambda s, name: "https://127.0.0.1:5001")
    ours = registry_pull_vars(settings, "127.0.0.1:5001/modelyard/ads@sha256:" + "a" * 64)
    assert ours["model_service_registry_host"] == "127.0.0.1:5001"
    assert ours["model_service_registry_auth"] == "bW9kZWx5YXJkOnN0YWNrLXBhc3MtNDFjOQ=="
    assert registry_pull_vars(settings, "registry.example.com/ads@sha256:" + "a" * 64) == {}


# --- the real servers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed_in_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = signed_in_settings(tmp_path_factory.mktemp("signin") / "ws")
    stack.up(settings, SIGNED_IN, progress=quiet)
    yield settings
    stack.down(settings, SIGNED_IN, progress=quiet)


HEALTH = {"registry": "/v2/", "prometheus": "/-/ready", "alertmanager": "/-/ready"}


def test_each_service_refuses_without_the_password_and_old_or_plain_protocols(signed_in_stack):
    settings = signed_in_stack
    access = signin.access(settings)
    assert access is not None
    for name, path in HEALTH.items():
        url = stack.running_url(settings, name)
        assert url and url.startswith("https://"), url
        with httpx.Client(verify=access.ssl_context(), timeout=10) as client:
            assert client.get(url + path).status_code == 401, name
            assert client.get(url + path, auth=("modelyard", "wrong")).status_code == 401, name
            assert client.get(url + path, auth=access.auth).status_code == 200, name
        # Plain HTTP to the same port gets no answer from the service.
        plain = httpx.get(url.replace("https://", "http://") + path, auth=access.auth, timeout=10)
        assert plain.status_code == 400, name
        old = access.ssl_context()
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer 1.1 at all
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + path, auth=access.auth, verify=old, timeout=10)
        # Nor does a client that does not trust the stack's CA go on.
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + path, auth=access.auth, timeout=10)


def test_up_with_other_settings_says_to_restart_instead_of_waiting(signed_in_stack):
    plain = signed_in_stack.model_copy(update={"stack_password": None})
    started = time.monotonic()
    with pytest.raises(stack.StackError, match="stack down registry`, then `stack up` again"):
        stack.up(plain, ["registry"], progress=quiet)
    assert time.monotonic() - started < 10  # not the start timeout
    assert stack.status(signed_in_stack)[0].up  # and it left the running one alone


def test_prometheus_scrapes_and_alerts_signed_in_and_modelyard_queries_signed_in(signed_in_stack):
    settings = signed_in_stack.model_copy(
        update={"prometheus_url": stack.running_url(signed_in_stack, "prometheus")}
    )
    prometheus = prometheus_for(settings)  # the stack's: with its sign-in
    wait_until("Prometheus's scrape of itself, signed in",
               lambda: prometheus.values('up{job="prometheus"}') == {(): 1.0}, timeout=60)  # fmt: skip
    access = signin.access(settings)
    assert access is not None
    listed = httpx.get(f"{prometheus.url}/api/v1/alertmanagers", auth=access.auth,
                       verify=access.ssl_context(), timeout=10).json()  # fmt: skip
    alertmanager = stack.running_url(settings, "alertmanager")
    assert [a["url"] for a in listed["data"]["activeAlertmanagers"]] == [
        f"{alertmanager}/api/v2/alerts"
    ]
    with pytest.raises(ModelyardError, match="Unauthorized"):
        Prometheus(prometheus.url, signin.Access("modelyard", "wrong", access.ca)).query("up")
    # The sign-in goes to the stack's Prometheus only, never to one configured elsewhere.
    elsewhere = settings.model_copy(update={"prometheus_url": "https://prometheus.example.com"})
    assert prometheus_for(elsewhere).access is None


@pytest.mark.docker
def test_an_image_is_pushed_signed_in_and_pulled_by_digest_only_with_the_sign_in(signed_in_stack):
    import docker

    settings = signed_in_stack.model_copy(update={"image_registry": "stack"})
    client = docker.from_env()
    local = "modelyard-signin-probe:1"
    client.api.import_image_from_data(_tiny_rootfs(), repository=local.split(":")[0], tag="1")
    try:
        pushed = push_image(settings, local, "signin-probe", "1", "b" * 64, quiet)
        host = pushed.repository.split("/", 1)[0]
        client.images.remove(f"{pushed.repository}:{pushed.tag}")
        with pytest.raises(docker.errors.APIError, match=r"no basic auth credentials|unauthorized"):
            client.images.pull(pushed.ref)
        wrong = {"username": "modelyard", "password": "wrong"}
        with pytest.raises(docker.errors.APIError, match=r"unauthorized|authentication required"):
            client.images.pull(pushed.ref, auth_config=wrong)
        access = signin.access(settings)
        assert access is not None
        pulled = client.images.pull(pushed.ref, auth_config={"username": access.username,
                                                             "password": access.password})  # fmt: skip
        assert pushed.ref in pulled.attrs["RepoDigests"]
        assert registry_pull_vars(settings, pushed.ref)["model_service_registry_host"] == host
    finally:
        registry = stack.running_url(settings, "registry").split("://")[1]
        names = (local.split(":")[0], f"{registry}/modelyard/signin-probe")
        for image_id in {i.id for name in names for i in client.images.list(name=name)}:
            client.images.remove(image_id, force=True)
        client.close()


@pytest.mark.docker
def test_a_deploy_pulls_from_the_signed_in_registry_and_leaves_no_credential(
    wheelhouse, tmp_path, empty_prefect_db
):
    """The pull path end to end: a run pushes the image with the stack's sign-in; the deploy's
    host (this machine's engine, the image removed from it first) pulls it by digest with the
    sign-in, which is gone from the host afterwards and shows in no output or record."""
    stack = Stack(tmp_path / "workspace", wheelhouse, empty_prefect_db)
    stack.env |= {"MODELYARD_STACK_PASSWORD": PASSWORD, "MODELYARD_IMAGE_REGISTRY": "stack"}
    up = stack.cli("stack", "up", "prefect", "mlflow", "registry")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        project = Project(tmp_path / "repo", "ad_clicks", "signin-ads")
        port = free_ports(3)
        project.write_spec(project.spec() | {"deploy": {"environments": {
            "staging": {"target": "local", "port": port}}}}, "deploy")  # fmt: skip
        spec = str(project.spec_path)
        run = stack.cli("run", "--no-deploy", "--spec", spec, MODELYARD_BUILD_IMAGE="always")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        from mlflow.tracking import MlflowClient

        tags = MlflowClient(stack.url("mlflow")).get_model_version("signin-ads", "1").tags
        assert tags["image_ref"].startswith(f"127.0.0.1:{stack.ports['registry']}/")
        remove_image(tags)
        deployed = stack.cli("deploy", "staging", "--version", "1", "--spec", spec)
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        assert version_at(f"http://127.0.0.1:{port}") == "1"
        assert _pulled(tags), "the image is not back on the engine: what did the deploy run?"
        services = stack.workspace / "services"
        assert not list(services.glob("*/docker/config.json")), "the sign-in stayed on the host"
        history = stack.cli("history", "signin-ads", "--json")
        for text in (run.stdout, run.stderr, deployed.stdout, deployed.stderr, history.stdout,
                     repr(tags)):  # fmt: skip
            assert PASSWORD not in text and "bW9kZWx5YXJkOnN0YWNrLXBhc3MtNDFjOQ" not in text
    finally:
        stack.cli("stack", "down")
        stop_services(stack.workspace)


def _pulled(tags: dict[str, str]) -> bool:
    """The engine holds the image by digest again: the deploy pulled it."""
    found = subprocess.run(["docker", "image", "inspect", tags["image_ref"]], capture_output=True)
    return found.returncode == 0


def _tiny_rootfs() -> bytes:
    """A one-file image's root filesystem, for `docker import`: nothing to pull, kilobytes."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        body = b"modelyard sign-in probe\n"
        info = tarfile.TarInfo("probe.txt")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    return data.getvalue()
