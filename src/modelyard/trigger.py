"""Start pipeline runs for a commit through Prefect's REST API.

A push waits on its trigger (the git hook runs inside `git push`, CI jobs and the webhook
answer after it), so this talks HTTP to the Prefect server directly instead of importing the
Prefect client (over a second of imports). It creates one flow run per pipeline deployment of
the repository, as `run_deployment` would: scheduled now, the deployment's parameters
overridden by the commit's, tagged and named so the UI finds the run by its commit.
"""

from __future__ import annotations

import base64
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from modelyard.config import Settings
from modelyard.errors import ModelyardError
from modelyard.lineage import run_name, run_tags

FLOW = "modelyard-pipeline"


@dataclass(frozen=True)
class PipelineDeployment:
    id: str
    model: str
    repository: str
    spec_path: str
    pool: str

    @property
    def deployment(self) -> str:
        """`<flow>/<name>`, how Prefect's CLI and `run_deployment` name it."""
        return f"{FLOW}/{self.model}"


@dataclass(frozen=True)
class TriggeredRun:
    model: str
    flow_run_id: str
    name: str
    created: bool  # False when an earlier trigger with the same key already made it


def require_server(settings: Settings) -> str:
    """The Prefect API URL; deployments, workers and triggers have no embedded fallback."""
    if not settings.api_url:
        raise ModelyardError(
            "this needs a Prefect server: start one with `modelyard stack up`, or set "
            "MODELYARD_PREFECT_API_URL"
        )
    return settings.api_url


class PrefectApi:
    """The few REST calls triggers need, with Prefect's own auth settings."""

    def __init__(self, url: str, settings: Settings) -> None:
        headers = {}
        auth = settings.prefect_auth
        if os.environ.get("PREFECT_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['PREFECT_API_KEY']}"
        elif auth:
            headers["Authorization"] = f"Basic {base64.b64encode(auth.encode()).decode()}"
        self.client = httpx.Client(base_url=url.rstrip("/") + "/", headers=headers, timeout=30)

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST, retried on what a busy server answers (429, 502-504: its SQLite database was
        locked, say) and on a dropped connection. Every call here is safe to repeat: a filter
        reads, and a flow run is created under an idempotency key."""
        for delay in (*RETRY_DELAYS, None):
            try:
                response = self.client.post(path, json=body)
            except httpx.TransportError as exc:
                if delay is None:
                    where = self.client.base_url
                    raise ModelyardError(f"Prefect at {where} is unreachable: {exc}") from None
            else:
                if response.status_code not in TRANSIENT or delay is None:
                    break
                delay = _retry_after(response, delay)
            time.sleep(delay)
        if response.status_code >= 400:
            raise ModelyardError(
                f"Prefect refused {path}: {response.status_code} {response.text[:300]}"
            )
        return response


TRANSIENT = {429, 502, 503, 504}
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)  # about 15 s in all, then the error stands


def _retry_after(response: httpx.Response, default: float) -> float:
    """The server's Retry-After (seconds), capped; else the backoff's own delay."""
    try:
        return min(float(response.headers.get("retry-after", default)), 30.0)
    except ValueError:
        return default


def deployments(api: PrefectApi) -> list[PipelineDeployment]:
    found = api.post("deployments/filter", {"flows": {"name": {"any_": [FLOW]}}}).json()
    return [
        PipelineDeployment(
            id=d["id"],
            model=d["name"],
            repository=(d.get("parameters") or {}).get("repository") or "",
            spec_path=(d.get("parameters") or {}).get("spec_path") or "",
            pool=d.get("work_pool_name") or "",
        )
        for d in found
    ]


def trigger(
    settings: Settings,
    commit: str,
    branch: str,
    source: str,
    repositories: list[str] | None = None,
    models: list[str] | None = None,
    key: str | None = None,
) -> list[TriggeredRun]:
    """A flow run per matching deployment for `commit`.

    `repositories` selects the deployments of that repository, under any of its URLs (the git
    hook passes its path, a webhook the clone, SSH and web URLs); `key` makes the trigger
    idempotent: the same key never makes a second run (a redelivered webhook, a hook run twice).
    """
    api = PrefectApi(require_server(settings), settings)
    chosen = [
        d
        for d in deployments(api)
        if (not models or d.model in models)
        and (not repositories or any(same_repository(d.repository, r) for r in repositories))
    ]
    if not chosen:
        wanted = f" of {repositories[0]}" if repositories else ""
        raise ModelyardError(
            f"no pipeline deployment{wanted}{' for ' + ', '.join(models) if models else ''}; "
            "create them with `modelyard pipelines apply SPEC...`"
        )
    runs = []
    for d in chosen:
        name = run_name(d.spec_path, commit, d.repository, settings, d.model)
        body = {
            "name": name,
            "parameters": {"commit": commit, "branch": branch, "trigger": source},
            "tags": run_tags(d.model, commit, branch, source),
            "state": {"type": "SCHEDULED", "name": "Scheduled"},
            "idempotency_key": f"{key}:{d.model}" if key else None,
        }
        response = api.post(f"deployments/{d.id}/create_flow_run", body)
        run = response.json()
        # 201 for a new run; 200 returns the earlier run made with the same idempotency key.
        runs.append(TriggeredRun(d.model, run["id"], run["name"], response.status_code == 201))
    return runs


def same_repository(a: str, b: str) -> bool:
    return repository_key(a) == repository_key(b)


def repository_key(repository: str) -> str:
    """One spelling per repository: a local path resolved; `git@host:o/r.git`,
    `ssh://git@host/o/r`, `https://host/o/r.git` all become `host/o/r`."""
    path = Path(repository)
    if path.exists():
        return str(path.resolve())
    key = re.sub(r"^[a-z+]+://", "", repository.strip())
    key = re.sub(r"^[^@/]+@", "", key)  # user@
    key = re.sub(r"^([^/:]+):(?!\d)", r"\1/", key)  # scp-like host:path
    key = re.sub(r"^([^/:]+):\d+/", r"\1/", key)  # a port
    return key.rstrip("/").removesuffix(".git").lower()
