"""Serving TLS settings, in process: what a deploy refuses before it touches a host, the
certificates the local CA issues, and what the role and Prometheus are given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from modelyard import certs, servetls, stack
from modelyard.config import Settings
from modelyard.deploy.release import reached_at
from modelyard.errors import DeployFailed
from modelyard.monitor.targets import SlotTarget, write_targets


def pair(folder: Path, hosts: list[str], name: str = "web") -> tuple[bytes, bytes]:
    files = certs.local_server_files(folder, hosts, name=name)
    return files.certificate.read_bytes(), files.key.read_bytes()


def test_a_certificate_that_cannot_serve_the_hosts_is_named_with_the_reason(tmp_path):
    chain, key = pair(tmp_path / "ca", ["127.0.0.1", "*.svc.example"])
    trust = tmp_path / "ca" / "ca.pem"
    assert certs.problems(chain, key, ["127.0.0.1", "a.svc.example"], "CERT", trust) == []
    _, other_key = pair(tmp_path / "ca", ["127.0.0.1"], name="other")
    assert certs.problems(chain, other_key, ["127.0.0.1"], "CERT", trust) == [
        "CERT: the key is not the certificate's"
    ]
    # A wildcard names one label: not the bare domain, not two labels down.
    (unnamed,) = certs.problems(chain, key, ["b.c.svc.example", "svc.example"], "CERT", trust)
    assert "does not name b.c.svc.example, svc.example" in unnamed and "ansible_host" in unnamed
    # Issued by another CA than the one clients are told to trust.
    pair(tmp_path / "elsewhere", ["127.0.0.1"])
    (unchained,) = certs.problems(
        chain, key, ["127.0.0.1"], "CERT", tmp_path / "elsewhere" / "ca.pem"
    )
    assert "does not chain to a CA in" in unchained and "MODELYARD_SERVE_TLS_CA" in unchained
    (garbled,) = certs.problems(b"not a certificate", key, ["127.0.0.1"], "CERT", trust)
    assert garbled.startswith("CERT: not a PEM certificate")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"serve_tls": "local", "serve_tls_cert": "x"}, "MODELYARD_SERVE_TLS=local issues"),
        ({"serve_tls_cert": "x"}, "MODELYARD_SERVE_TLS_CERT and MODELYARD_SERVE_TLS_KEY go"),
        ({"serve_tls_cert": "x", "serve_tls_cert_file": Path("/x"), "serve_tls_key": "k"},
         "MODELYARD_SERVE_TLS_CERT and MODELYARD_SERVE_TLS_CERT_FILE are both set"),
        ({"serve_client_ca": "local"}, "MODELYARD_SERVE_CLIENT_CA asks for mutual TLS"),
        ({"serve_tls": "local", "serve_client_ca": "/etc/hosts"},
         "set MODELYARD_SERVE_CLIENT_CERT and _KEY"),
        ({"serve_tls": "local", "serve_client_ca": "local", "serve_client_cert": Path("/x")},
         "MODELYARD_SERVE_CLIENT_CA=local issues the client certificate itself"),
        ({"serve_tls_cert_file": Path("/missing.pem"), "serve_tls_key": "k"},
         "MODELYARD_SERVE_TLS_CERT_FILE=/missing.pem cannot be read"),
    ],
)  # fmt: skip
def test_settings_that_cannot_work_are_refused_naming_the_setting(tmp_path, changes, expected):
    settings = Settings(workspace=tmp_path, **changes)
    found = servetls.problems(settings)
    assert any(expected in f for f in found), found
    if servetls.enabled(settings):  # a deploy stops there, before any host is touched
        with pytest.raises(DeployFailed, match=expected.split("=")[0]):
            servetls.serving_tls(settings, "m", "e", ["127.0.0.1"])


def test_local_tls_issues_each_environment_a_certificate_naming_its_hosts(tmp_path):
    settings = Settings(workspace=tmp_path, serve_tls="local", serve_client_ca="local")
    tls = servetls.serving_tls(settings, "churn", "prod", ["10.1.2.3", "web.internal"])
    assert tls is not None and tls.trust is not None
    leaf = x509.load_pem_x509_certificate(tls.certificate.encode())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"10.1.2.3", "web.internal", "127.0.0.1", "localhost"}
    assert certs.problems(tls.certificate.encode(), tls.key.encode(), ["web.internal"], "c",
                          tls.trust) == []  # fmt: skip
    assert tls.key not in repr(tls)
    # Another environment, another certificate; the same CA and client certificate.
    other = servetls.serving_tls(settings, "churn", "staging", ["127.0.0.1"])
    assert other is not None and other.certificate != tls.certificate
    assert other.client_ca == tls.client_ca == tls.trust.read_text()
    variables = servetls.role_vars(tls)
    assert variables["model_service_tls_ciphers"] == certs.CIPHERS
    client = x509.load_pem_x509_certificate(variables["model_service_tls_client_cert"].encode())
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    hidden = servetls.secrets(variables)
    assert tls.key in hidden and tls.key.replace("\n", "\\n") in hidden
    assert variables["model_service_tls_client_key"] in hidden
    assert servetls.role_vars(None) == {"model_service_tls_cert": ""}


def test_prometheus_scrapes_the_services_over_tls_with_the_client_certificate(tmp_path):
    settings = Settings(workspace=tmp_path, serve_tls="local", serve_client_ca="local")
    servetls.prepare(settings)
    (service,) = [s for s in stack.plan(settings) if s.name == "prometheus"]
    jobs = {j["job_name"]: j for j in json.loads(service.files["prometheus.yml"])["scrape_configs"]}
    tls = jobs["modelyard"]["tls_config"]
    assert [Path(tls[k]).is_file() for k in ("ca_file", "cert_file", "key_file")] == [True] * 3
    assert "tls_config" not in jobs["prometheus"]  # its own scrape: the stack's sign-in only
    # Each target says it speaks https: services deployed before TLS keep theirs.
    path = write_targets(settings, "churn", "prod", [SlotTarget("h", "blue", "1.2.3.4:8081", "3")])
    (group,) = json.loads(path.read_text())
    assert group["labels"]["__scheme__"] == "https"
    plain = Settings(workspace=tmp_path)
    (group,) = json.loads(write_targets(plain, "churn", "prod", [SlotTarget("h", "blue", "a:1", "3")])
                          .read_text())  # fmt: skip
    assert "__scheme__" not in group["labels"]


def test_hosts_are_reached_where_the_role_checks_and_prometheus_scrapes():
    assert reached_at("web1", {}) == "127.0.0.1"
    assert reached_at("web1", {"model_service_bind": "10.0.0.4"}) == "10.0.0.4"
    assert reached_at("web1", {"model_service_bind": "0.0.0.0", "ansible_host": "web1.lan"}) == (
        "web1.lan"
    )
    assert reached_at("web1", {"model_service_bind": "::"}) == "web1"
