"""A local certificate authority, for servers that have no certificate of their own.

`modelyard stack up` with sign-in serves its registry, Prometheus and Alertmanager over TLS.
Without a certificate in the settings it creates a CA once (`ca.pem`, its key never leaves
the folder, mode 0600) and issues the stack's host a certificate from it, issued again when
the host changes or the certificate nears its end. Clients trust `ca.pem`: modelyard's own do
by default; a browser or another machine's Docker needs it installed (docs/security.md).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from modelyard.atomic import create_private, replace_file

CA_DAYS = 3650
HOST_DAYS = 397  # what browsers accept for a server certificate
RENEW_WITHIN = datetime.timedelta(days=30)


@dataclass(frozen=True)
class ServerFiles:
    certificate: Path  # the host's certificate, then the CA's (the chain)
    key: Path
    ca: Path  # what clients trust


def local_files(folder: Path) -> ServerFiles:
    """Where a local CA in `folder` keeps the server's files."""
    return ServerFiles(folder / "server.pem", folder / "server-key.pem", folder / "ca.pem")


def local_server_files(folder: Path, hosts: list[str]) -> ServerFiles:
    """The CA in `folder` (made on first use) and a certificate from it naming `hosts`."""
    files = local_files(folder)
    ca_key = _key(folder / "ca-key.pem")
    if not files.ca.exists():
        replace_file(files.ca, _pem(_ca_certificate(ca_key)))
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    if _needs_issuing(files.certificate, hosts):
        key = _key(files.key)
        chain = _pem(_host_certificate(key, ca, ca_key, hosts)) + files.ca.read_bytes()
        replace_file(files.certificate, chain)
    return files


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The EC P-256 key at `path`, made (mode 0600) when there is none."""
    fresh = ec.generate_private_key(ec.SECP256R1())
    create_private(path, fresh.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))  # fmt: skip
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    return loaded


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelyard local CA")])
    return (
        _builder(name, name, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def _host_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    return (
        _builder(subject, ca.subject, key.public_key(), HOST_DAYS)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little apart
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _needs_issuing(path: Path, hosts: list[str]) -> bool:
    """No certificate yet, one for other hosts, or one that ends within `RENEW_WITHIN`."""
    try:
        current = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return True
    names = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ending = current.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < RENEW_WITHIN
    return ending or set(names) != {_general_name(h) for h in hosts}


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)
