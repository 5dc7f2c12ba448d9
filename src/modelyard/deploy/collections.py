"""The one Ansible collection the AWS target needs, amazon.aws (its aws_ec2 inventory plugin).

ansible-core ships no collections. `ensure_amazon_aws` installs the pinned version into
`MODELYARD_ANSIBLE_COLLECTIONS` (default `<workspace>/ansible/collections`) once: from Ansible
Galaxy when it answers, else from the `ansible` package on PyPI, which bundles the same
collection (for sites whose only mirror is PyPI). Playbooks and inventories then find it
through ANSIBLE_COLLECTIONS_PATH.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from modelyard.config import Settings
from modelyard.errors import ModelyardError

AMAZON_AWS = "10.1.2"
# The `ansible` release on PyPI that bundles amazon.aws AMAZON_AWS.
ANSIBLE_BUNDLE = "12.3.0"
_MEMBER = "ansible_collections/amazon/aws/"
Progress = Callable[[str], None]


def collections_path(settings: Settings) -> Path:
    return settings.ansible_collections or settings.workspace / "ansible" / "collections"


def installed_version(path: Path) -> str | None:
    manifest = path / _MEMBER / "MANIFEST.json"
    if not manifest.is_file():
        return None
    return str(json.loads(manifest.read_text())["collection_info"]["version"])


def ensure_amazon_aws(settings: Settings, progress: Progress) -> Path:
    """The collections folder, with amazon.aws AMAZON_AWS in it."""
    path = collections_path(settings)
    if installed_version(path) == AMAZON_AWS:
        return path
    path.mkdir(parents=True, exist_ok=True)
    progress(f"ansible: installing the amazon.aws {AMAZON_AWS} collection into {path}")
    galaxy = _from_galaxy(path)
    if galaxy is not None:
        progress(f"ansible: Ansible Galaxy did not answer ({galaxy}); using PyPI's ansible package")
        _from_pypi(path)
    if installed_version(path) != AMAZON_AWS:
        raise ModelyardError(
            f"amazon.aws {AMAZON_AWS} could not be installed into {path}; install it yourself "
            f"with `ansible-galaxy collection install amazon.aws:=={AMAZON_AWS} -p {path}`"
        )
    return path


def _from_galaxy(path: Path) -> str | None:
    """None when Galaxy installed it, else why not."""
    galaxy = Path(sys.executable).with_name("ansible-galaxy")
    try:
        done = subprocess.run(
            [str(galaxy), "collection", "install", f"amazon.aws:=={AMAZON_AWS}", "-p", str(path),
             "--timeout", "15", "--force"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        return said[-1][:200] if said else f"exit {done.returncode}"
    return None


def _from_pypi(path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="modelyard-ansible-") as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
             f"ansible=={ANSIBLE_BUNDLE}"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        wheels = list(Path(tmp).glob("ansible-*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelyardError(
                f"could not download ansible=={ANSIBLE_BUNDLE} from PyPI for amazon.aws: "
                f"{done.stderr.strip()[-300:]}"
            )
        target = path / _MEMBER
        if target.exists():
            shutil.rmtree(target)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in wheel.namelist():
                if member.startswith(_MEMBER) and not member.endswith("/"):
                    wheel.extract(member, path)
