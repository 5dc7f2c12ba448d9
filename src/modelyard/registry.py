"""MLflow: runs, model versions, aliases and tags — everything the pipeline records.

Every call takes the `MlflowClient` that `connect(settings)` built for the configured store, with
explicit run ids rather than MLflow's global active run, so stages can run in any thread or
process the orchestrator chooses, and two stores can be used side by side. Nothing here sets a
process-wide MLflow URI for longer than one call: the few fluent calls MLflow offers no client
for (logging and loading a model, registering one) point the fluent API at the client's store,
under a lock, and put back what was there. Credentials are MLflow's environment variables, set
once by the process's entry point (the CLI, a flow run; `Settings.mlflow_credentials_env`).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import mlflow
import mlflow.sklearn
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from modelyard.config import Settings, disable_telemetry
from modelyard.errors import ModelyardError

CANDIDATE = "candidate"
MODEL_ARTIFACT = "model"
_MAX_TAG = 5000  # MLflow's limit on tag values


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    run_id: str
    aliases: list[str]
    tags: dict[str, str]
    created: int


@dataclass(frozen=True)
class ChampionModel:
    """The version currently holding the champion alias, loaded for scoring."""

    version: str
    model: Any
    input_columns: list[str]


class GateRecord(Protocol):
    """What the registry records of a gate (checks.report.GateReport is one)."""

    gate: str

    @property
    def verdict(self) -> str: ...

    def to_json(self) -> str: ...

    def to_markdown(self) -> str: ...


def connect(settings: Settings) -> MlflowClient:
    """A client of the configured MLflow (tracking and registry in one store)."""
    disable_telemetry()
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):  # the embedded store: SQLite makes the file, not its folder
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(uri, uri)


_FLUENT = threading.RLock()


@contextmanager
def _fluent(client: MlflowClient) -> Iterator[None]:
    """MLflow's fluent API pointed at `client`'s store for one call, then put back: the lock
    keeps two threads of one process (two flows at once) from pointing it elsewhere meanwhile.
    `mlflow.set_tracking_uri` also exports the URI to the environment; that is put back too."""
    from mlflow.tracking._model_registry import utils as registry_uri
    from mlflow.tracking._tracking_service import utils as tracking_uri

    with _FLUENT:
        before = tracking_uri._tracking_uri, registry_uri._registry_uri  # unset stays unset
        exported = {name: os.environ.get(name) for name in _URI_VARIABLES}
        mlflow.set_tracking_uri(client.tracking_uri)
        mlflow.set_registry_uri(client._registry_uri or client.tracking_uri)
        try:
            yield
        finally:
            tracking_uri._tracking_uri, registry_uri._registry_uri = before
            for name, value in exported.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def signed_in_user(settings: Settings) -> str | None:
    """Who the MLflow server says we are, when it has its basic-auth app; else None.

    Approvals use this rather than a name anyone can type: the server checked the password."""
    uri, credentials = settings.tracking_uri, settings.mlflow_credentials
    if not uri.startswith(("http://", "https://")) or credentials is None:
        return None
    user, password = credentials
    try:
        response = httpx.get(f"{uri.rstrip('/')}/api/2.0/mlflow/users/current",
                             auth=(user, password), timeout=10)  # fmt: skip
    except httpx.HTTPError as exc:
        raise ModelyardError(f"MLflow at {uri} is unreachable: {exc}") from None
    if response.status_code == 404:  # no auth app: nobody is signed in
        return None
    if response.status_code in (401, 403):
        raise ModelyardError(
            f"MLflow at {uri} refused the password of {user}: fix MODELYARD_MLFLOW_PASSWORD"
        )
    response.raise_for_status()
    return str(response.json()["user"]["username"])


def ensure_experiment(client: MlflowClient, name: str, settings: Settings) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # Against the embedded SQLite store artifacts go to the workspace, not to ./mlruns of the cwd;
    # a tracking server decides its own artifact location.
    local = settings.tracking_uri.startswith("sqlite:")
    return client.create_experiment(
        name, artifact_location=settings.artifact_root + f"/{name}" if local else None
    )


def start_run(client: MlflowClient, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    try:
        return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    except MlflowException as exc:
        if "error code 403" in str(exc) or "PERMISSION_DENIED" in str(exc):
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
            raise ModelyardError(
                f"MLflow refused {user} to write to experiment {experiment_id} (permission "
                "denied): an MLflow admin grants EDIT on it, or sign in as a user who has it "
                "(MODELYARD_MLFLOW_USERNAME)"
            ) from None
        raise


def run_url(settings: Settings, experiment_id: str, run_id: str) -> str:
    return f"{_ui_base(settings)}/#/experiments/{experiment_id}/runs/{run_id}"


def version_url(settings: Settings, name: str, version: str) -> str:
    return f"{_ui_base(settings)}/#/models/{name}/versions/{version}"


def _ui_base(settings: Settings) -> str:
    uri = settings.tracking_uri
    return uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    client.log_batch(run_id, metrics=_metrics(metrics))


def _metrics(metrics: dict[str, float]) -> list[mlflow.entities.Metric]:
    """MLflow's metrics, NaN left out (MLflow stores it, and charts break on it)."""
    return [mlflow.entities.Metric(k, v, 0, 0) for k, v in metrics.items() if v == v]


def log_training(
    client: MlflowClient,
    run_id: str,
    model: Any,
    params: dict[str, str],
    metrics: dict[str, float],
    example: pd.DataFrame,
    example_scores: Any,
    files: list[Path],
) -> str:
    """Params, metrics, plots, spec files and the model itself (with signature and example)."""
    client.log_batch(
        run_id,
        metrics=_metrics(metrics),
        params=[mlflow.entities.Param(k, v[:6000]) for k, v in params.items()],
    )
    log_files(client, run_id, files, "training")
    signature = infer_signature(example, example_scores)
    with _fluent(client), mlflow.start_run(run_id=run_id):
        info = mlflow.sklearn.log_model(
            model,
            name=MODEL_ARTIFACT,
            signature=signature,
            input_example=example,
            serialization_format="cloudpickle",
            # Stated, not inferred: inference imports the model in a subprocess and costs seconds.
            pip_requirements=_requirements(),
        )
    return info.model_uri


def _requirements() -> list[str]:
    import cloudpickle
    import sklearn

    return [
        f"scikit-learn=={sklearn.__version__}",
        f"cloudpickle=={cloudpickle.__version__}",
        f"pandas=={pd.__version__}",
    ]


def log_gate(
    client: MlflowClient, run_id: str, report: GateRecord, extra: Path | None = None
) -> None:
    """The gate's report as JSON and Markdown, its verdict as a tag, any extra folder alongside."""
    path = f"gates/{report.gate}"
    client.log_text(run_id, report.to_json(), f"{path}/report.json")
    client.log_text(run_id, report.to_markdown(), f"{path}/report.md")
    if extra is not None and extra.is_dir():
        client.log_artifacts(run_id, str(extra), artifact_path=f"{path}/{extra.name}")
    client.set_tag(run_id, f"gate.{report.gate}", report.verdict)


def log_json(
    client: MlflowClient, run_id: str, payload: dict[str, Any], artifact_file: str
) -> None:
    client.log_text(run_id, json.dumps(payload, indent=2, default=str), artifact_file)


def set_run_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_tag(run_id, key, tag_value(value))


def tag_value(value: object) -> str:
    """`value` as MLflow keeps a tag: text, cut at its limit."""
    return str(value)[:_MAX_TAG]


def end_run(client: MlflowClient, run_id: str, failure: str | None = None) -> None:
    """FINISHED, or FAILED with the reason in the `failure` tag for the MLflow UI."""
    if failure:
        client.set_tag(run_id, "failure", failure[:_MAX_TAG])
    client.set_terminated(
        run_id, RunStatus.to_string(RunStatus.FAILED if failure else RunStatus.FINISHED)
    )


@dataclass
class Entry:
    """A record being written to an experiment kept as a log; a `failure` ends it FAILED."""

    experiment_id: str
    run_id: str
    failure: str | None = None


@contextmanager
def log_entry(
    client: MlflowClient, settings: Settings, experiment: str, name: str, tags: dict[str, str]
) -> Iterator[Entry]:
    """One record of an experiment kept as a log (the release ledger, the drift checks): a run
    made with its tags, handed to the caller for what it logs, then ended. A caller that raises
    ends it FAILED with the reason, so no record is left RUNNING."""
    experiment_id = ensure_experiment(client, experiment, settings)
    entry = Entry(experiment_id, start_run(client, experiment_id, name, tags))
    try:
        yield entry
    except Exception as exc:
        end_run(client, entry.run_id, f"{type(exc).__name__}: {exc}")
        raise
    end_run(client, entry.run_id, entry.failure)


def existing_version(
    client: MlflowClient, name: str, lineage: dict[str, str]
) -> VersionInfo | None:
    """A finished version already registered from the same commit, spec and data, if any.

    One without a bundle is the leftover of a run that died before packaging: never reused
    (`modelyard doctor` withdraws it)."""
    keys = ("git_commit", "spec_hash", "data_fingerprint")
    for info in list_versions(client, name):
        if (
            all(info.tags.get(k) == lineage.get(k) for k in keys)
            and lineage.get("git_dirty") == "false"
            and info.tags.get("bundle_digest")
        ):
            return info
    return None


def register(client: MlflowClient, model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Create the model version with its tags (no alias yet); returns the version number."""
    # mlflow.register_model resolves MLflow 3 logged-model URIs (models:/m-...) to their source.
    with _fluent(client):
        version = mlflow.register_model(
            model_uri, name, tags={k: str(v)[:_MAX_TAG] for k, v in tags.items()}
        ).version
    return str(version)


def withdraw(client: MlflowClient, name: str, version: str) -> None:
    """Undo a registration whose packaging failed, so the registry is as it was before."""
    client.delete_model_version(name, version)
    if not client.search_model_versions(f"name = '{name}'"):
        client.delete_registered_model(name)


def tag_version(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value)[:_MAX_TAG])


def log_files(client: MlflowClient, run_id: str, files: list[Path], artifact_path: str) -> None:
    for file in files:
        client.log_artifact(run_id, str(file), artifact_path=artifact_path)


def quoted(value: str) -> str:
    """A value for a single-quoted string in an MLflow search filter."""
    return value.replace("'", "\\'")


def set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    client.set_registered_model_alias(name, alias, version)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    try:
        held = client.get_registered_model(name).aliases
    except MlflowException:
        return {}
    return {alias: str(version) for alias, version in held.items()}  # the store may say int


def load_alias(client: MlflowClient, name: str, alias: str) -> ChampionModel | None:
    """The model holding `alias`, loaded for scoring, or None when no version holds it."""
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    uri = f"models:/{name}@{alias}"
    with _fluent(client):
        model = mlflow.sklearn.load_model(uri)
        signature = mlflow.models.get_model_info(uri).signature
    columns = signature.inputs.input_names() if signature else list(model.feature_names_in_)
    return ChampionModel(version=str(version.version), model=model, input_columns=columns)


def list_versions(client: MlflowClient, name: str | None = None) -> list[VersionInfo]:
    query = f"name = '{name}'" if name else None
    found = client.search_model_versions(query)
    alias_map: dict[str, dict[str, list[str]]] = {}
    out = []
    for v in found:
        if v.name not in alias_map:
            alias_map[v.name] = _aliases_by_version(client, v.name)
        out.append(
            VersionInfo(
                name=v.name,
                version=str(v.version),
                run_id=v.run_id or "",
                aliases=alias_map[v.name].get(str(v.version), []),
                tags=dict(v.tags),
                created=int(v.creation_timestamp or 0),
            )
        )
    return sorted(out, key=lambda i: (i.name, int(i.version)))


def _aliases_by_version(client: MlflowClient, name: str) -> dict[str, list[str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases(client, name).items():
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def run_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    try:
        return dict(client.get_run(run_id).data.metrics)
    except MlflowException:
        return {}


def bundle_folder(settings: Settings, model: str, version: str) -> Path:
    """Where this workspace keeps a version's bundle: `bundle/` unpacked, and its tarball."""
    return settings.workspace / "bundles" / model / version


def bundle_archive(settings: Settings, model: str, version: str, tags: dict[str, str]) -> Path:
    """The version's signed bundle tarball: from the workspace, else from MLflow."""
    folder = bundle_folder(settings, model, version)
    local = next(iter(sorted(folder.glob("*.bundle.tar.gz"))), None)
    if local is not None:
        return local
    if not tags.get("bundle_artifact"):
        raise ModelyardError(
            f"{model} v{version} has no bundle; it was registered before packaging"
        )
    folder.mkdir(parents=True, exist_ok=True)
    downloaded = mlflow.artifacts.download_artifacts(
        tags["bundle_artifact"], dst_path=str(folder), tracking_uri=settings.tracking_uri
    )
    return Path(downloaded)


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def resolve_model_uri(client: MlflowClient, uri: str) -> tuple[str, str, dict[str, str]]:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS`, as `mlflow models serve -m` takes them:
    the model's name, its version and that version's tags."""
    found = _MODEL_URI.match(uri)
    if found is None:
        raise ModelyardError(
            f"{uri!r} is not a model URI: write models:/NAME/VERSION or models:/NAME@ALIAS"
        )
    name = found["name"]
    try:
        if found["alias"]:
            version = client.get_model_version_by_alias(name, found["alias"])
        else:
            version = client.get_model_version(name, found["version"])
    except MlflowException as exc:
        listed = f"`modelyard models {name}` lists its versions and aliases"
        raise ModelyardError(f"{uri}: {exc.message} ({listed})") from None
    return name, str(version.version), dict(version.tags)
