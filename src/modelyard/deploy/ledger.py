"""The release ledger: one record per deploy, promotion, rejection and rollback.

Each record is an MLflow run in the experiment `modelyard-releases`, its fields as tags and the
Ansible output as artifacts, and the model version gets a `release.<environment>` tag with its
latest outcome. Why runs: they live in the same store as the registry (SQLite or PostgreSQL,
local or behind a tracking server), modelyard only ever creates them, and the MLflow UI lists,
filters and compares them with no extra tool. Anyone who may write to MLflow could still edit
them, so each model and environment's records form a signed hash chain (`chain`): `verify`
names the first record edited, deleted or reordered behind modelyard's back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from modelyard import registry
from modelyard.bundle import parse_public_keys
from modelyard.config import Settings
from modelyard.deploy import chain
from modelyard.package.keys import signing_key, trusted_keys

EXPERIMENT = "modelyard-releases"
SUCCEEDED = "succeeded"
# Actions after which the version named in the record serves the environment.
_SERVING_ACTIONS = ("deploy", "promote", "rollback")
WITHDRAW = "withdraw"  # modelyard doctor removed a version that was never packaged


@dataclass(frozen=True)
class Release:
    model: str
    environment: str
    action: str  # deploy | promote | reject | rollback
    version: str
    outcome: str  # succeeded | failed | rejected
    actor: str
    previous_version: str = ""
    reason: str = ""
    image: str = ""
    image_digest: str = ""
    bundle_digest: str = ""
    runtime: str = ""
    hosts: str = ""
    when: str = ""
    record_id: str = ""

    @property
    def serving(self) -> bool:
        """After this record, does `version` serve the environment?"""
        return self.outcome == SUCCEEDED and self.action in _SERVING_ACTIONS


_FIELDS = tuple(f for f in fields(Release) if f.name != "record_id")  # what a record's tags hold


def append(
    settings: Settings,
    release: Release,
    files: list[Path] | None = None,
    metrics: dict[str, float] | None = None,
) -> Release:
    """Write one record; returns it with its time and id. Records are never changed.
    `metrics`: numbers the MLflow UI can chart and compare across records (an analysis's)."""
    client = registry.connect(settings)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    record = replace(release, when=when)
    tags = {f.name: registry.tag_value(getattr(record, f.name)) for f in _FIELDS}
    experiment_id = registry.ensure_experiment(client, EXPERIMENT, settings)
    last = _last_link(client, experiment_id, record.model, record.environment)
    link = chain.extend(tags, last, signing_key(settings))
    name = f"{record.action} {record.model} v{record.version} → {record.environment}"
    marked = tags | link.tags() | {"modelyard.release": "1"}
    with registry.log_entry(client, settings, EXPERIMENT, name, marked) as entry:
        if files:
            registry.log_files(client, entry.run_id, [f for f in files if f.exists()], "ansible")
        if metrics:
            registry.log_metrics(client, entry.run_id, metrics)
        if record.outcome == "failed":
            entry.failure = record.reason or "failed"
    client.set_experiment_tag(experiment_id, _head_tag(record.model, record.environment),
                              link.text())  # fmt: skip
    if record.action != WITHDRAW:  # a withdrawn version has no tags left to set
        summary = f"{record.action} {record.outcome} {when} by {record.actor}"
        tag = {f"release.{record.environment}": summary}
        registry.tag_version(client, record.model, record.version, tag)
    return replace(record, record_id=entry.run_id)


def history(
    settings: Settings, model: str | None = None, environment: str | None = None
) -> list[Release]:
    """Records, newest first."""
    client = registry.connect(settings)
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is None:
        return []
    return [_from_run(run) for run in _all_runs(client, found.experiment_id,
                                                _query(model, environment))]  # fmt: skip


def _query(model: str | None, environment: str | None) -> str:
    clauses = ["tags.`modelyard.release` = '1'"]
    if model:
        clauses.append(f"tags.model = '{registry.quoted(model)}'")
    if environment:
        clauses.append(f"tags.environment = '{registry.quoted(environment)}'")
    return " and ".join(clauses)


def _last_link(
    client: MlflowClient, experiment_id: str, model: str, environment: str
) -> chain.Link | None:
    """The newest record's link in the model and environment's chain: what a new one follows."""
    newest = client.search_runs([experiment_id], _query(model, environment),
                                order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    return chain.parse(newest[0].data.tags) if newest else None


def _head_tag(model: str, environment: str) -> str:
    """The experiment tag holding a chain's newest link (a model's name may hold characters
    a tag's key may not)."""
    return "chain.head." + hashlib.sha256(f"{model}\n{environment}".encode()).hexdigest()[:24]


def verify(
    settings: Settings, model: str | None = None, environment: str | None = None
) -> dict[tuple[str, str], list[chain.Break]]:
    """Each chain's breaks (model, environment → what is wrong, earliest first; [] when
    nothing is), checked with the keys a local server trusts and `ledger_keys`."""
    client = registry.connect(settings)
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is None:
        return {}
    chains: dict[tuple[str, str], list[chain.Entry]] = {}
    for run in _all_runs(client, found.experiment_id, _query(model, environment)):
        tags = run.data.tags
        entry = chain.Entry(run.info.run_id, _fields(tags), chain.parse(tags),
                            run.info.start_time)  # fmt: skip
        chains.setdefault((entry.fields["model"], entry.fields["environment"]), []).append(entry)
    # A rotation retires a key from the bundles' trust, not the records it signed.
    trusted = parse_public_keys(f"{trusted_keys(settings)},{settings.ledger_keys}")
    return {
        key: chain.verify(entries, chain.parse_head(found.tags.get(_head_tag(*key))), trusted)
        for key, entries in sorted(chains.items())
    }


def live(settings: Settings, model: str, environment: str) -> Release | None:
    """The record of the version serving the environment now, if any."""
    return next((r for r in history(settings, model, environment) if r.serving), None)


def previous_good(settings: Settings, model: str, environment: str) -> Release | None:
    """The version to roll back to: served before the live one, and never rolled away from."""
    records = history(settings, model, environment)
    current = next((r for r in records if r.serving), None)
    if current is None:
        return None
    # Newest first: a rollback seen before a record is later than it, and taints the version it
    # left until that version is deployed again on purpose.
    rolled_away: set[str] = set()
    for record in records:
        if (
            record.serving
            and record.version != current.version
            and record.version not in rolled_away
        ):
            return record
        if record.action == "rollback" and record.serving:
            rolled_away.add(record.previous_version)
    return None


def _all_runs(client: MlflowClient, experiment_id: str, query: str) -> list[Run]:
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            [experiment_id], query, order_by=["attributes.start_time DESC"],
            max_results=1000, page_token=token,
        )  # fmt: skip
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _from_run(run: object) -> Release:
    values = _fields(run.data.tags)  # type: ignore[attr-defined]
    return Release(**values, record_id=run.info.run_id)  # type: ignore[attr-defined]


def _fields(tags: dict[str, str]) -> dict[str, str]:
    """A record's fields from its run's tags (what its chain link hashes)."""
    return {f.name: tags.get(f.name, "") for f in _FIELDS}
