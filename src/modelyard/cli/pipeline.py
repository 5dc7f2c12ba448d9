"""Commands about a spec and its runs: validate-spec, init, run, models, monitor, rebuild."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from modelyard.cli.common import SpecOption, app, console, err, progress, reports_errors, settings
from modelyard.errors import ModelyardError, SpecError, disk_full
from modelyard.spec import load_spec

if TYPE_CHECKING:
    from modelyard.outcomes import PipelineOutcome


@app.command("validate-spec")
@reports_errors
def validate_spec(spec: SpecOption = Path("modelyard.yaml")) -> None:
    """Check a spec without running anything."""
    loaded = load_spec(spec)
    console.print(
        f"[green]ok[/] {spec}: model [bold]{loaded.name}[/] ({loaded.task}), "
        f"{len(loaded.features)} features, estimator {loaded.estimator.class_}"
    )


@app.command()
@reports_errors
def init(
    data: Annotated[
        str, typer.Argument(help="A CSV or Parquet file to profile, local or s3://bucket/key.")
    ],
    target: Annotated[str, typer.Option(help="The column to predict.")],
    task: Annotated[
        str | None,
        typer.Option(
            help="regression, binary_classification or multiclass_classification (default: "
            "from the target)."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model name (default: from the file).")] = None,
    output: Annotated[Path, typer.Option(help="Where to write the spec.")] = Path("modelyard.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing spec.")] = False,
) -> None:
    """Draft a spec from the data: feature types, ranges, categories, gaps, an estimator, gates."""
    from modelyard.draft import draft

    if output.exists() and not force:
        raise SpecError(f"{output} exists; pass --force to replace it, or --output PATH")
    drafted = draft(data, target, output.resolve().parent, task, name)
    output.write_text(drafted.to_yaml())
    loaded = load_spec(output)  # what `run` will read must be valid
    console.print(
        f"[green]✓[/] wrote {output}: {loaded.task}, {len(loaded.features)} features, "
        f"estimator {loaded.estimator.class_.rpartition('.')[2]}"
    )
    for column, why in drafted.left_out.items():
        console.print(f"  left out {column!r}: {why}")
    for note in drafted.notes:
        console.print(f"  chosen: {note}")
    console.print(f"Next: `modelyard run --spec {output}`")


NOTHING_TO_DEPLOY = (
    "The spec has no deploy.environments, so the run stopped after registering: add one "
    "(docs/spec.md, `deploy`) and release this version with `modelyard deploy ENV --version "
    "{version}`."
)


@app.command()
@reports_errors
def run(
    spec: SpecOption = Path("modelyard.yaml"),
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute every stage.")] = False,
    commit: Annotated[
        str | None, typer.Option(help="Commit to record (default: git HEAD).")
    ] = None,
    branch: Annotated[str | None, typer.Option(help="Branch to record.")] = None,
    no_deploy: Annotated[
        bool, typer.Option("--no-deploy", help="Stop after registering the candidate.")
    ] = False,
) -> None:
    """Run the pipeline on a spec: train → validate → register → deploy → approval → promote."""
    from modelyard.outcomes import PipelineOutcome

    loaded = load_spec(spec)  # fail on a bad spec before starting any server or stage
    from flows.pipeline import run_tagged
    from modelyard.lineage import git_info

    git = git_info(spec.resolve().parent, settings())
    console.print(f"[bold]modelyard[/] running [bold]{loaded.name}[/] from {spec} …")
    state = run_tagged(
        loaded.name,
        commit or git.commit,
        branch or git.branch,
        "cli",
        spec_path=str(spec),
        refresh_cache=no_cache,
        deploy=not no_deploy,
    )
    flow_run_id = str(state.state_details.flow_run_id)
    outcome = state.result(raise_on_failure=False)
    if state.is_completed() and isinstance(outcome, PipelineOutcome):
        _print_success(outcome)
        if not no_deploy and not loaded.deploy.environments:
            console.print(NOTHING_TO_DEPLOY.format(version=outcome.version))
        return
    _print_where(flow_run_id, outcome=None)
    if isinstance(outcome, BaseException) and (full := disk_full(outcome, settings().workspace)):
        raise full
    if isinstance(outcome, ModelyardError):
        raise outcome
    err.print(f"[bold red]error:[/] pipeline failed: {state.message or outcome}")
    raise typer.Exit(1)


def _print_success(outcome: PipelineOutcome) -> None:
    table = Table(title="stages")
    for column in ("stage", "outcome", "seconds", "cached"):
        table.add_column(column)
    for row in outcome.stages:
        table.add_row(row.stage, row.outcome, f"{row.seconds:.2f}", "yes" if row.cached else "")
    console.print(table)
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(outcome.metrics.items()))
    how = (
        "already registered (same commit, spec and data)" if outcome.reused_version
        else "registered"
    )  # fmt: skip
    console.print(
        f"[green]✓[/] {outcome.model} version [bold]{outcome.version}[/] {how}, "
        f"alias 'candidate'. {metrics}"
    )
    if outcome.serving:
        console.print(
            f"[green]✓[/] it serves {', '.join(outcome.serving)}; see `modelyard history`"
        )
    _print_where(outcome.flow_run_id, outcome)


def _print_where(flow_run_id: str, outcome: PipelineOutcome | None) -> None:
    api = settings().api_url
    prefect_ui = api.removesuffix("/api") if api else "http://127.0.0.1:4200"
    local = "" if api else "  (start the UIs with `modelyard stack up`)"
    console.print(f"Prefect flow run: {prefect_ui}/runs/flow-run/{flow_run_id}{local}")
    if outcome:
        console.print(f"MLflow version:   {outcome.mlflow_version_url}")
        console.print(f"MLflow run:       {outcome.mlflow_run_url}")
    if not settings().tracking_uri.startswith("http"):
        console.print(f"MLflow store:     {settings().tracking_uri}")


@app.command()
def models(
    name: Annotated[str | None, typer.Argument(help="Model name; all models when omitted.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List registered versions with their aliases, gate results and metrics."""
    from modelyard import registry

    client = registry.connect(settings())
    rows: list[dict[str, Any]] = []  # also printed as JSON (--json)
    for info in registry.list_versions(client, name):
        created = datetime.fromtimestamp(info.created / 1000, UTC)
        dirty = "*" if info.tags.get("git_dirty") == "true" else ""
        rows.append({
            "model": info.name,
            "version": info.version,
            "aliases": info.aliases,
            "created": created.strftime("%Y-%m-%d %H:%M"),
            "commit": info.tags.get("git_commit", "")[:8] + dirty,
            "gates": {k.removeprefix("gate."): v for k, v in info.tags.items()
                      if k.startswith("gate.")},
            "metrics": registry.run_metrics(client, info.run_id),
        })  # fmt: skip
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print("no registered versions" + (f" of {name}" if name else ""))
        return
    table = Table(title="registered models")
    for column in ("model", "version", "aliases", "created", "commit", "gates", "metrics"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row["model"], row["version"], ",".join(row["aliases"]), row["created"],
            row["commit"], _gates_cell(row["gates"]),
            "\n".join(f"{k}={v:.4g}" for k, v in sorted(row["metrics"].items())),
        )  # fmt: skip
    console.print(table)


def _gates_cell(gates: dict[str, str]) -> str:
    return "\n".join(f"{'✓' if v == 'passed' else '✗'} {k}" for k, v in sorted(gates.items()))


@app.command()
@reports_errors
def monitor(
    environment: Annotated[
        list[str] | None,
        typer.Option(help="Environment to check (repeatable; default: monitoring.environments)."),
    ] = None,
    spec: SpecOption = Path("modelyard.yaml"),
) -> None:
    """Check drift of the serving version now: PSI against its bundle's reference, recorded
    in MLflow and Prefect, and a retraining run if it drifted (once per cooldown)."""
    from modelyard.outcomes import MonitorOutcome

    loaded = load_spec(spec)
    from flows.monitor import monitor as check

    failed = False
    for env in environment or loaded.monitored_environments:
        state = check(
            loaded.name, env, loaded.monitoring.model_dump(mode="json"), return_state=True
        )
        outcome = state.result(raise_on_failure=False)
        if not state.is_completed() or not isinstance(outcome, MonitorOutcome):
            why = outcome if isinstance(outcome, ModelyardError) else state.message or outcome
            err.print(f"[bold red]error:[/] {loaded.name} {env}: {why}")
            failed = True
            continue
        worst, psi = outcome.worst
        console.print(
            f"{loaded.name} v{outcome.version} in {env}: {outcome.rows} rows, "
            f"worst PSI {psi:.3f} ({worst}); {', '.join(outcome.drifted) or 'no drift'}"
        )
        if outcome.retrain != "none":
            console.print(f"  retraining: {outcome.retrain}: {outcome.retrain_detail}")
    if failed:
        raise typer.Exit(1)


@app.command()
@reports_errors
def rebuild(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="The version to rebuild.")],
    repo: Annotated[
        Path, typer.Option("--repo", help="A git checkout that holds the version's commit.")
    ] = Path("."),
) -> None:
    """Rebuild a version from its recorded commit, data and spec, and prove it matches: the
    same ONNX, the same predictions, or within the spec's parity tolerance. Exit 1 when the
    data changed or the rebuilt model does not match; the outcome is tagged on the version."""
    from modelyard.rebuild import rebuild as run_rebuild
    from modelyard.rebuild import require

    done = run_rebuild(settings(), model, version, repo, progress)
    console.print(f"rebuild of {model} v{version}: {done.outcome}: {done.detail}")
    require(done)
