"""The drift check: PSI of a serving version's live inputs and predictions against its bundle's
reference, recorded in MLflow and as a Prefect artifact, and a retraining run when it drifted.

`modelyard pipelines apply` schedules it per model and environment (the spec's
`monitoring.interval`); `modelyard monitor` runs it once, here. Only wiring: the work is in
modelyard.monitor.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flows import logs
from flows.process import run_settings
from flows.retries import TRANSIENT
from modelyard.config import Settings
from modelyard.lineage import slug
from modelyard.monitor import drift
from modelyard.monitor.drift import DriftReport
from modelyard.outcomes import MonitorOutcome
from modelyard.spec import Monitoring

logs.install()

FLOW = "modelyard-monitor"


@task(name="live-version", cache_policy=NONE, persist_result=False)
def live_version_task(settings: Settings, model: str, environment: str) -> str:
    return drift.live_version(settings, model, environment)


@task(name="measure-drift", cache_policy=NONE, persist_result=False, **TRANSIENT)
def measure_task(
    settings: Settings, model: str, environment: str, version: str, rules: Monitoring
) -> DriftReport:
    prometheus = drift.prometheus_for(settings)
    return drift.measure(prometheus, model, environment, version, rules)


@task(name="record-drift", cache_policy=NONE, persist_result=False, **TRANSIENT)
def record_task(settings: Settings, report: DriftReport) -> str:
    from modelyard.monitor import plots  # matplotlib: only for the plots

    with tempfile.TemporaryDirectory() as tmp:
        pngs = plots.render(report, Path(tmp))
        run_id, url = drift.record(settings, report, pngs)
    create_markdown_artifact(
        report.markdown() + f"\n\nPlots and the full report: [MLflow run]({url})",
        key=f"{slug(report.model)}-{slug(report.environment)}-drift",
        description=f"{report.model} {report.environment}: drift check",
    )
    return run_id


@task(name="retrain", cache_policy=NONE, persist_result=False)
def retrain_task(
    settings: Settings, report: DriftReport, cooldown: int, run_id: str
) -> tuple[str, str]:
    return drift.retrain(settings, report, cooldown, run_id)


@flow(name=FLOW, flow_run_name="drift {model} {environment}", log_prints=True)
def monitor(
    model: str, environment: str = "production", monitoring: dict[str, Any] | None = None
) -> MonitorOutcome:
    """Check drift of the version serving `environment`; retrain when it drifted.

    `monitoring`: the spec's `monitoring` section (threshold, window, cooldown, ...).
    """
    logger = get_run_logger()
    rules = Monitoring(**(monitoring or {}))
    settings = run_settings()
    drift.prometheus_for(settings)  # none configured: fail before any task runs
    version = live_version_task(settings, model, environment)
    report = measure_task(settings, model, environment, version, rules)
    run_id = record_task(settings, report)
    worst = report.worst
    logger.info(
        "%s v%s in %s: %d rows, worst PSI %s; drifted: %s",
        model, version, environment, report.rows,
        f"{worst.psi:.3f} ({worst.name})" if worst else "-", ", ".join(report.drifted) or "none",
    )  # fmt: skip
    outcome, detail = "none", ""
    if report.drifted and rules.retrain:
        outcome, detail = retrain_task(settings, report, rules.cooldown, run_id)
        logger.info("retraining: %s: %s", outcome, detail)
    return MonitorOutcome(
        model=model, environment=environment, version=version, rows=report.rows,
        drifted=list(report.drifted), psi={s.name: s.psi for s in report.signals},
        retrain=outcome, retrain_detail=detail, mlflow_run_id=run_id,
    )  # fmt: skip
