"""Deploy, promote and roll back registered versions; every move lands in the ledger.

A move runs `deploy.yml` (or `rollback.yml`) over the environment's inventory. When a host
fails, the rollout stops and the hosts already switched are put back on the version the
ledger says was live, so a failed move leaves every host, the aliases and the ledger's idea of
what serves exactly as they were, plus one record saying what failed and why.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import math
import os
import secrets
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from modelyard import registry, servetls
from modelyard.atomic import create_private, exclusive
from modelyard.bundle import MANIFEST, decrypt
from modelyard.config import Settings
from modelyard.deploy import aws, card, ledger
from modelyard.deploy.collections import ensure_amazon_aws
from modelyard.deploy.ledger import Release
from modelyard.deploy.locks import Lock, check_unmoved, workspace_lock
from modelyard.deploy.playbooks import PlaybookResult, ansible_dir, inventory_hosts, run_playbook
from modelyard.errors import DeployFailed, ModelyardError, SpecError
from modelyard.monitor.targets import slot_targets, write_targets
from modelyard.package import sealing
from modelyard.package.image import INSTALLER, flat_wheels, prepare_wheelhouse, shipped_file
from modelyard.package.keys import trusted_keys
from modelyard.package.push import registry_pull_vars
from modelyard.spec import Environment, ShadowStrategy, Spec

Progress = Callable[[str], None]
_CI_ACTORS = ("GITHUB_ACTOR", "GITLAB_USER_LOGIN", "BUILD_USER_ID")


@dataclass(frozen=True)
class Target:
    environment: str
    settings: Environment
    inventory: Path
    collections: Path | None = None  # amazon.aws, for EC2 inventories


def target(
    spec: Spec, environment: str, settings: Settings | None = None, progress: Progress | None = None
) -> Target:
    """Where `environment` deploys. EC2 inventories (target aws) are written, and their
    collection installed, only with `settings`: checking a spec needs neither."""
    envs = spec.deploy.environments
    if environment not in envs:
        known = ", ".join(envs) or "none"
        raise SpecError(
            f"deploy.environments.{environment}: not in the spec (it names {known}); add it "
            "under deploy.environments"
        )
    env = envs[environment]
    if env.target == "aws":
        if settings is None:
            return Target(environment, env, Path())
        collections = ensure_amazon_aws(settings, progress or (lambda _: None))
        return Target(environment, env, aws.inventory(settings, spec, environment), collections)
    if env.target == "local":
        return Target(environment, env, ansible_dir() / "inventories" / "local" / "hosts.yml")
    inventory = (spec.source_dir / str(env.inventory)).resolve()
    if not inventory.exists():
        raise SpecError(
            f"deploy.environments.{environment}.inventory: {inventory} does not exist; point it "
            "at an Ansible inventory with a model_hosts group"
        )
    return Target(environment, env, inventory)


def serving_versions(settings: Settings, spec: Spec) -> dict[str, str]:
    """Which version serves each environment now ("" for none), per the ledger: what a run
    compares against, so its releases can refuse to move an environment that moved meanwhile."""
    return {
        environment: live.version if (live := ledger.live(settings, spec.name, environment)) else ""
        for environment in spec.deploy.environments
    }


def version_to_deploy(settings: Settings, spec: Spec, version: str | None) -> str:
    """The version an operator's deploy moves: the one named, else the `candidate` alias (the
    last version that passed every gate and was packaged)."""
    if version:
        return version
    chosen = registry.aliases(registry.connect(settings), spec.name).get(registry.CANDIDATE)
    if not chosen:
        raise ModelyardError(f"{spec.name} has no 'candidate' version; pass --version")
    return chosen


def actor_name(settings: Settings) -> str:
    """Who is acting, for the ledger: settings, then the CI's user, then the login name."""
    candidates = [settings.actor, *(os.environ.get(k) for k in _CI_ACTORS)]
    for name in candidates:
        if name and name.strip():
            return name.strip()
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        raise SpecError("nobody to record as the actor: set MODELYARD_ACTOR to your name") from None


def service_token(settings: Settings) -> str:
    """The bearer token deployed services require: configured, else one kept in the workspace."""
    if settings.serve_token is not None:
        return settings.serve_token.get_secret_value()
    path = settings.workspace / "serve-token"
    if not path.exists():
        create_private(path, secrets.token_urlsafe(32).encode())
    token = path.read_text().strip()
    if not token:  # an empty token would mean no auth at all
        raise DeployFailed(f"{path} is empty: delete it (a new token is made) or set "
                           "MODELYARD_SERVE_TOKEN")  # fmt: skip
    return token


def deploy(
    settings: Settings,
    spec: Spec,
    environment: str,
    version: str,
    progress: Progress,
    action: str = "deploy",
    reason: str = "",
    actor: str | None = None,
    expected: str | None = None,
    lock: Lock | None = None,
) -> Release:
    """Roll `version` out to `environment`; raises DeployFailed after putting hosts back.

    `actor` is who asked for it (an approver); by default whoever runs this. `expected` is the
    version the caller saw serving ("" for none): if another release has moved the environment
    since, ReleaseConflict and nothing changes. One release per model and environment at a time
    (`lock`, default the workspace's); a second one gets ReleaseConflict at once.
    """
    where = target(spec, environment, settings, progress)
    actor = actor or actor_name(settings)
    with held(settings, spec, environment, f"{action} v{version} by {actor}", expected,
              lock) as live:  # fmt: skip
        return move(settings, spec, where, version, progress, action, reason, actor, live)


@contextlib.contextmanager
def held(
    settings: Settings,
    spec: Spec,
    environment: str,
    holder: str,
    expected: str | None = None,
    lock: Lock | None = None,
) -> Iterator[Release | None]:
    """Hold the release lock of the model in `environment` (`lock`, default the workspace's)
    and give what serves there, after checking it is still `expected` (see `deploy`)."""
    key = f"{spec.name}/{environment}"
    with (lock or workspace_lock(settings))(key, holder):
        live = ledger.live(settings, spec.name, environment)
        check_unmoved(key, expected, live)
        yield live


@dataclass(frozen=True)
class Move:
    """One version's release to one environment, ready to run the role's playbooks."""

    where: Target
    version: str
    tags: dict[str, str]
    extravars: dict[str, Any]
    workdir: Path

    def record(self, spec: Spec, action: str, actor: str, live: Release | None) -> Release:
        """The ledger record of this move, as if it succeeded (callers replace the outcome)."""
        return Release(
            model=spec.name, environment=self.where.environment, action=action,
            version=self.version, outcome=ledger.SUCCEEDED, actor=actor,
            previous_version=live.version if live else "",
            image=str(self.extravars.get("model_service_image", "")),
            image_digest=self.tags.get("image_id", "") if self.runtime == "container" else "",
            bundle_digest=self.tags.get("bundle_digest", ""), runtime=self.runtime,
        )  # fmt: skip

    @property
    def runtime(self) -> str:
        return self.where.settings.runtime


def prepare(
    settings: Settings, spec: Spec, where: Target, version: str, action: str, progress: Progress
) -> Move:
    tags = version_tags(settings, spec.name, version)
    extravars = _extravars(settings, spec, where, version, tags, progress)
    workdir = _workdir(settings, spec.name, where.environment, action)
    return Move(where, version, tags, extravars, workdir)


def play(
    settings: Settings,
    move: Move,
    playbook: str,
    step: str,
    progress: Progress,
    extra: dict[str, Any] | None = None,
    limit: list[str] | None = None,
) -> PlaybookResult:
    """Run `playbook` for the move with its variables (and `extra`); `step` names the run's
    folder under the move's, where Ansible's output and events stay."""
    extravars = move.extravars | (extra or {})
    return _run(settings, playbook, move.where, extravars, move.workdir / step, progress, limit)


def move(
    settings: Settings, spec: Spec, where: Target, version: str, progress: Progress,
    action: str, reason: str, actor: str, live: Release | None,
) -> Release:  # fmt: skip
    environment = where.environment
    playbook = "rollback.yml" if action == "rollback" else "deploy.yml"
    moving = prepare(settings, spec, where, version, action, progress)
    progress(f"{action}: {spec.name} v{version} → {environment} ({where.settings.runtime})")
    result = play(settings, moving, playbook, "ansible", progress)
    record = replace(moving.record(spec, action, actor, live), reason=reason,
                     hosts=",".join(result.touched))  # fmt: skip
    if not result.ok:
        why = result.reason()
        why += _put_back(settings, spec, where, live, result, moving.workdir, progress)
        ledger.append(settings, replace(record, outcome="failed", reason=why), result.files)
        card.refresh(settings, spec.name, [version], progress)
        raise DeployFailed(f"{action} of {spec.name} v{version} to {environment} failed: {why}")
    registry.set_alias(registry.connect(settings), spec.name, environment, version)
    if result.slots:
        write_targets(settings, spec.name, environment, slot_targets(result.slots, version))
    done = ledger.append(settings, record, result.files)
    # The cards of the version that came in and of the one it replaced say so.
    card.refresh(settings, spec.name, [version, live.version if live else ""], progress)
    progress(f"{action}: {spec.name} v{version} serves {environment}; alias '{environment}' moved")
    return done


def rollback(
    settings: Settings, spec: Spec, environment: str, progress: Progress, lock: Lock | None = None
) -> Release:
    """Put the previous good version back in front of traffic and move the alias back."""
    current = ledger.live(settings, spec.name, environment)
    earlier = ledger.previous_good(settings, spec.name, environment)
    if current is None or earlier is None:
        raise DeployFailed(
            f"nothing to roll back to: the ledger has no earlier good version of {spec.name} in "
            f"{environment} (see `modelyard history {spec.name}`)"
        )
    # Away from the version just looked at: a release that lands meanwhile is a conflict.
    return deploy(
        settings, spec, environment, earlier.version, progress, action="rollback",
        reason=f"roll back to v{earlier.version}", expected=current.version, lock=lock,
    )  # fmt: skip


def _put_back(
    settings: Settings,
    spec: Spec,
    where: Target,
    live: Release | None,
    failed: PlaybookResult,
    workdir: Path,
    progress: Progress,
) -> str:
    """After a failed rollout: switch the hosts already moved back to the live version."""
    if live is None or not failed.touched:
        return ""
    progress(f"rollout failed; putting {', '.join(failed.touched)} back on v{live.version}")
    tags = version_tags(settings, spec.name, live.version)
    extravars = _extravars(settings, spec, where, live.version, tags, progress)
    # Only the hosts the rollout reached: an unreachable one was not changed, and would fail
    # the put-back of the others.
    back = _run(
        settings, "rollback.yml", where, extravars, workdir / "revert", progress, failed.touched
    )
    unreached = [h for h in failed.failures if h not in failed.touched and h != "ansible"]
    if back.ok and unreached:
        return (f" (every host it changed is back on v{live.version}; {', '.join(unreached)} "
                "was not reached and not changed)")  # fmt: skip
    if back.ok:
        return f" (every host is back on v{live.version})"
    restored = [h for h in back.touched if h not in back.failures]
    if restored:  # e.g. a host lost after the rollout reached it: the others are back
        return (f" ({', '.join(restored)} back on v{live.version}; putting back failed for "
                f"{back.reason()}; see docs/operations.md)")  # fmt: skip
    return (
        f" (putting hosts back on v{live.version} failed too: {back.reason()}; "
        "see docs/operations.md)"
    )


def _run(
    settings: Settings,
    playbook: str,
    where: Target,
    extravars: dict[str, Any],
    workdir: Path,
    progress: Progress,
    limit: list[str] | None = None,
) -> PlaybookResult:
    token = str(extravars["model_service_token"])
    # Each token of a rotation list on its own, too: any of them alone is a secret. So are the
    # stack registry's sign-in a host pulls with and its password.
    secrets = (token, *(t.strip() for t in token.split(",") if t.strip()))
    pull_auth = extravars.get("model_service_registry_auth")
    secrets += (str(pull_auth),) if pull_auth else ()
    secrets += (settings.stack_password.get_secret_value(),) if settings.stack_password else ()
    secrets += servetls.secrets(extravars)
    bundle_keys = str(extravars.get("model_service_bundle_key", ""))
    secrets += tuple(k for k in (bundle_keys, *bundle_keys.split(",")) if k)
    return run_playbook(playbook, where.inventory, extravars, workdir, progress, secrets=secrets,
                        collections=where.collections, limit=limit,
                        strategy=settings.ansible_strategy)  # fmt: skip


def _mirror_vars(env: Environment) -> dict[str, Any]:
    """An environment that releases by shadow has nginx offer every request for copying on
    every deploy, so that a shadow's start and end move its share alone and never reload nginx;
    the others copy nothing and pay nothing for it."""
    if not isinstance(env.strategy, ShadowStrategy):
        return {"model_service_mirror": False}
    return {
        "model_service_mirror": True,
        "model_service_mirror_timeout": env.strategy.mirror_timeout,
    }


def _rate_limit_vars(env: Environment) -> dict[str, Any]:
    """nginx's limit_req for the environment's front door; {} when it has no limit. The rate
    goes to nginx in requests a minute, which keeps a fraction of one a second."""
    limit = env.rate_limit
    if limit is None:
        return {"model_service_rate_limit": {}}
    return {"model_service_rate_limit": {
        "rate": f"{max(1, round(limit.per_second * 60))}r/m",
        "burst": limit.burst_requests,
        "by": limit.by,
        "retry_after": max(1, math.ceil(1 / limit.per_second)),
        "per_second": f"{limit.per_second:g}",
    }}  # fmt: skip


def _tls_vars(settings: Settings, model: str, where: Target) -> dict[str, Any]:
    """The front doors' and slots' TLS (docs/security.md); the certificate must name the
    address each host is reached at, so the inventory is read first."""
    if not servetls.enabled(settings):
        if found := servetls.problems(settings):
            raise DeployFailed("; ".join(found))
        return servetls.role_vars(None)
    hosts = inventory_hosts(where.inventory, where.collections)
    addresses = [reached_at(name, facts) for name, facts in hosts.items()]
    return servetls.role_vars(servetls.serving_tls(settings, model, where.environment, addresses))


def reached_at(name: str, facts: dict[str, Any]) -> str:
    """Where the deploy's checks and Prometheus reach a host's slots: the role's
    model_service_scrape_host (the bound address, or the host's own on every interface)."""
    bind = str(facts.get("model_service_bind", "127.0.0.1"))
    if bind in ("0.0.0.0", "::"):
        return str(facts.get("ansible_host", name))
    return bind


def _extravars(
    settings: Settings,
    spec: Spec,
    where: Target,
    version: str,
    tags: dict[str, str],
    progress: Progress,
) -> dict[str, Any]:
    """Everything the role needs for one version (the model_service_* variables)."""
    env = where.settings
    bundle = registry.bundle_archive(settings, spec.name, version, tags)
    values: dict[str, Any] = {
        "model_service_model": spec.name,
        "model_service_environment": where.environment,
        "model_service_version": version,
        "model_service_runtime": env.runtime,
        "model_service_default_port": env.port,
        "model_service_batch": env.batch,
        "model_service_max_fail_percentage": round(env.max_fail_percentage * 100),
        "model_service_token": service_token(settings),
        "model_service_smoke_body": {"inputs": _example(settings, bundle)},
        **_mirror_vars(env),
        **_rate_limit_vars(env),
        **_tls_vars(settings, spec.name, where),
    }
    if where.settings.target == "local":
        # This machine's services keep their state in the workspace, like everything local.
        values["model_service_default_root"] = str(settings.workspace / "services")
        if settings.docker_host:
            values["model_service_default_docker_host"] = settings.docker_host
    if env.runtime == "container":
        if not tags.get("image_ref"):
            skipped = tags.get("image_skipped", "no image was built")
            raise DeployFailed(
                f"{spec.name} v{version} has no serving image ({skipped}); build it with a "
                f"Docker engine running, or set deploy.environments.{where.environment}.runtime "
                "to process"
            )
        values["model_service_image"] = tags["image_ref"]
        values |= registry_pull_vars(settings, tags["image_ref"])
    else:
        archive, digest = _wheelhouse_archive(settings, progress)
        values |= {
            "model_service_bundle_archive": str(bundle),
            "model_service_wheelhouse_archive": str(archive),
            "model_service_wheelhouse_digest": digest,
            "model_service_trusted_keys": trusted_keys(settings).replace(",", "\n") + "\n",
        }
    return values | bundle_key_vars(settings, [bundle])


def version_tags(settings: Settings, model: str, version: str) -> dict[str, str]:
    client = registry.connect(settings)
    try:
        return dict(client.get_model_version(model, version).tags)
    except MlflowException:
        raise DeployFailed(
            f"{model} version {version} is not registered; see `modelyard models`"
        ) from None


def _example(settings: Settings, archive: Path) -> dict[str, Any]:
    """The bundle's input example, for the smoke prediction (decrypted in memory)."""
    schema = _member(archive, "schema.json")
    if keys := sealing.opening_keys(settings, json.loads(_member(archive, MANIFEST))):
        schema = decrypt(schema, "schema.json", keys[0], archive)
    return json.loads(schema)["example"]


def bundle_key_vars(settings: Settings, archives: list[Path]) -> dict[str, Any]:
    """The key of each encrypted bundle a service loads (its own; a shadow's reference), for
    the role to hand the server as it hands it the token ("" when none is encrypted)."""
    keys = [
        k
        for a in archives
        for k in sealing.opening_keys(settings, json.loads(_member(a, MANIFEST)))
    ]
    return {"model_service_bundle_key": sealing.key_text(list(dict.fromkeys(keys)))}


def _member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        member = tar.extractfile(name)
        if member is None:
            raise DeployFailed(f"{archive} has no {name}")
        return member.read()


def _wheelhouse_archive(settings: Settings, progress: Progress) -> tuple[Path, str]:
    """The serving runtime's wheels as one tarball (one copy per host, not one per wheel)."""
    house = prepare_wheelhouse(settings, progress)
    # By content, not time: prepare_wheelhouse rewrites requirements.txt on every call, and a
    # new digest means a new archive here and a new virtualenv on every host.
    digest = hashlib.sha256((house / "requirements.txt").read_bytes())
    digest.update(shipped_file(INSTALLER).read_bytes())
    for path in sorted(house.rglob("*.whl")):  # modelyard's wheel sits under its source digest
        digest.update(f"{path.relative_to(house)}:{path.stat().st_size}\n".encode())
    short = digest.hexdigest()[:16]
    archive = house / f"serving-{short}.tar.gz"
    with exclusive(house / ".lock"):  # releases running at once pack it once
        if not archive.exists():
            progress("wheelhouse: packing the serving runtime for process hosts")
            for stale in house.glob("serving-*.tar.gz"):
                stale.unlink()
            with tempfile.TemporaryDirectory() as tmp:
                flat = flat_wheels(house, Path(tmp) / "wheels")
                partial = archive.with_suffix(".partial")
                with tarfile.open(partial, "w:gz") as tar:
                    for item in sorted(flat.iterdir()):
                        tar.add(item, arcname=item.name)
                partial.rename(archive)
    return archive, short


def _workdir(settings: Settings, model: str, environment: str, action: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return settings.workspace / "releases" / model / environment / f"{stamp}-{action}"
