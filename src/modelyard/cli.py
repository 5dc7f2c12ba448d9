"""The `modelyard` command: the same operations for people and for CI."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from modelyard.config import Settings, get_settings
from modelyard.errors import ModelyardError, SpecError, disk_full
from modelyard.spec import load_spec

if TYPE_CHECKING:
    from modelyard.deploy.locks import Lock

app = typer.Typer(
    help="ML CI/CD as code: train, validate, register and ship scikit-learn models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, files) has no width; rich would assume 80 columns and fold tables.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)

SpecOption = Annotated[Path, typer.Option("--spec", "-s", help="Pipeline spec file.")]


def _fail(exc: ModelyardError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    return typer.Exit(exc.exit_code)


@app.command("validate-spec")
def validate_spec(spec: SpecOption = Path("modelyard.yaml")) -> None:
    """Check a spec without running anything."""
    try:
        loaded = load_spec(spec)
    except ModelyardError as exc:
        raise _fail(exc) from None
    console.print(
        f"[green]ok[/] {spec}: model [bold]{loaded.name}[/] ({loaded.task}), "
        f"{len(loaded.features)} features, estimator {loaded.estimator.class_}"
    )


@app.command()
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
        raise _fail(SpecError(f"{output} exists; pass --force to replace it, or --output PATH"))
    try:
        drafted = draft(data, target, output.resolve().parent, task, name)
        output.write_text(drafted.to_yaml())
        loaded = load_spec(output)  # what `run` will read must be valid
    except ModelyardError as exc:
        raise _fail(exc) from None
    console.print(
        f"[green]✓[/] wrote {output}: {loaded.task}, {len(loaded.features)} features, "
        f"estimator {loaded.estimator.class_.rpartition('.')[2]}"
    )
    for column, why in drafted.left_out.items():
        console.print(f"  left out {column!r}: {why}")
    for note in drafted.notes:
        console.print(f"  chosen: {note}")
    console.print(f"Next: `modelyard run --spec {output}`")


@app.command()
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
    settings = get_settings()
    try:
        loaded = load_spec(spec)  # fail on a bad spec before starting any server or stage
    except ModelyardError as exc:
        raise _fail(exc) from None
    os.environ.update(settings.orchestrator_env())
    from flows.pipeline import run_tagged  # after the env: Prefect reads settings at import
    from modelyard.lineage import git_info

    git = git_info(spec.resolve().parent, settings)
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
    if state.is_completed() and isinstance(outcome, dict):  # what the flow returns
        _print_success(outcome, settings, flow_run_id)
        if not no_deploy and not loaded.deploy.environments:
            console.print(NOTHING_TO_DEPLOY.format(version=outcome["version"]))
        return
    _print_where(settings, flow_run_id, outcome=None)
    if isinstance(outcome, BaseException) and (full := disk_full(outcome, settings.workspace_dir)):
        raise _fail(full)
    if isinstance(outcome, ModelyardError):
        raise _fail(outcome)
    err.print(f"[bold red]error:[/] pipeline failed: {state.message or outcome}")
    raise typer.Exit(1)


NOTHING_TO_DEPLOY = (
    "The spec has no deploy.environments, so the run stopped after registering: add one "
    "(docs/spec.md, `deploy`) and release this version with `modelyard deploy ENV --version "
    "{version}`."
)


def _print_success(outcome: dict[str, Any], settings: Settings, flow_run_id: str) -> None:
    table = Table(title="stages")
    for column in ("stage", "outcome", "seconds", "cached"):
        table.add_column(column)
    for row in outcome["stages"]:
        table.add_row(
            row["stage"], row["outcome"], f"{row['seconds']:.2f}", "yes" if row["cached"] else ""
        )
    console.print(table)
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(outcome["metrics"].items()))
    how = (
        "already registered (same commit, spec and data)"
        if outcome["reused_version"]
        else "registered"
    )
    console.print(
        f"[green]✓[/] {outcome['model']} version [bold]{outcome['version']}[/] {how}, "
        f"alias 'candidate'. {metrics}"
    )
    serving = [r["environment"] for r in outcome.get("releases", [])]
    if serving:
        console.print(f"[green]✓[/] it serves {', '.join(serving)}; see `modelyard history`")
    _print_where(settings, flow_run_id, outcome)


def _print_where(settings: Settings, flow_run_id: str, outcome: dict[str, Any] | None) -> None:
    api = settings.api_url
    prefect_ui = api.removesuffix("/api") if api else "http://127.0.0.1:4200"
    local = "" if api else "  (start the UIs with `modelyard stack up`)"
    console.print(f"Prefect flow run: {prefect_ui}/runs/flow-run/{flow_run_id}{local}")
    if outcome:
        console.print(f"MLflow version:   {outcome['mlflow_version_url']}")
        console.print(f"MLflow run:       {outcome['mlflow_run_url']}")
    if not settings.tracking_uri.startswith("http"):
        console.print(f"MLflow store:     {settings.tracking_uri}")


@app.command()
def models(
    name: Annotated[str | None, typer.Argument(help="Model name; all models when omitted.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List registered versions with their aliases, gate results and metrics."""
    from modelyard import registry

    client = registry.connect(get_settings())
    rows: list[dict[str, Any]] = []  # also printed as JSON (--json)
    for info in registry.list_versions(client, name):
        rows.append(
            {
                "model": info.name,
                "version": info.version,
                "aliases": info.aliases,
                "created": datetime.fromtimestamp(info.created / 1000, UTC).strftime(
                    "%Y-%m-%d %H:%M"
                ),
                "commit": info.tags.get("git_commit", "")[:8]
                + ("*" if info.tags.get("git_dirty") == "true" else ""),
                "gates": {
                    k.removeprefix("gate."): v
                    for k, v in info.tags.items()
                    if k.startswith("gate.")
                },
                "metrics": registry.run_metrics(client, info.run_id),
            }
        )
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
            row["model"],
            row["version"],
            ",".join(row["aliases"]),
            row["created"],
            row["commit"],
            _gates_cell(row["gates"]),
            "\n".join(f"{k}={v:.4g}" for k, v in sorted(row["metrics"].items())),
        )
    console.print(table)


def _gates_cell(gates: dict[str, str]) -> str:
    return "\n".join(f"{'✓' if v == 'passed' else '✗'} {k}" for k, v in sorted(gates.items()))


EnvArgument = Annotated[str, typer.Argument(help="Environment named in the spec's deploy section.")]


def _progress(message: str) -> None:
    console.print(f"  {message}", highlight=False)


@app.command()
def deploy(
    environment: EnvArgument,
    version: Annotated[
        str | None, typer.Option(help="Version to deploy (default: the 'candidate' alias).")
    ] = None,
    spec: SpecOption = Path("modelyard.yaml"),
) -> None:
    """Roll a registered version out to an environment's hosts (no approval asked)."""
    from modelyard import registry
    from modelyard.deploy import release

    settings = get_settings()
    try:
        loaded = load_spec(spec)
        release.target(loaded, environment)
        chosen = version or registry.aliases(registry.connect(settings), loaded.name).get(
            "candidate"
        )
        if not chosen:
            raise ModelyardError(f"{loaded.name} has no 'candidate' version; pass --version")
        done = release.deploy(settings, loaded, environment, chosen, _progress,
                              lock=_release_lock(settings))  # fmt: skip
    except ModelyardError as exc:
        raise _fail(exc) from None
    console.print(f"[green]✓[/] {done.model} v{done.version} serves {environment}")


def _release_lock(settings: Settings) -> Lock:
    """The lock the pipeline's releases take too, so a person and a run never overlap."""
    from flows.locks import release_lock

    return release_lock(settings)


@app.command()
def rollback(environment: EnvArgument, spec: SpecOption = Path("modelyard.yaml")) -> None:
    """Put the previous good version of an environment back, from the release ledger."""
    from modelyard.deploy import release

    settings = get_settings()
    try:
        done = release.rollback(
            settings, load_spec(spec), environment, _progress, lock=_release_lock(settings)
        )
    except ModelyardError as exc:
        raise _fail(exc) from None
    console.print(
        f"[green]✓[/] {done.model} v{done.version} serves {environment} again "
        f"(rolled back from v{done.previous_version})"
    )


@app.command()
def history(
    model: Annotated[
        str | None, typer.Argument(help="Model name; all models when omitted.")
    ] = None,
    environment: Annotated[str | None, typer.Option("--env", help="Only this environment.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The release ledger: every deploy, promotion, rejection and rollback, newest first."""
    from dataclasses import asdict

    from modelyard.deploy import ledger

    records = ledger.history(get_settings(), model, environment)
    if as_json:
        console.print_json(json.dumps([asdict(r) for r in records]))
        return
    table = Table(title=f"releases of {model or 'all models'}")
    columns = ("when", "model", "env", "action", "version", "from", "outcome", "who", "reason")
    for column in columns:
        table.add_column(column)
    for r in records:
        colour = {"succeeded": "green", "failed": "red"}.get(r.outcome, "yellow")
        table.add_row(
            r.when, r.model, r.environment, r.action, r.version, r.previous_version,
            f"[{colour}]{r.outcome}[/]", r.actor, r.reason[:120],
        )  # fmt: skip
    console.print(table)


RunArgument = Annotated[
    str | None, typer.Argument(help="Prefect flow run id waiting for approval.")
]
CommitOption = Annotated[
    str | None,
    typer.Option(help="Instead of a run id: the runs of this commit waiting for approval."),
]
ModelOption = Annotated[
    list[str] | None, typer.Option(help="With --commit: only this model's run (repeatable).")
]


@app.command()
def approve(
    run_id: RunArgument = None,
    comment: Annotated[str, typer.Option(help="Why; goes to the ledger.")] = "",
    commit: CommitOption = None,
    model: ModelOption = None,
) -> None:
    """Approve a paused run: it deploys its version to the next environment."""
    _answer(_waiting_runs(run_id, commit, model), True, comment)


@app.command()
def reject(
    run_id: RunArgument = None,
    reason: Annotated[str, typer.Option(help="Why; goes to the ledger.")] = "",
    commit: CommitOption = None,
    model: ModelOption = None,
) -> None:
    """Reject a paused run: the next environment keeps what it serves."""
    _answer(_waiting_runs(run_id, commit, model), False, reason)


def _waiting_runs(run_id: str | None, commit: str | None, models: list[str] | None) -> list[str]:
    if bool(run_id) == bool(commit):
        err.print("[bold red]error:[/] name the run: a flow run id, or --commit SHA")
        raise typer.Exit(2)
    if run_id:
        return [run_id]
    waiting = [str(r.id) for r in _orchestration().paused_runs(commit, models)]
    if not waiting:
        err.print(f"[bold red]error:[/] no run of commit {commit} is waiting for approval")
        raise typer.Exit(1)
    return waiting


def _answer(run_ids: list[str], approve: bool, comment: str) -> None:
    from modelyard.deploy.release import actor_name
    from modelyard.registry import signed_in_user

    settings = get_settings()
    os.environ.update(settings.orchestrator_env())
    from flows.pipeline import answer_approval

    try:  # signed in to MLflow: that identity, checked by its server, not a name from settings
        actor = signed_in_user(settings) or actor_name(settings)
    except ModelyardError as exc:
        raise _fail(exc) from None
    verb = "approved" if approve else "rejected"
    for run_id in run_ids:
        try:
            answer_approval(run_id, approve=approve, approver=actor, comment=comment)
        except ModelyardError as exc:
            raise _fail(exc) from None
        console.print(f"[green]✓[/] run {run_id} {verb} by {actor}")


@app.command()
def serve(
    source: Annotated[
        str,
        typer.Argument(
            help="A registered version (models:/NAME/VERSION or models:/NAME@ALIAS), a bundle "
            "folder or a .bundle.tar.gz",
            metavar="MODEL_OR_BUNDLE",
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8080,
    workers: Annotated[int | None, typer.Option(help="Processes (default: one per core).")] = None,
) -> None:
    """Serve a signed model bundle (MLflow /invocations and Open Inference Protocol V2)."""
    from modelyard.bundle import from_tarball
    from modelyard.package.build import trusted_keys
    from modelyard.serve.server import ServeConfig
    from modelyard.serve.server import serve as run_server

    settings = get_settings()
    bundle = Path(source)
    if source.startswith("models:/"):  # the registry's bundle of that version, as MLflow's -m
        try:
            bundle = _registered_bundle(settings, source)
        except ModelyardError as exc:
            raise _fail(exc) from None
    if bundle.is_file():
        bundle = from_tarball(bundle.read_bytes(), settings.workspace_dir / "serving" / bundle.stem)
    if not bundle.is_dir():
        err.print(f"[bold red]error:[/] bundle {bundle} is neither a folder nor a .bundle.tar.gz")
        raise typer.Exit(2)
    token = settings.serve_token.get_secret_value() if settings.serve_token else None
    config = ServeConfig.from_env(
        bundle,
        host=host,
        port=port,
        workers=workers,
        trusted_keys=trusted_keys(settings),
        tokens=token.split(",") if token else None,
    )
    console.print(
        f"serving {bundle} on http://{host}:{port} "
        f"({config.workers} worker(s), auth {'on' if config.tokens else 'off'})"
    )
    raise typer.Exit(run_server(config))


def _registered_bundle(settings: Settings, uri: str) -> Path:
    """The signed bundle tarball of a registered version: the workspace's copy or MLflow's."""
    from modelyard import registry

    name, version, tags = registry.resolve_model_uri(registry.connect(settings), uri)
    return registry.bundle_archive(settings, name, version, tags)


@app.command()
def monitor(
    environment: Annotated[
        list[str] | None,
        typer.Option(help="Environment to check (repeatable; default: monitoring.environments)."),
    ] = None,
    spec: SpecOption = Path("modelyard.yaml"),
) -> None:
    """Check drift of the serving version now: PSI against its bundle's reference, recorded
    in MLflow and Prefect, and a retraining run if it drifted (once per cooldown)."""
    settings = get_settings()
    try:
        loaded = load_spec(spec)
    except ModelyardError as exc:
        raise _fail(exc) from None
    os.environ.update(settings.orchestrator_env())
    from flows.monitor import monitor as check  # after the env: Prefect reads it at import

    failed = False
    for env in environment or loaded.monitored_environments:
        state = check(
            loaded.name, env, loaded.monitoring.model_dump(mode="json"), return_state=True
        )
        outcome = state.result(raise_on_failure=False)
        if not state.is_completed() or not isinstance(outcome, dict):
            why = outcome if isinstance(outcome, ModelyardError) else state.message or outcome
            err.print(f"[bold red]error:[/] {loaded.name} {env}: {why}")
            failed = True
            continue
        verdict = ", ".join(outcome["drifted"]) or "no drift"
        worst = max(outcome["psi"].items(), key=lambda kv: kv[1], default=("-", 0.0))
        console.print(
            f"{loaded.name} v{outcome['version']} in {env}: {outcome['rows']} rows, "
            f"worst PSI {worst[1]:.3f} ({worst[0]}); {verdict}"
        )
        if outcome["retrain"] != "none":
            console.print(f"  retraining: {outcome['retrain']}: {outcome['retrain_detail']}")
    if failed:
        raise typer.Exit(1)


pipelines_app = typer.Typer(
    help="Prefect deployments of the pipeline, one per model, that pushes trigger.",
    no_args_is_help=True,
)
app.add_typer(pipelines_app, name="pipelines")


def _orchestration() -> Any:
    """flows.orchestration with Prefect pointed at the configured server (or an error)."""
    settings = get_settings()
    os.environ.update(settings.orchestrator_env())
    from flows import orchestration  # after the env: Prefect reads its settings at import

    _prefect_url()
    return orchestration


@pipelines_app.command("apply")
def pipelines_apply(
    specs: Annotated[list[Path], typer.Argument(help="Spec files, each committed to git.")],
    repository: Annotated[
        str | None,
        typer.Option(
            help="URL or path workers clone (default: the checkout's origin, else its path)."
        ),
    ] = None,
    pool: Annotated[str, typer.Option(help="Prefect work pool (process type).")] = "modelyard",
) -> None:
    """Create or update the deployment of each spec's pipeline."""
    orchestration = _orchestration()
    try:
        applied = orchestration.apply(specs, repository, pool)
        monitors = orchestration.apply_monitors(specs, pool)
    except ModelyardError as exc:
        raise _fail(exc) from None
    for d in applied:
        console.print(f"[green]✓[/] {d.deployment}: {d.spec_path} of {d.repository}, pool {d.pool}")
    for name in monitors:
        console.print(f"[green]✓[/] {name}: scheduled drift check")


@pipelines_app.command("list")
def pipelines_list() -> None:
    """The pipeline deployments on the Prefect server."""
    from modelyard.trigger import PrefectApi, deployments

    table = Table(title="pipeline deployments")
    for column in ("deployment", "repository", "spec", "pool"):
        table.add_column(column)
    try:
        found = deployments(PrefectApi(_prefect_url(), get_settings()))
    except ModelyardError as exc:
        raise _fail(exc) from None
    for d in found:
        table.add_row(d.deployment, d.repository, d.spec_path, d.pool)
    console.print(table)


def _prefect_url() -> str:
    from modelyard.trigger import require_server

    try:
        return require_server(get_settings())
    except ModelyardError as exc:
        raise _fail(exc) from None


@app.command()
def trigger(
    commit: Annotated[str | None, typer.Option(help="Commit to train (default: HEAD).")] = None,
    branch: Annotated[
        str | None, typer.Option(help="Its branch (default: the current one).")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="Where the push came from (default: the CI, else manual).")
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option(help="Only this model's pipeline (repeatable).")
    ] = None,
    repository: Annotated[
        str | None, typer.Option(help="Only the pipelines of this repository.")
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="Idempotency key: a second trigger with it starts nothing.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the runs; exit 1 if one fails.")
    ] = False,
) -> None:
    """Start the pipeline deployments for a commit (what CI and git hooks call)."""
    from modelyard import trigger as triggers  # REST only: a push waits on this command
    from modelyard.lineage import git_info

    here = git_info(Path.cwd(), get_settings())  # CI variables first, then git
    commit, branch = commit or here.commit, branch or here.branch
    if commit == "unknown":
        err.print("[bold red]error:[/] no commit: pass --commit, or run inside the git checkout")
        raise typer.Exit(2)
    source = source or _ci_name()
    try:
        runs = triggers.trigger(
            get_settings(), commit, branch, source, [repository] if repository else None,
            model, key,
        )  # fmt: skip
    except ModelyardError as exc:
        raise _fail(exc) from None
    settings = get_settings()
    ui = (settings.api_url or "").removesuffix("/api")
    for r in runs:
        how = "started" if r.created else "already started by an earlier trigger"
        console.print(
            f"[green]✓[/] {r.model}: run {r.name} {how}: {ui}/runs/flow-run/{r.flow_run_id}"
        )
    if wait:
        orchestration = _orchestration()
        failed = [r for r in runs if not _follow(orchestration, r)]
        if failed:
            raise typer.Exit(1)


def _follow(orchestration: Any, run: Any) -> bool:
    console.print(f"[bold]{run.name}[/]")
    final = orchestration.follow(run.flow_run_id, _progress)
    if final.state.is_paused():
        console.print(
            f"[yellow]⏸[/] {run.name} waits for approval: `modelyard approve {run.flow_run_id}` "
            "or the form in the Prefect UI"
        )
        return True
    return bool(final.state.is_completed())


def _ci_name() -> str:
    for variable, name in (("GITHUB_ACTIONS", "github"), ("JENKINS_URL", "jenkins"),
                           ("GITLAB_CI", "gitlab")):  # fmt: skip
        if os.environ.get(variable):
            return name
    return "manual"


@app.command()
def worker(
    pool: Annotated[str, typer.Option(help="Work pool to serve.")] = "modelyard",
    name: Annotated[str | None, typer.Option(help="Worker name (default: Prefect's).")] = None,
    limit: Annotated[
        int | None, typer.Option(help="Most flow runs at once (default: no limit).")
    ] = None,
    poll: Annotated[
        float, typer.Option(help="Seconds between looks for queued runs (Prefect's is 10).")
    ] = 1.0,
) -> None:
    """Run pipeline flow runs from the work pool; start one per machine to scale out."""
    orchestration = _orchestration()
    raise typer.Exit(orchestration.run_worker(get_settings(), pool, name, limit, poll))


@app.command()
def webhook(
    host: Annotated[str, typer.Option(help="Address to bind (TLS: a proxy in front).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8765,
    branch: Annotated[
        list[str] | None, typer.Option(help="Branch whose pushes run the pipeline (repeatable).")
    ] = None,
) -> None:
    """Receive GitHub push events at /hooks/github; each verified delivery starts one run."""
    import uvicorn

    from modelyard.webhook import Deliveries, GitHubWebhook, Push

    settings = get_settings()
    if not settings.webhook_secret:
        err.print(
            "[bold red]error:[/] set MODELYARD_WEBHOOK_SECRET to the secret entered in GitHub's "
            "webhook settings; deliveries cannot be verified without it"
        )
        raise typer.Exit(2)
    from modelyard.trigger import trigger as start_runs

    _prefect_url()  # refuse to start without a server to start runs on

    def on_push(push: Push) -> list[str]:
        runs = start_runs(
            settings, push.commit, push.branch, "github", [push.repository, *push.aliases],
            key=f"github:{push.delivery}",
        )  # fmt: skip
        return [r.name for r in runs]

    deliveries = Deliveries(settings.workspace_dir / "webhook" / "deliveries.db")
    secret = settings.webhook_secret.get_secret_value()
    receiver = GitHubWebhook(secret, deliveries, on_push, branch or ["main"])
    console.print(f"GitHub webhook on http://{host}:{port}/hooks/github")
    uvicorn.run(receiver, host=host, port=port, log_level="info", proxy_headers=False)


hooks_app = typer.Typer(help="Git hooks for self-hosted repositories.", no_args_is_help=True)
app.add_typer(hooks_app, name="hooks")
RepoArgument = Annotated[Path, typer.Argument(help="The repository (bare or not) pushed to.")]


@hooks_app.command("install")
def hooks_install(
    repository: RepoArgument,
    branch: Annotated[
        list[str] | None, typer.Option(help="Branch whose pushes run the pipeline (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a post-receive hook not ours.")] = False,
) -> None:
    """Install the post-receive hook: pushes to the branches start the pipeline deployments."""
    from modelyard import hooks

    try:
        hook = hooks.install(get_settings(), repository, branch or ["main"], force)
    except ModelyardError as exc:
        raise _fail(exc) from None
    console.print(f"[green]✓[/] {hook}: pushes to {', '.join(branch or ['main'])} trigger runs")


@hooks_app.command("uninstall")
def hooks_uninstall(repository: RepoArgument) -> None:
    """Remove modelyard's post-receive hook (a hook not ours stays)."""
    from modelyard import hooks

    try:
        removed = hooks.uninstall(repository)
    except ModelyardError as exc:
        raise _fail(exc) from None
    console.print("[green]✓[/] removed" if removed else "no modelyard hook there")


stack_app = typer.Typer(
    help="The local servers: Prefect, MLflow, a Docker registry and Prometheus on 127.0.0.1.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")
ServicesArgument = Annotated[
    list[str] | None,
    typer.Argument(
        help="prefect, mlflow, registry, prometheus (default: all).", show_default=False
    ),
]


@stack_app.command("up")
def stack_up(services: ServicesArgument = None) -> None:
    """Start the stack (what is already up stays), wait until each server answers."""
    from modelyard import stack

    try:
        stack.up(get_settings(), services, _progress)
    except ModelyardError as exc:
        raise _fail(exc) from None
    _print_stack(stack.status(get_settings()))


@stack_app.command("down")
def stack_down(services: ServicesArgument = None) -> None:
    """Stop the stack's servers; their data stays in the workspace."""
    from modelyard import stack

    try:
        stack.down(get_settings(), services, _progress)
    except ModelyardError as exc:
        raise _fail(exc) from None


@stack_app.command("status")
def stack_status() -> None:
    """What is up and what is not; exits 1 when any server is down."""
    from modelyard import stack

    statuses = stack.status(get_settings())
    _print_stack(statuses)
    if not all(s.up for s in statuses):
        raise typer.Exit(1)


def _print_stack(statuses: list[Any]) -> None:
    table = Table(title="modelyard stack")
    for column in ("service", "url", "state", "pid"):
        table.add_column(column)
    for s in statuses:
        state = "[green]up[/]" if s.up else f"[red]down[/] {s.detail}"
        table.add_row(s.name, s.url, state, str(s.pid or ""))
    console.print(table)
    settings = get_settings()
    if any(s.up for s in statuses):
        console.print(f"Prefect UI: {settings.api_url or 'not running'}".replace("/api", ""))
        console.print(f"MLflow UI:  {settings.tracking_uri}")


@app.command()
def doctor(
    models: Annotated[
        list[str] | None, typer.Argument(help="Models to examine (default: the spec's).")
    ] = None,
    spec: SpecOption = Path("modelyard.yaml"),
    fix: Annotated[bool, typer.Option("--fix", help="Repair what is found.")] = False,
) -> None:
    """Find half-finished operations (a version never packaged, an alias the ledger disagrees
    with) and, with --fix, repair them; exit 1 when something is left to fix."""
    from modelyard import doctor as checks
    from modelyard.deploy.release import actor_name

    settings = get_settings()
    try:
        names = models or [load_spec(spec).name]
        findings = [f for name in names for f in checks.examine(settings, name)]
        healthy, repaired = not findings, set()
        while findings:
            for finding in findings:
                console.print(f"[yellow]![/] {finding.problem}\n  fix: {finding.fix}")
            if not fix:
                err.print("run `modelyard doctor --fix` to repair")
                raise typer.Exit(1)
            if any(f.problem in repaired for f in findings):
                raise ModelyardError("a repair did not hold; see `modelyard history`")
            for finding in findings:
                checks.repair(settings, finding, actor_name(settings))
                repaired.add(finding.problem)
                console.print(f"  [green]repaired[/] {finding.fix} (recorded in the ledger)")
            # A repair can uncover the next problem (see modelyard.doctor.examine).
            findings = [f for name in names for f in checks.examine(settings, name)]
    except ModelyardError as exc:
        raise _fail(exc) from None
    if healthy:
        console.print(f"[green]✓[/] nothing half-finished for {', '.join(names)}")


aws_app = typer.Typer(help="The AWS target: EC2 hosts found by tags.", no_args_is_help=True)
app.add_typer(aws_app, name="aws")


@aws_app.command("plan")
def aws_plan(
    environment: EnvArgument,
    spec: SpecOption = Path("modelyard.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Which EC2 instances a deploy to ENVIRONMENT would touch (changes nothing)."""
    from modelyard.deploy import aws

    settings = get_settings()
    try:
        loaded = load_spec(spec)
        if loaded.deploy.environments.get(environment) is None or (
            loaded.deploy.environments[environment].target != "aws"
        ):
            raise ModelyardError(
                f"deploy.environments.{environment}: not an aws environment of {loaded.name}"
            )
        # Progress to stderr: with --json, stdout carries the JSON alone.
        hosts = aws.plan(settings, loaded, environment, lambda m: err.print(f"  {m}"))
    except ModelyardError as exc:
        raise _fail(exc) from None
    if as_json:
        print(aws.describe(hosts))
        return
    table = Table(title=f"{loaded.name} → {environment}: {len(hosts)} host(s)")
    for column in ("instance", "address", "type", "zone", "Name"):
        table.add_column(column)
    for h in hosts:
        table.add_row(h.name, h.address, h.instance_type, h.zone, h.tags.get("Name", ""))
    console.print(table)
    if not hosts:
        err.print(
            f"[yellow]no running instance is tagged modelyard:model={loaded.name} and "
            f"modelyard:environment={environment}[/]"
        )


@aws_app.command("collection")
def aws_collection() -> None:
    """Install the amazon.aws Ansible collection the EC2 inventory needs (once)."""
    from modelyard.deploy.collections import AMAZON_AWS, ensure_amazon_aws

    try:
        path = ensure_amazon_aws(get_settings(), _progress)
    except ModelyardError as exc:
        raise _fail(exc) from None
    console.print(f"[green]✓[/] amazon.aws {AMAZON_AWS} in {path}")


if __name__ == "__main__":  # last: `python -m modelyard.cli` must see every command
    app()
