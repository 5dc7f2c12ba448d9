"""The model bundle: the unit that moves from the registry to a serving host.

A folder holding `model.onnx` (optional: `model.pmml`, and `forest.npz`, a tree ensemble's trees
for the serving runtime's kernel, see modelyard.serve.forest), `schema.json`, `metadata.json` and
`manifest.json` (SHA-256 of every other file), plus `manifest.sig`, an Ed25519 signature of the
manifest's exact bytes. Whoever loads a bundle verifies the signature against keys it trusts, then
every file's hash, before reading anything else (the hash checks are modelyard.manifest's,
which a serving worker uses alone once its supervisor has verified the signature). This module
is pure (hashlib, json, cryptography) because the serving image imports it.

An encrypted bundle (`encryption` in the manifest) holds the model and what it learned from the
data (`ENCRYPTED`: the ONNX, PMML and forest files, the schema with its example rows and
reference bins) as AES-256-GCM ciphertext, each file bound to its name; the signature covers the
ciphertext.
`verify` checks the signature first, then decrypts those files into memory with a key it was
given: a copy of the bundle (on an edge device, in S3, in an image layer) is useless without
the key, and nothing decrypted is written anywhere.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelyard.atomic import create_private

# The manifest's part, re-exported: modelyard.bundle is the bundle's API.
from modelyard.manifest import FORMAT as FORMAT
from modelyard.manifest import MANIFEST as MANIFEST
from modelyard.manifest import SIGNATURE as SIGNATURE
from modelyard.manifest import BundleError as BundleError
from modelyard.manifest import VerifiedBundle as VerifiedBundle
from modelyard.manifest import check_files, read_manifest
from modelyard.manifest import sha256_file as sha256_file

ENCRYPTED = ("model.onnx", "model.pmml", "forest.npz", "schema.json")
_NONCE_BYTES = 12


@dataclass(frozen=True)
class Encryption:
    """How a bundle is encrypted: AES-256-GCM with `key`, and where it came from: a key of the
    settings, or a data key KMS made for this bundle alone (`kms_key`), recorded in the
    manifest as KMS encrypted it (`wrapped`) for whoever may ask KMS to unwrap it."""

    key: bytes = field(repr=False)
    kms_key: str = ""
    wrapped: bytes = b""

    def manifest_entry(self, files: list[str]) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "algorithm": "AES-256-GCM",
            "key_id": bundle_key_id(self.key),
            "files": sorted(files),
        }
        if self.kms_key:
            entry |= {
                "kms_key": self.kms_key,
                "wrapped_key": base64.b64encode(self.wrapped).decode(),
            }
        return entry


def bundle_key_id(key: bytes) -> str:
    """Names a bundle key without giving it away: which of several keys opens a bundle."""
    return hashlib.sha256(b"modelyard-bundle-key:" + key).hexdigest()[:16]


def encrypt(data: bytes, name: str, key: bytes) -> bytes:
    """`data` as a nonce, then AES-256-GCM ciphertext and tag, bound to the file's `name`."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, data, name.encode())


def parse_bundle_keys(text: str, setting: str = "MODELYARD_BUNDLE_KEY") -> list[bytes]:
    """Bundle keys as base64 of 32 random bytes, separated by commas, spaces or newlines."""
    keys = []
    for token in text.replace(",", " ").split():
        try:
            key = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 32:
            raise BundleError(f"{setting}: {token[:6]}… is not base64 of a 32-byte key; make "
                              "one with: openssl rand -base64 32")  # fmt: skip
        keys.append(key)
    return keys


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_text(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_keys(text: str) -> list[Ed25519PublicKey]:
    """Trusted keys as base64 raw Ed25519 keys, separated by commas, spaces or newlines."""
    keys = []
    for token in text.replace(",", " ").split():
        try:
            keys.append(Ed25519PublicKey.from_public_bytes(base64.b64decode(token, validate=True)))
        except ValueError as exc:
            raise BundleError(
                f"trusted key {token[:12]}… is not a base64 Ed25519 public key"
            ) from exc
    return keys


def seal(folder: Path, private_key: Ed25519PrivateKey, extra: dict[str, Any] | None = None) -> str:
    """Write manifest.json over every file in `folder` and sign it; returns the bundle digest."""
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, SIGNATURE)
    )
    manifest = {
        "format": FORMAT,
        "key_id": key_id(private_key.public_key()),
        "files": {p.relative_to(folder).as_posix(): sha256_file(p) for p in files},
        **(extra or {}),
    }
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    (folder / MANIFEST).write_bytes(body)
    (folder / SIGNATURE).write_text(base64.b64encode(private_key.sign(body)).decode() + "\n")
    return hashlib.sha256(body).hexdigest()


def verify(
    folder: Path, trusted: list[Ed25519PublicKey], keys: list[bytes] | None = None
) -> VerifiedBundle:
    """Check the signature with any trusted key, then each file's hash; nothing else is read
    before. An encrypted bundle's files are then decrypted into memory with one of `keys`."""
    manifest_path, signature_path = folder / MANIFEST, folder / SIGNATURE
    if not manifest_path.is_file() or not signature_path.is_file():
        raise BundleError(f"{folder} is not a bundle: {MANIFEST} or {SIGNATURE} is missing")
    if not trusted:
        raise BundleError("no trusted signing key configured; set MODELYARD_TRUSTED_KEYS")
    body = manifest_path.read_bytes()
    signature = _decode_signature(signature_path)
    signer = next((k for k in trusted if signed_by(k, signature, body)), None)
    if signer is None:
        raise BundleError(f"{folder}: manifest signature does not verify with any trusted key")
    manifest = read_manifest(folder, body)
    check_files(folder, manifest["files"])
    opened = _open(folder, manifest.get("encryption"), keys or [])
    return VerifiedBundle(
        folder, manifest, hashlib.sha256(body).hexdigest(), key_id(signer), opened
    )


def _open(folder: Path, encryption: dict[str, Any] | None, keys: list[bytes]) -> dict[str, bytes]:
    if not encryption:
        return {}
    wanted = encryption.get("key_id", "")
    key = next((k for k in keys if bundle_key_id(k) == wanted), None)
    if key is None:
        given = ", ".join(bundle_key_id(k) for k in keys) or "none"
        kms = encryption.get("kms_key")
        unwrap = f", or let modelyard unwrap it with KMS key {kms}" if kms else ""
        raise BundleError(
            f"{folder} is encrypted with key {wanted} and no key given opens it (given: {given}); "
            f"set MODELYARD_BUNDLE_KEY to the key it was sealed with{unwrap}"
        )
    return {name: decrypt((folder / name).read_bytes(), name, key, folder)
            for name in encryption.get("files", [])}  # fmt: skip


def decrypt(sealed: bytes, name: str, key: bytes, where: Path | str = "the bundle") -> bytes:
    """What `encrypt` sealed, in memory; a wrong key or an altered file is refused."""
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], name.encode())
    except InvalidTag:
        raise BundleError(
            f"{where}/{name} does not decrypt with key {bundle_key_id(key)}"
        ) from None


def _decode_signature(path: Path) -> bytes:
    try:
        return base64.b64decode(path.read_text().strip(), validate=True)
    except ValueError as exc:
        raise BundleError(f"{path} is not a base64 signature") from exc


def signed_by(key: Ed25519PublicKey, signature: bytes, body: bytes) -> bool:
    try:
        key.verify(signature, body)
    except InvalidSignature:
        return False
    return True


def to_tarball(folder: Path) -> bytes:
    """A reproducible .tar.gz of the bundle: sorted entries, zero mtimes and owners, and a
    gzip header without a time (tarfile's "w:gz" stamps the current second into it, so two
    packings a second apart differed: a flaky CI run found it)."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w") as tar,
    ):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(folder).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o644
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    return buffer.getvalue()


def from_tarball(blob: bytes, dest: Path) -> Path:
    """Unpack a bundle tarball. Gzip or not: a `.tar.gz` stored with Content-Encoding gzip (MLflow
    sets it when it puts an artifact in S3) comes back through HTTP clients already inflated."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
        tar.extractall(dest, filter="data")
    return dest


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The dev signing key in the workspace, created (mode 0600) on first use."""
    if path.is_file():
        return load_private_key(path.read_bytes())
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if not create_private(path, pem):  # another process created it first: use that one
        return load_private_key(path.read_bytes())
    return key


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError as exc:
        raise BundleError("signing key is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError("signing key must be an Ed25519 key (openssl genpkey -algorithm ed25519)")
    return key
