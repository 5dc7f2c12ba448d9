"""A registered version's bundle as the server would take it: verified, and opened when sealed.

Apart from `sealing`, whose AWS calls the IAM policy test reads: this module calls none.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelyard import bundle as bundles
from modelyard import registry
from modelyard.config import Settings
from modelyard.package import sealing
from modelyard.package.keys import trusted_keys


def open_registered(
    settings: Settings, model: str, version: str, folder: Path
) -> bundles.VerifiedBundle:
    """A registered version's bundle, unpacked into `folder`, verified against the trusted
    keys and (when encrypted) opened in memory, as the server would."""
    tags = dict(registry.connect(settings).get_model_version(model, version).tags)
    archive = registry.bundle_archive(settings, model, version, tags)
    unpacked = bundles.from_tarball(archive.read_bytes(), folder)
    manifest = json.loads((unpacked / bundles.MANIFEST).read_text())
    trusted = bundles.parse_public_keys(trusted_keys(settings))
    return bundles.verify(unpacked, trusted, sealing.opening_keys(settings, manifest))
