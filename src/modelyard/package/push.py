"""Push the serving image to a registry, so hosts pull it by digest.

`MODELYARD_IMAGE_REGISTRY` chooses the registry: `stack` (the local stack's Debian
docker-registry), `ecr` (Amazon ECR of the account and region of the standard AWS credential
chain), or any registry host[:port]. A version's image is pushed once, as
`<registry>/modelyard/<model>:<version>-<bundle digest[:12]>`: with ECR's immutable tags a
tag can never point at other bytes, and a rebuilt image of the same bundle finds its tag
taken and reuses the image already there. Deploys use the `@sha256:` reference, never a tag.

Credentials: ECR's are a 12-hour token from `get_authorization_token`, the stack registry's its
sign-in (MODELYARD_STACK_PASSWORD), handed to the Docker SDK in memory for this push; nothing
is written to a Docker config, a log or a tag.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelyard import signin
from modelyard.config import Settings
from modelyard.errors import ModelyardError
from modelyard.package.image import ImageError, docker_client, image_tag

Progress = Callable[[str], None]
REPOSITORY_PREFIX = "modelyard"
_ECR_HOST = re.compile(r"^\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$")


@dataclass(frozen=True)
class Pushed:
    repository: str  # host/modelyard/<model>
    tag: str
    digest: str  # sha256:...

    @property
    def ref(self) -> str:
        """What hosts pull: the repository by digest."""
        return f"{self.repository}@{self.digest}"


@dataclass(frozen=True)
class _Target:
    host: str
    kind: str  # "ecr" | "docker"
    auth: dict[str, str] | None  # username/password for the Docker SDK, never logged


def repository_name(model: str) -> str:
    return f"{REPOSITORY_PREFIX}/{model.lower()}"


def push_image(
    settings: Settings, local_ref: str, model: str, version: str, bundle_digest: str,
    progress: Progress,
) -> Pushed:  # fmt: skip
    """Push `local_ref` (an image on the building engine) for `model` `version`."""
    target = _target(settings, model)
    repository = f"{target.host}/{repository_name(model)}"
    tag = image_tag(version, bundle_digest)
    client = docker_client(settings)
    try:
        if target.auth is not None:  # kept in this client's memory only, never in a config file
            _login(client, target.host, target.auth)
        client.images.get(local_ref).tag(repository, tag)
        progress(f"push: {repository}:{tag}")
        digest = _push(client, repository, tag, target.auth, progress)
        if digest is None and target.kind == "ecr":  # an immutable tag pushed before
            digest = _ecr_digest(model, tag)
            progress(f"push: {tag} is already in ECR as {digest}; using that image")
        if digest is None:
            raise ImageError(f"pushing {repository}:{tag} returned no digest")
    finally:
        client.close()
    return Pushed(repository, tag, digest)


def registry_pull_vars(settings: Settings, image_ref: str) -> dict[str, str]:
    """The role's registry variables for an image reference: ECR images are pulled with the
    host's instance role through amazon-ecr-credential-helper; the stack's registry, when it
    signs in, with its credentials for the pull alone; other registries need none."""
    host = image_ref.split("/", 1)[0]
    if "@sha256:" in image_ref and _ECR_HOST.match(host):
        return {
            "model_service_registry_host": host,
            "model_service_registry_credential_helper": "ecr-login",
        }
    access = signin.access(settings)
    if access and settings.image_registry == "stack" and host == _stack_host(settings):
        return {
            "model_service_registry_host": host,
            "model_service_registry_auth": access.credentials(),
        }
    return {}


def _stack_host(settings: Settings) -> str | None:
    """Where the stack's registry is reached (its push host, if set); None when it is down."""
    from modelyard.stack import running_url

    url = running_url(settings, "registry")
    if url is None:
        return None
    return settings.image_push_host or url.split("://", 1)[1]


def _target(settings: Settings, model: str) -> _Target:
    choice = (settings.image_registry or "").strip()
    if choice == "stack":
        host = _stack_host(settings)
        if host is None:
            raise ModelyardError(
                "MODELYARD_IMAGE_REGISTRY=stack, but the stack's registry is not running: "
                "start it with `modelyard stack up registry`"
            )
        return _Target(host, "docker", _stack_auth(settings))
    if choice == "ecr" or _ECR_HOST.match(choice):
        username, password, endpoint = ecr_login(model)
        host = settings.image_push_host or endpoint
        return _Target(host, "ecr", {"username": username, "password": password})
    if not re.match(r"^[A-Za-z0-9.-]+(:\d+)?(/[a-z0-9._/-]+)?$", choice):
        raise ModelyardError(
            f"MODELYARD_IMAGE_REGISTRY={choice!r} is not `stack`, `ecr` or a registry "
            "host[:port] (for example registry.example.com:5000)"
        )
    return _Target(settings.image_push_host or choice, "docker", None)


def _stack_auth(settings: Settings) -> dict[str, str] | None:
    """The stack's sign-in for its registry, when it has one. The building engine reaches a
    registry on 127.0.0.1 without checking its certificate (Docker counts loopback as an
    insecure registry); elsewhere it needs the CA in /etc/docker/certs.d/HOST:PORT/ca.crt."""
    access = signin.access(settings)
    return {"username": access.username, "password": access.password} if access else None


def ecr_login(model: str) -> tuple[str, str, str]:
    """Make sure the model's ECR repository exists (scan on push, immutable tags, encrypted),
    then return (username, password, registry host) from an authorization token."""
    ecr = _ecr_client()
    ensure_repository(ecr, repository_name(model))
    try:
        data = ecr.get_authorization_token()["authorizationData"][0]
    except Exception as exc:  # botocore's ClientError, NoCredentialsError, EndpointConnectionError
        raise ModelyardError(f"ECR refused an authorization token: {_why(exc)}") from None
    username, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    return username, password, data["proxyEndpoint"].split("://", 1)[-1].rstrip("/")


def ensure_repository(ecr: Any, name: str) -> None:
    """The repository, created or brought to modelyard's settings: every pushed image is
    scanned, and no tag can be moved to other bytes."""
    try:
        found = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
    except ecr.exceptions.RepositoryNotFoundException:
        ecr.create_repository(
            repositoryName=name,
            imageTagMutability="IMMUTABLE",
            imageScanningConfiguration={"scanOnPush": True},
            encryptionConfiguration={"encryptionType": "AES256"},
            tags=[{"Key": "managed-by", "Value": "modelyard"}],
        )
        return
    except Exception as exc:
        raise ModelyardError(f"ECR: cannot read repository {name}: {_why(exc)}") from None
    if found.get("imageTagMutability") != "IMMUTABLE":
        ecr.put_image_tag_mutability(repositoryName=name, imageTagMutability="IMMUTABLE")
    if not found.get("imageScanningConfiguration", {}).get("scanOnPush"):
        ecr.put_image_scanning_configuration(
            repositoryName=name, imageScanningConfiguration={"scanOnPush": True}
        )


def _login(client: Any, host: str, auth: dict[str, str]) -> None:
    try:
        client.login(registry=host, reauth=True, **auth)
    except Exception as exc:  # docker.errors.APIError: the registry refused the token
        raise ImageError(f"logging in to {host} failed: {exc}") from None


def _push(
    client: Any, repository: str, tag: str, auth: dict[str, str] | None, progress: Progress
) -> str | None:
    """The pushed manifest's digest; None when the registry refused an existing immutable tag."""
    digest, done = None, set()
    stream = client.images.push(repository, tag, auth_config=auth, stream=True, decode=True)
    for event in stream:
        if "error" in event:
            message = str(event["error"])
            if "already exists" in message and "immutable" in message.lower():
                return None
            raise ImageError(f"pushing {repository}:{tag} failed: {message}{_hint(message)}")
        layer, status = event.get("id"), event.get("status", "")
        if layer and status in ("Pushed", "Layer already exists") and layer not in done:
            done.add(layer)
            progress(f"push: layer {layer} {status.lower()}")
        digest = (event.get("aux") or {}).get("Digest", digest)
    return digest


def _hint(message: str) -> str:
    if "connection refused" in message or "no such host" in message or "timeout" in message:
        return (" (the registry does not answer: is it running? `modelyard stack up registry` "
                "starts the stack's; MODELYARD_IMAGE_REGISTRY names the one used)")  # fmt: skip
    return ""


def _ecr_digest(model: str, tag: str) -> str:
    images = _ecr_client().describe_images(
        repositoryName=repository_name(model), imageIds=[{"imageTag": tag}]
    )["imageDetails"]
    return str(images[0]["imageDigest"])


def _ecr_client() -> Any:
    try:
        import boto3
    except ImportError:
        raise ModelyardError("ECR needs boto3: pip install 'modelyard[aws]'") from None
    # Region, credentials and endpoint (AWS_ENDPOINT_URL_ECR) from the standard AWS chain.
    return boto3.client("ecr")


def _why(exc: Exception) -> str:
    """botocore's error text, without request ids or signatures."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        return f"{error.get('Code', '')}: {error.get('Message', '')}".strip(": ")
    return str(exc)
