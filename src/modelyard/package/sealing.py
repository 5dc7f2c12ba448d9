"""Which key a bundle is encrypted with, and which opens one (docs/security.md, "At rest").

With `MODELYARD_BUNDLE_KEY` every bundle is sealed with its first key; with
`MODELYARD_BUNDLE_KMS_KEY` each bundle gets a data key of its own from AWS KMS (envelope
encryption), which the manifest keeps as KMS wrapped it. A deploy, an infra validation or
`modelyard serve` opens a bundle with the settings' key that matches it, or asks KMS to unwrap
its data key, and hands the server that one key alone, as it hands it the token.
"""

from __future__ import annotations

import base64
from typing import Any

from modelyard.bundle import BundleError, Encryption, bundle_key_id, parse_bundle_keys
from modelyard.config import Settings
from modelyard.errors import ModelyardError


def encryption(settings: Settings) -> Encryption | None:
    """How the next bundle is encrypted; None when the settings ask for no encryption."""
    if settings.bundle_kms_key:
        made = _kms().generate_data_key(KeyId=settings.bundle_kms_key, KeySpec="AES_256")
        return Encryption(made["Plaintext"], settings.bundle_kms_key, made["CiphertextBlob"])
    keys = settings_keys(settings)
    return Encryption(keys[0]) if keys else None


def settings_keys(settings: Settings) -> list[bytes]:
    if settings.bundle_key and settings.bundle_key_file:
        raise ModelyardError("MODELYARD_BUNDLE_KEY and MODELYARD_BUNDLE_KEY_FILE are both set: "
                             "keep one")  # fmt: skip
    if settings.bundle_key_file:
        text, named = settings.bundle_key_file.read_text(), "MODELYARD_BUNDLE_KEY_FILE"
    elif settings.bundle_key:
        text, named = settings.bundle_key.get_secret_value(), "MODELYARD_BUNDLE_KEY"
    else:
        return []
    try:
        return parse_bundle_keys(text, named)
    except BundleError as exc:
        raise ModelyardError(str(exc)) from None


def opening_keys(settings: Settings, manifest: dict[str, Any]) -> list[bytes]:
    """The key that opens the bundle `manifest` describes ([] for a plain bundle): its data
    key as KMS unwraps it, or the settings' key it was sealed with."""
    sealed = manifest.get("encryption")
    if not sealed:
        return []
    if sealed.get("wrapped_key"):
        return unwrapped(manifest)
    keys = [k for k in settings_keys(settings) if bundle_key_id(k) == sealed["key_id"]]
    if not keys:
        raise ModelyardError(f"the bundle is encrypted with key {sealed['key_id']}, which is not "
                             "among MODELYARD_BUNDLE_KEY's keys: add it (the first key seals, "
                             "every one opens)")  # fmt: skip
    return keys


def unwrapped(manifest: dict[str, Any]) -> list[bytes]:
    """A KMS-sealed bundle's data key, as KMS unwraps it ([] for any other bundle)."""
    sealed = manifest.get("encryption") or {}
    if not sealed.get("wrapped_key"):
        return []
    try:
        answer = _kms().decrypt(CiphertextBlob=base64.b64decode(sealed["wrapped_key"]),
                                KeyId=sealed["kms_key"])  # fmt: skip
    except Exception as exc:  # botocore's errors: no access, no such key, no network
        raise ModelyardError(
            f"KMS key {sealed['kms_key']} did not unwrap the bundle's key ({exc}); the "
            "deploying identity needs kms:Decrypt on it"
        ) from None
    return [answer["Plaintext"]]


def key_text(keys: list[bytes]) -> str:
    """Keys as the server's MODELYARD_BUNDLE_KEY takes them."""
    return ",".join(base64.b64encode(k).decode() for k in keys)


def _kms() -> Any:
    import boto3  # region, credentials and endpoint (AWS_ENDPOINT_URL_KMS) from the AWS chain

    return boto3.client("kms")
