"""A local certificate authority, for servers that have no certificate of their own.

`modelyard stack up` with sign-in serves its registry, Prometheus and Alertmanager over TLS,
and deployed model services serve HTTPS with `MODELYARD_SERVE_TLS=local`. Without a
certificate in the settings modelyard creates a CA once (`ca.pem`, its key never leaves the
folder, mode 0600) and issues certificates from it, each under its own name: the stack's host,
each model service's hosts, the client modelyard and Prometheus present where mutual TLS is
asked for. A certificate is issued again when its names change or its end nears. Clients
trust `ca.pem`: modelyard's own do by default; a browser or another machine's Docker needs it
installed (docs/security.md).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterator
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


def local_files(folder: Path, name: str = "server") -> ServerFiles:
    """Where a local CA in `folder` keeps the files of the certificate called `name`."""
    return ServerFiles(folder / f"{name}.pem", folder / f"{name}-key.pem", folder / "ca.pem")


def local_server_files(folder: Path, hosts: list[str], name: str = "server") -> ServerFiles:
    """The CA in `folder` (made on first use) and a server certificate from it naming `hosts`."""
    return _issued(folder, name, hosts, ExtendedKeyUsageOID.SERVER_AUTH)


def local_client_files(folder: Path, name: str) -> ServerFiles:
    """The CA in `folder` and a client certificate from it for mutual TLS, called `name`."""
    return _issued(folder, name, [name], ExtendedKeyUsageOID.CLIENT_AUTH)


def local_ca(folder: Path) -> Path:
    """The CA certificate in `folder`, made with its key on first use."""
    path = folder / "ca.pem"
    if not path.exists():
        replace_file(path, _pem(_ca_certificate(_key(folder / "ca-key.pem"))))
    return path


def _issued(folder: Path, name: str, names: list[str], usage: x509.ObjectIdentifier) -> ServerFiles:
    files = local_files(folder, name)
    local_ca(folder)
    ca_key = _key(folder / "ca-key.pem")
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    if _needs_issuing(files.certificate, names):
        key = _key(files.key)
        chain = _pem(_certificate(key, ca, ca_key, names, usage)) + files.ca.read_bytes()
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


def _certificate(
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    usage: x509.ObjectIdentifier,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    return (
        _builder(subject, ca.subject, key.public_key(), HOST_DAYS)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), False)
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


def _general_name(host: str) -> x509.DNSName | x509.IPAddress:
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


# TLS 1.2's suites with forward secrecy and an AEAD (Mozilla's "intermediate" list without
# finite-field DHE); TLS 1.3's suites are all of that kind. nginx's front door and the slots'
# own ports use the same list (modelyard passes it to the deploy role).
CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])  # fmt: skip


def server_context(certificate: bytes, key: bytes, client_ca: bytes = b"") -> ssl.SSLContext:
    """A server's TLS 1.2+ context from PEM in memory: the key is read from an anonymous
    memory file, never from a path on disk. With `client_ca`, every client must present a
    certificate that chains to it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    with _in_memory(certificate) as cert_path, _in_memory(key) as key_path:
        context.load_cert_chain(cert_path, key_path)
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_ca.decode())
    return context


@contextlib.contextmanager
def _in_memory(content: bytes) -> Iterator[str]:
    fd = os.memfd_create("modelyard-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, content)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def problems(
    certificate: bytes, key: bytes, hosts: list[str], named: str, trust: Path | None = None
) -> list[str]:
    """Why `certificate` cannot serve `hosts` with `key`: unreadable, not the key's, ended, not
    naming a host clients reach it at, or not chaining to the CAs in `trust` (the system's
    when None). `named` is how the settings call it."""
    try:
        chain = x509.load_pem_x509_certificates(certificate)
        private = serialization.load_pem_private_key(key, password=None)
    except ValueError as exc:
        return [f"{named}: not a PEM certificate and an unencrypted PEM key ({exc})"]
    leaf = chain[0]
    found = []
    if leaf.public_key().public_bytes(*_SPKI) != private.public_key().public_bytes(*_SPKI):
        found.append(f"{named}: the key is not the certificate's")
    if leaf.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        found.append(f"{named}: the certificate ended on {leaf.not_valid_after_utc:%Y-%m-%d}")
    unnamed = [h for h in hosts if not _names(leaf, h)]
    if unnamed:
        found.append(f"{named}: the certificate does not name {', '.join(unnamed)}, where the "
                     "deploy's checks and Prometheus reach the hosts; add them to its "
                     "subjectAltName, or give the hosts an ansible_host it names")  # fmt: skip
    elif hosts and not found and (why := _unverified(chain, hosts[0], trust)):
        found.append(f"{named}: {why}")
    return found


def _unverified(chain: list[x509.Certificate], host: str, trust: Path | None) -> str:
    """Why a client trusting `trust` would refuse `chain` for `host` ("" when it would not)."""
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    source = trust or _system_bundle()
    if source is None:
        return ""  # no CA bundle to check against here; the deploy's checks still verify
    try:
        store = Store(x509.load_pem_x509_certificates(source.read_bytes()))
    except ValueError as exc:
        return f"{source} holds no PEM certificate ({exc})"
    verifier = PolicyBuilder().store(store).build_server_verifier(_general_name(host))
    try:
        verifier.verify(chain[0], chain[1:])
    except VerificationError as exc:
        return (f"the certificate does not chain to a CA in {source} ({exc}); set "
                "MODELYARD_SERVE_TLS_CA to the CA that issued it, with the chain's "
                "intermediates in the certificate file")  # fmt: skip
    return ""


def _system_bundle() -> Path | None:
    found = ssl.get_default_verify_paths().cafile
    return Path(found) if found and Path(found).is_file() else None


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _names(certificate: x509.Certificate, host: str) -> bool:
    """Whether a TLS client reaching `host` accepts `certificate` (RFC 6125: subjectAltName,
    a wildcard for one left-most label)."""
    try:
        alternatives = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in alternatives.get_values_for_type(x509.IPAddress)
    except ValueError:
        pass
    wanted = host.lower().rstrip(".")
    for name in alternatives.get_values_for_type(x509.DNSName):
        name = name.lower().rstrip(".")
        if name == wanted or (
            name.startswith("*.") and "." in wanted and wanted.split(".", 1)[1] == name[2:]
        ):
            return True
    return False
