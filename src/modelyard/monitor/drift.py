"""Drift of a deployed version: live bin counts from Prometheus against the bundle's reference.

The serving app counts every predicted row into fixed bins (modelyard.bins) and
exports the reference shares beside them; this module reads both back from Prometheus over a
window, computes PSI per input and for the prediction, and decides whether the version has
drifted. `retrain` then starts the model's pipeline deployment, at most once per cooldown.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from modelyard import registry, signin, stackstate
from modelyard.bins import MISSING, OTHER, psi
from modelyard.config import Settings
from modelyard.errors import ModelyardError
from modelyard.signin import Access
from modelyard.spec import Monitoring

EXPERIMENT = "modelyard-monitoring"
PREDICTION = "prediction"


@dataclass(frozen=True)
class Signal:
    """One input column, or the prediction: its PSI and the shares it was computed from."""

    name: str
    psi: float
    bins: list[str]
    live: list[float]  # shares of the window's rows
    reference: list[float]


@dataclass(frozen=True)
class DriftReport:
    model: str
    environment: str
    version: str
    window_seconds: int
    rows: int
    threshold: float
    min_rows: int
    features: list[Signal]
    prediction: Signal | None
    checked_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def enough_rows(self) -> bool:
        return self.rows >= self.min_rows

    @property
    def signals(self) -> list[Signal]:
        return [*self.features, *([self.prediction] if self.prediction else [])]

    @property
    def drifted(self) -> list[str]:
        """Names of the signals over the threshold; none without enough rows for a verdict."""
        if not self.enough_rows:
            return []
        return [s.name for s in self.signals if s.psi > self.threshold]

    @property
    def verdict(self) -> str:
        if not self.enough_rows:
            return "no verdict"
        return "drifted" if self.drifted else "stable"

    @property
    def worst(self) -> Signal | None:
        return max(self.signals, key=lambda s: s.psi, default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"drifted": self.drifted, "enough_rows": self.enough_rows}

    def markdown(self) -> str:
        """The Prefect artifact: a verdict line and PSI per signal, worst first."""
        verdict = {
            "no verdict": f"no verdict: {self.rows} live rows, {self.min_rows} needed",
            "drifted": f"**drifted**: {', '.join(self.drifted)}",
        }.get(self.verdict, self.verdict)
        lines = [
            f"### {self.model} v{self.version} in {self.environment}: {verdict}",
            "",
            f"{self.rows} rows in the last {self.window_seconds} s; PSI threshold "
            f"{self.threshold}.",
            "",
            "| signal | PSI | over threshold |",
            "|---|---|---|",
        ]
        for s in sorted(self.signals, key=lambda s: -s.psi):
            lines.append(f"| {s.name} | {s.psi:.3f} | {'yes' if s.psi > self.threshold else ''} |")
        return "\n".join(lines)


class Prometheus:
    """Instant queries against Prometheus's HTTP API (signed in, for the stack's)."""

    def __init__(self, url: str, access: Access | None = None) -> None:
        self.url = url.rstrip("/")
        self.access = access

    def _get(self, path: str, params: dict[str, str] | None = None) -> httpx.Response:
        signed: dict[str, Any] = {}
        if self.access is not None:
            signed = {"auth": self.access.auth, "verify": self.access.ssl_context()}
        return httpx.get(f"{self.url}{path}", params=params, timeout=30, **signed)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query, evaluated at `at` (Unix seconds) or when Prometheus gets it."""
        params = {"query": expr} | ({} if at is None else {"time": f"{at:.3f}"})
        try:
            response = self._get("/api/v1/query", params)
        except httpx.HTTPError as exc:
            raise ModelyardError(f"Prometheus at {self.url} is unreachable: {exc}") from None
        body = response.json() if response.headers.get("content-type", "").startswith(
            "application/json"
        ) else {}  # fmt: skip
        if response.status_code != 200 or body.get("status") != "success":
            why = body.get("error") or response.text[:300]
            raise ModelyardError(f"Prometheus refused the query {expr!r}: {why}")
        return body["data"]["result"]

    def scrape_interval(self, job: str = "modelyard") -> float | None:
        """Seconds between scrapes of `job` (else the global default), from the configuration
        Prometheus runs; None when it cannot be read."""
        try:
            response = self._get("/api/v1/status/config")
            config = yaml.safe_load(response.json()["data"]["yaml"]) or {}
        except (httpx.HTTPError, ValueError, KeyError, TypeError, yaml.YAMLError):
            return None
        jobs = {c.get("job_name"): c for c in config.get("scrape_configs") or []}
        scrape = jobs.get(job) or config.get("global") or {}
        text = scrape.get("scrape_interval")
        return duration_seconds(str(text)) if text else None

    def values(
        self, expr: str, *labels: str, at: float | None = None
    ) -> dict[tuple[str, ...], float]:
        """Series of an instant query (at `at`) keyed by the given labels' values."""
        return {
            tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
            for r in self.query(expr, at)
        }


def prometheus_for(settings: Settings) -> Prometheus:
    if not settings.prometheus:
        raise ModelyardError(
            "drift checks read Prometheus: start it with `modelyard stack up prometheus`, or set "
            "MODELYARD_PROMETHEUS_URL"
        )
    # The stack's sign-in goes to the stack's Prometheus only, never to one configured elsewhere.
    ours = settings.prometheus == stackstate.running_url(settings.workspace, "prometheus")
    return Prometheus(settings.prometheus, signin.access(settings) if ours else None)


def live_version(settings: Settings, model: str, environment: str) -> str:
    """The version serving `environment`: its alias, moved by every successful deploy."""
    version = registry.aliases(registry.connect(settings), model).get(environment)
    if not version:
        raise ModelyardError(
            f"{model} has no version serving {environment} (no '{environment}' alias); deploy "
            f"one with `modelyard deploy {environment}`"
        )
    return version


def measure(
    prometheus: Prometheus, model: str, environment: str, version: str, monitoring: Monitoring
) -> DriftReport:
    """PSI per input and of the predictions over the last `monitoring.window` seconds."""
    selector = (
        f'job="modelyard",model="{_escape(model)}",environment="{_escape(environment)}",'
        f'version="{_escape(version)}"'
    )
    window = f"[{monitoring.window}s]"
    rows = prometheus.values(f"sum(increase(modelyard_predicted_rows_total{{{selector}}}{window}))")
    live, reference = _bin_series(prometheus, "input", selector, window, "feature", "bin")
    if not reference:
        raise ModelyardError(
            f"Prometheus has no drift reference for {model} v{version} in {environment}: is the "
            "service scraped (see `modelyard stack status`), and was its bundle built by a "
            "modelyard with drift bins (0.6 or later)?"
        )
    features = [
        _signal(name, _by_bin(live, name), _by_bin(reference, name))
        for name in sorted({feature for feature, _ in reference})
    ]
    live, reference = _bin_series(prometheus, "prediction", selector, window, "bin")
    prediction = (
        _signal(PREDICTION, {b: v for (b,), v in live.items()},
                {b: v for (b,), v in reference.items()})
        if reference
        else None
    )  # fmt: skip
    return DriftReport(
        model=model,
        environment=environment,
        version=version,
        window_seconds=monitoring.window,
        rows=round(next(iter(rows.values()), 0.0)),
        threshold=monitoring.drift_threshold,
        min_rows=monitoring.min_rows,
        features=features,
        prediction=prediction,
    )


def record(settings: Settings, report: DriftReport, plots: list[Path]) -> tuple[str, str]:
    """One MLflow run per check in `modelyard-monitoring`: PSI as metrics, the report and the
    plots as artifacts, the verdict as tags. Returns the run's id and its UI address."""
    client = registry.connect(settings)
    tags = {
        "model": report.model,
        "environment": report.environment,
        "version": report.version,
        "drifted": ",".join(report.drifted),
        "verdict": report.verdict,
    }
    name = f"drift {report.model} v{report.version} in {report.environment}"
    with registry.log_entry(client, settings, EXPERIMENT, name, tags) as entry:
        now = int(time.time() * 1000)
        for s in report.signals:
            client.log_metric(entry.run_id, f"psi.{_metric_key(s.name)}", s.psi, timestamp=now)
        client.log_metric(entry.run_id, "rows", report.rows, timestamp=now)
        registry.log_json(client, entry.run_id, report.to_dict(), "drift/report.json")
        registry.log_files(client, entry.run_id, plots, "drift")
    return entry.run_id, registry.run_url(settings, entry.experiment_id, entry.run_id)


def last_retrain(settings: Settings, model: str, environment: str) -> float | None:
    """When drift last started a retraining of this model and environment (epoch seconds)."""
    client = registry.connect(settings)
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        f"tags.model = '{registry.quoted(model)}' and "
        f"tags.environment = '{registry.quoted(environment)}' and tags.retrain_run != ''",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.start_time / 1000 if runs else None


def retrain(settings: Settings, report: DriftReport, cooldown: int, run_id: str) -> tuple[str, str]:
    """Start the model's pipeline for the serving version's commit, unless drift already did
    within `cooldown` seconds. Returns (outcome, detail) and tags the check's MLflow run.

    The trigger's idempotency key names the cooldown window too, so two checks racing past
    the `last_retrain` look-up still start one run.
    """
    from modelyard.trigger import trigger  # REST only

    client = registry.connect(settings)
    previous = last_retrain(settings, report.model, report.environment)
    now = time.time()
    if previous is not None and now - previous < cooldown:
        left = int(cooldown - (now - previous))
        client.set_tag(run_id, "retrain", f"cooldown ({left} s left)")
        return "cooldown", f"drift started a retraining {int(now - previous)} s ago; {left} s left"
    tags = dict(client.get_model_version(report.model, report.version).tags)
    commit, branch = tags.get("git_commit", ""), tags.get("git_branch", "") or "main"
    if not commit or commit == "unknown":
        raise ModelyardError(
            f"{report.model} v{report.version} has no git_commit tag; retraining needs the "
            "commit to check out"
        )
    bucket = int(now // cooldown) if cooldown else int(now)
    key = f"drift:{report.model}:{report.environment}:{bucket}"
    runs = trigger(settings, commit, branch, "drift", models=[report.model], key=key)
    started = runs[0]
    client.set_tag(run_id, "retrain_run", started.flow_run_id)
    client.set_tag(run_id, "retrain", "started" if started.created else "already started")
    return "started", f"pipeline run {started.name} ({started.flow_run_id})"


def _bin_series(
    prometheus: Prometheus, signal: str, selector: str, window: str, *by: str
) -> tuple[dict[tuple[str, ...], float], dict[tuple[str, ...], float]]:
    """Live rows per bin over the window, and the reference shares, of `input` or
    `prediction`, keyed by the `by` labels."""
    group = ", ".join(by)
    live = prometheus.values(
        f"sum by ({group}) (increase(modelyard_{signal}_bin_total{{{selector}}}{window}))", *by
    )
    reference = prometheus.values(
        f"max by ({group}) (modelyard_{signal}_reference_ratio{{{selector}}})", *by
    )
    return live, reference


def _signal(name: str, live: dict[str, float], reference: dict[str, float]) -> Signal:
    bins = ordered_bins(list(reference))
    total = sum(live.values())
    return Signal(
        name=name,
        psi=round(psi(live, reference), 6),
        bins=bins,
        live=[round(live.get(b, 0.0) / total, 6) if total else 0.0 for b in bins],
        reference=[reference[b] for b in bins],
    )


def _by_bin(series: dict[tuple[str, ...], float], feature: str) -> dict[str, float]:
    return {b: v for (f, b), v in series.items() if f == feature}


_LOWER = re.compile(r"^(<|≥)?(-?[\d.]+(?:e[+-]?\d+)?)")


def ordered_bins(labels: list[str]) -> list[str]:
    """Bins in their natural order: numeric ranges ascending (`<a` first, `≥z` last), then
    categories by name, then `other` and `missing`."""

    def key(label: str) -> tuple[int, float, str]:
        if label == OTHER:
            return (3, 0.0, label)
        if label == MISSING:
            return (4, 0.0, label)
        match = _LOWER.match(label)
        if match is None:
            return (2, 0.0, label)
        prefix, number = match.groups()
        return (0 if prefix == "<" else 1, float(number) + (1e-9 if prefix == "≥" else 0), label)

    return sorted(labels, key=key)


def _metric_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_seconds(text: str) -> float | None:
    """A Prometheus duration ("15s", "1m30s", "500ms") in seconds; None if it is not one."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)
