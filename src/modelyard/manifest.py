"""A bundle's manifest and files, checked with hashlib alone (modelyard.bundle signs, verifies
signatures and decrypts, with cryptography).

A serving worker whose supervisor has verified the bundle is handed the manifest's SHA-256 and
checks the bundle against it (`vouched`): the manifest must be the very bytes whose signature
checked out, and every file must match it, as `modelyard.bundle.verify` checks them. The
worker then never loads cryptography (8 MB of resident memory in each worker); a worker started
after the bundle on disk changed refuses it, so the workers never serve two versions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "modelyard-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
_CHUNK = 1 << 20


class BundleError(Exception):
    """The bundle is incomplete, altered or signed by a key nobody trusts."""


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    manifest: dict[str, Any]
    digest: str  # sha256 of manifest.json: names the whole bundle
    key_id: str
    # An encrypted bundle's files, decrypted in memory by `verify`.
    opened: dict[str, bytes] = field(default_factory=dict, repr=False)

    def holds(self, name: str) -> bool:
        return name in self.opened or name in self.manifest.get("files", {})

    def read_bytes(self, name: str) -> bytes:
        return self.opened[name] if name in self.opened else (self.path / name).read_bytes()

    def read_json(self, name: str) -> dict[str, Any]:
        return json.loads(self.read_bytes(name))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path, body: bytes) -> dict[str, Any]:
    """The manifest in `body` (manifest.json's bytes), of a format this version reads."""
    manifest: dict[str, Any] = json.loads(body)
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{folder}: unsupported bundle format {manifest.get('format')!r}")
    return manifest


def check_files(folder: Path, expected: dict[str, str]) -> None:
    """Every file in `folder` but the manifest and its signature is listed with its SHA-256."""
    present = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, SIGNATURE)
    }
    extra = sorted(present - set(expected))
    missing = sorted(set(expected) - present)
    altered = sorted(n for n in set(expected) & present if sha256_file(folder / n) != expected[n])
    problems = [
        f"{label}: {names}"
        for label, names in (("altered", altered), ("missing", missing), ("unexpected", extra))
        if names
    ]
    if problems:
        raise BundleError(f"{folder}: bundle does not match its manifest ({'; '.join(problems)})")


def vouched(folder: Path, digest: str, key_id: str) -> VerifiedBundle | None:
    """The bundle in `folder`, checked against `digest`, the SHA-256 of the manifest whose
    signature (by `key_id`) was verified before; None if it is encrypted (only
    `modelyard.bundle.verify` opens those). BundleError if it is not that bundle any more."""
    path = folder / MANIFEST
    body = path.read_bytes() if path.is_file() else b""
    if hashlib.sha256(body).hexdigest() != digest:
        raise BundleError(
            f"{folder}: {MANIFEST} changed after the bundle was verified; restart the server to "
            "serve what is there now"
        )
    manifest = read_manifest(folder, body)
    if manifest.get("encryption"):
        return None
    check_files(folder, manifest["files"])
    return VerifiedBundle(folder, manifest, digest, key_id)
