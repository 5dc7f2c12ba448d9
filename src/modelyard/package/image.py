"""Build the serving image with the Docker SDK, from a wheelhouse prepared on the host.

The build itself runs with `network_mode="none"`: every Python package comes from the
wheelhouse in the build context, so builds are reproducible and work on hosts whose Docker
cannot reach a registry. A CycloneDX SBOM lists the Python packages actually in the image.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from modelyard.atomic import exclusive, replace_file
from modelyard.config import Settings
from modelyard.errors import ModelyardError

INSTALLER = "install-serving.sh"


def shipped_file(name: str) -> Path:
    """A file of infra/docker: inside the wheel (see pyproject.toml) or the source checkout."""
    for candidate in (Path(__file__).with_name(name),
                      Path(__file__).resolve().parents[3] / "infra" / "docker" / name):  # fmt: skip
        if candidate.is_file():
            return candidate
    raise ImageError(f"{name} is missing from modelyard's package; reinstall modelyard")


Progress = Callable[[str], None]


class ImageError(ModelyardError):
    """The image could not be built; the message says which step and why."""


@dataclass(frozen=True)
class ImageResult:
    ref: str
    image_id: str
    size_bytes: int
    labels: dict[str, str]
    sbom: dict[str, Any] = field(repr=False)
    build_seconds: float = 0.0


def docker_client(settings: Settings) -> Any:
    import docker

    try:
        client = (
            docker.DockerClient(base_url=settings.docker_host)
            if settings.docker_host
            else docker.from_env()
        )
        client.ping()
    except Exception as exc:  # docker raises DockerException, requests errors, FileNotFoundError
        raise ImageError(
            f"no Docker engine answers ({exc}); start one with infra/scripts/docker-engine.sh "
            "and set DOCKER_HOST (or MODELYARD_DOCKER_HOST) to the socket it prints"
        ) from exc
    return client


def image_build_skipped(settings: Settings) -> str | None:
    """Why the image step is skipped under `build_image`, or None when it must run."""
    if settings.build_image == "never":
        return "MODELYARD_BUILD_IMAGE=never"
    if settings.build_image == "always":
        return None
    try:
        client = docker_client(settings)
    except ImageError as exc:
        return str(exc)
    try:
        if not _base_available(client, settings.base_image):
            return (
                f"base image {settings.base_image} is neither present nor pullable; build one "
                "with infra/docker/build-base.sh and set MODELYARD_BASE_IMAGE"
            )
    finally:
        client.close()
    return None


def _base_available(client: Any, base: str) -> bool:
    import docker

    try:
        client.images.get(base)
        return True
    except docker.errors.ImageNotFound:
        pass
    try:
        client.images.pull(base)
        return True
    except docker.errors.APIError:
        return False


def serve_requirements() -> list[str]:
    """The `serve` extra, pinned to the versions installed here (what the tests ran against)."""
    pins = []
    for requirement in metadata.requires("modelyard") or []:
        if "extra == 'serve'" not in requirement.replace('"', "'"):
            continue
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        pins.append(f"{name}=={metadata.version(name)}")
    return sorted(pins)


def _source_root() -> Path:
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise ImageError("modelyard's source tree is not available to build its wheel from")
    return root


def _source_digest(root: Path) -> str:
    digest = hashlib.sha256()
    sources = [*(root / "src").rglob("*.py"), *(root / "src").rglob("*.c")]
    for path in sorted([root / "pyproject.toml", root / "hatch_build.py", *sources]):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def prepare_wheelhouse(settings: Settings, progress: Progress) -> Path:
    """Wheels for the image: the pinned serving dependencies and modelyard itself (cached).
    Runs on one machine may share it (`wheelhouse` setting): one fills it at a time."""
    house = settings.wheelhouse or settings.workspace / "wheelhouse"
    with exclusive(house / ".lock"):
        _fill_wheelhouse(house, progress)
    return house


def _fill_wheelhouse(house: Path, progress: Progress) -> None:
    deps, own = house / "deps", house / "modelyard"
    deps.mkdir(parents=True, exist_ok=True)
    requirements = serve_requirements()
    pins = "\n".join(requirements) + "\n"
    listed = house / "requirements.txt"
    if not listed.is_file() or listed.read_text() != pins:  # others may be reading it
        replace_file(listed, pins.encode())
    # Once a download for these exact pins has completed, the wheels are all there: skip
    # asking the index again on every build. The stamp is written only after success.
    stamp = deps / ".downloaded-for"
    if not stamp.is_file() or stamp.read_text() != pins:
        progress(f"wheelhouse: downloading {len(requirements)} pinned serving requirements")
        _pip("download", "--only-binary=:all:", "--dest", str(deps), "--requirement", str(listed))
        stamp.write_text(pins)
    root = _source_root()
    target = own / _source_digest(root)
    if not any(target.glob("modelyard-*.whl")):
        progress("wheelhouse: building the modelyard wheel")
        shutil.rmtree(own, ignore_errors=True)
        _pip("wheel", "--no-deps", "--wheel-dir", str(target), str(root))


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise ImageError(f"pip {args[0]} failed: {done.stderr.strip()[-2000:]}")


def flat_wheels(house: Path, wheels: Path) -> Path:
    """The serving runtime's wheels in one folder: the pinned requirements plus modelyard's, and
    the script that installs them."""
    wheels.mkdir(parents=True)
    for wheel in (house / "deps").glob("*.whl"):
        shutil.copy2(wheel, wheels)
    for wheel in (house / "modelyard").rglob("modelyard-*.whl"):
        shutil.copy2(wheel, wheels)
    shutil.copy2(house / "requirements.txt", wheels / "requirements.txt")
    shutil.copy2(shipped_file(INSTALLER), wheels / INSTALLER)
    return wheels


def build_context(house: Path, bundle: Path, trusted_keys: str, dest: Path) -> Path:
    flat_wheels(house, dest / "wheels")
    shutil.copytree(bundle, dest / "bundle", ignore=shutil.ignore_patterns("*.tar.gz"))
    (dest / "trusted_keys").write_text(trusted_keys.replace(",", "\n") + "\n")
    shutil.copy2(shipped_file("Dockerfile"), dest / "Dockerfile")
    return dest


def image_tag(version: str, bundle_digest: str) -> str:
    """A version's image tag. The bundle's digest is in it because model versions are only
    unique within one MLflow: two registries (or CI jobs) sharing a Docker engine both have a
    version 1 of a model, and neither may retag the image the other deploys."""
    return f"{version}-{bundle_digest[:12]}"


def image_ref(model: str, version: str, bundle_digest: str) -> str:
    return f"modelyard/{model.lower()}:{image_tag(version, bundle_digest)}"


def build_image(
    settings: Settings, bundle: Path, trusted_keys: str, progress: Progress
) -> ImageResult:
    """Build, tag and describe the serving image for a verified bundle folder."""
    import time

    meta = json.loads((bundle / "metadata.json").read_text())
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    ref = image_ref(meta["model_name"], str(meta["model_version"]), digest)
    client = docker_client(settings)
    house = prepare_wheelhouse(settings, progress)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="modelyard-image-") as tmp:
        context = build_context(house, bundle, trusted_keys, Path(tmp))
        args = {
            "BASE_IMAGE": settings.base_image,
            "MODEL_NAME": meta["model_name"],
            "MODEL_VERSION": str(meta["model_version"]),
            "GIT_COMMIT": str(meta.get("git_commit", "")),
            "BUNDLE_DIGEST": digest,
            "CREATED": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        image_id = _stream_build(client, context, ref, args, progress)
    image = client.images.get(image_id)
    sbom = image_sbom(client, ref, house)
    sbom["metadata"]["component"]["version"] = image.id  # the SBOM names the image by digest
    client.close()
    return ImageResult(ref, image.id, int(image.attrs["Size"]), dict(image.labels), sbom,
                       time.perf_counter() - started)  # fmt: skip


def _stream_build(
    client: Any, context: Path, ref: str, args: dict[str, str], progress: Progress
) -> str:
    image_id = None
    lines: list[str] = []
    stream = client.api.build(path=str(context), tag=ref, buildargs=args, rm=True, forcerm=True,
                              network_mode="none", decode=True)  # fmt: skip
    for chunk in stream:
        if "error" in chunk:
            raise ImageError(
                f"docker build of {ref} failed: {chunk['error'].strip()}\n" + "".join(lines[-15:])
            )
        text = chunk.get("stream", "")
        if text:
            lines.append(text)
            if text.startswith("Step "):
                progress(f"image: {text.strip()[:120]}")
        aux = chunk.get("aux") or {}
        image_id = aux.get("ID", image_id)
    if image_id is None:
        match = re.search(r"Successfully built ([0-9a-f]+)", "".join(lines))
        if not match:
            raise ImageError(f"docker build of {ref} finished without an image id")
        image_id = match.group(1)
    return image_id


_LIST_PACKAGES = (
    "import json, importlib.metadata as m; "
    "print(json.dumps(sorted({(d.metadata['Name'], d.version) for d in m.distributions()})))"
)


def image_sbom(client: Any, ref: str, house: Path) -> dict[str, Any]:
    """CycloneDX 1.5 JSON of the Python packages in the image, hashed from the wheelhouse."""
    raw = client.containers.run(
        ref, entrypoint=["python3", "-c", _LIST_PACKAGES], network_mode="none", remove=True
    )
    packages = json.loads(raw.decode().strip().splitlines()[-1])
    hashes = {
        _wheel_key(w.name): hashlib.sha256(w.read_bytes()).hexdigest() for w in house.rglob("*.whl")
    }
    components = []
    for name, version in packages:
        component: dict[str, Any] = {
            "type": "library",
            "bom-ref": f"pkg:pypi/{_norm(name)}@{version}",
            "name": name,
            "version": version,
            "purl": f"pkg:pypi/{_norm(name)}@{version}",
        }
        wheel_hash = hashes.get((_norm(name), version))
        if wheel_hash:
            component["hashes"] = [{"alg": "SHA-256", "content": wheel_hash}]
        components.append(component)
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": {
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "tools": {"components": [{"type": "application", "name": "modelyard"}]},
            "component": {"type": "container", "name": ref, "bom-ref": ref},
        },
        "components": components,
    }


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_key(filename: str) -> tuple[str, str]:
    name, version = filename.split("-")[:2]
    return _norm(name), version
