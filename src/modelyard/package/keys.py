"""The workspace's signing key and the public keys a local server trusts.

Apart from build.py so that what only needs the keys (`modelyard serve`, the ledger, deploys)
does not import the exporters: scikit-learn, ONNX and pandas cost a server start seconds.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelyard import bundle as bundles
from modelyard.config import Settings


def signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The configured key, else a dev key generated into the workspace (mode 0600)."""
    if settings.signing_key is not None:
        return bundles.load_private_key(settings.signing_key.get_secret_value().encode())
    if settings.signing_key_file is not None:
        return bundles.load_private_key(settings.signing_key_file.read_bytes())
    return bundles.load_or_create_key(settings.dev_key_path)


def trusted_keys(settings: Settings) -> str:
    """Public keys a local server trusts: the configured ones plus this workspace's signer."""
    own = bundles.public_key_text(signing_key(settings).public_key())
    return ",".join(k for k in (settings.trusted_keys, own) if k)
