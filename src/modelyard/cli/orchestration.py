"""Commands for runs that start on their own: deployments (pipelines), trigger, worker,
webhook and git hooks. All of them need a Prefect server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from modelyard.cli.common import (
    app,
    console,
    prefect_url,
    progress,
    reports_errors,
    settings,
    usage,
)

if TYPE_CHECKING:
    from modelyard.trigger import TriggeredRun

pipelines_app = typer.Typer(
    help="Prefect deployments of the pipeline, one per model, that pushes trigger.",
    no_args_is_help=True,
)
app.add_typer(pipelines_app, name="pipelines")


@pipelines_app.command("apply")
@reports_errors
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
    from flows import orchestration

    prefect_url()
    applied = orchestration.apply(specs, repository, pool)
    monitors = orchestration.apply_monitors(specs, pool)
    for d in applied:
        console.print(f"[green]✓[/] {d.deployment}: {d.spec_path} of {d.repository}, pool {d.pool}")
    for name in monitors:
        console.print(f"[green]✓[/] {name}: scheduled drift check")


@pipelines_app.command("list")
@reports_errors
def pipelines_list() -> None:
    """The pipeline deployments on the Prefect server."""
    from modelyard.trigger import PrefectApi, deployments

    table = Table(title="pipeline deployments")
    for column in ("deployment", "repository", "spec", "pool"):
        table.add_column(column)
    for d in deployments(PrefectApi(prefect_url(), settings())):
        table.add_row(d.deployment, d.repository, d.spec_path, d.pool)
    console.print(table)


@app.command()
@reports_errors
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

    here = git_info(Path.cwd(), settings())  # CI variables first, then git
    commit, branch = commit or here.commit, branch or here.branch
    if commit == "unknown":
        raise usage("no commit: pass --commit, or run inside the git checkout")
    runs = triggers.trigger(
        settings(), commit, branch, source or _ci_name(), [repository] if repository else None,
        model, key,
    )  # fmt: skip
    ui = (settings().api_url or "").removesuffix("/api")
    for r in runs:
        how = "started" if r.created else "already started by an earlier trigger"
        console.print(
            f"[green]✓[/] {r.model}: run {r.name} {how}: {ui}/runs/flow-run/{r.flow_run_id}"
        )
    if wait and not all([_follow(r) for r in runs]):  # follow every run, even after a failure
        raise typer.Exit(1)


def _follow(run: TriggeredRun) -> bool:
    from flows import orchestration

    console.print(f"[bold]{run.name}[/]")
    state = orchestration.follow(run.flow_run_id, progress).state
    if state is not None and state.is_paused():
        console.print(
            f"[yellow]⏸[/] {run.name} waits for approval: `modelyard approve {run.flow_run_id}` "
            "or the form in the Prefect UI"
        )
        return True
    return state is not None and state.is_completed()


def _ci_name() -> str:
    for variable, name in (("GITHUB_ACTIONS", "github"), ("JENKINS_URL", "jenkins"),
                           ("GITLAB_CI", "gitlab")):  # fmt: skip
        if os.environ.get(variable):
            return name
    return "manual"


@app.command()
@reports_errors
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
    from flows import orchestration

    prefect_url()
    raise typer.Exit(orchestration.run_worker(settings(), pool, name, limit, poll))


@app.command()
@reports_errors
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

    from modelyard.trigger import trigger as start_runs
    from modelyard.webhook import Deliveries, GitHubWebhook, Push

    configured = settings()
    if not configured.webhook_secret:
        raise usage(
            "set MODELYARD_WEBHOOK_SECRET to the secret entered in GitHub's webhook settings; "
            "deliveries cannot be verified without it"
        )
    prefect_url()  # refuse to start without a server to start runs on

    def on_push(push: Push) -> list[str]:
        runs = start_runs(
            configured, push.commit, push.branch, "github", [push.repository, *push.aliases],
            key=f"github:{push.delivery}",
        )  # fmt: skip
        return [r.name for r in runs]

    deliveries = Deliveries(configured.workspace / "webhook" / "deliveries.db")
    secret = configured.webhook_secret.get_secret_value()
    receiver = GitHubWebhook(secret, deliveries, on_push, branch or ["main"])
    console.print(f"GitHub webhook on http://{host}:{port}/hooks/github")
    uvicorn.run(receiver, host=host, port=port, log_level="info", proxy_headers=False)


hooks_app = typer.Typer(help="Git hooks for self-hosted repositories.", no_args_is_help=True)
app.add_typer(hooks_app, name="hooks")
RepoArgument = Annotated[Path, typer.Argument(help="The repository (bare or not) pushed to.")]


@hooks_app.command("install")
@reports_errors
def hooks_install(
    repository: RepoArgument,
    branch: Annotated[
        list[str] | None, typer.Option(help="Branch whose pushes run the pipeline (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a post-receive hook not ours.")] = False,
) -> None:
    """Install the post-receive hook: pushes to the branches start the pipeline deployments."""
    from modelyard import hooks

    hook = hooks.install(settings(), repository, branch or ["main"], force)
    console.print(f"[green]✓[/] {hook}: pushes to {', '.join(branch or ['main'])} trigger runs")


@hooks_app.command("uninstall")
@reports_errors
def hooks_uninstall(repository: RepoArgument) -> None:
    """Remove modelyard's post-receive hook (a hook not ours stays)."""
    from modelyard import hooks

    removed = hooks.uninstall(repository)
    console.print("[green]✓[/] removed" if removed else "no modelyard hook there")
