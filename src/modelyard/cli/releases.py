"""Commands that move what serves, or answer a run that waits to: deploy, rollback, approve,
reject, and the ledger they write (history)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from modelyard.cli.common import (
    EnvArgument,
    SpecOption,
    app,
    console,
    prefect_url,
    progress,
    reports_errors,
    settings,
    usage,
    version_number,
)
from modelyard.spec import load_spec

if TYPE_CHECKING:
    from modelyard.deploy.chain import Break
    from modelyard.deploy.locks import Lock
    from modelyard.rollout import Request


VERIFY_HELP = (
    "Check each model and environment's chain of records instead of listing them; "
    "exit 1 naming the first record edited, deleted or reordered."
)


@app.command()
@reports_errors
def deploy(
    environment: EnvArgument,
    version: Annotated[
        str | None, typer.Option(help="Version to deploy (default: the 'candidate' alias).")
    ] = None,
    spec: SpecOption = Path("modelyard.yaml"),
) -> None:
    """Roll a registered version out to an environment's hosts (no approval asked)."""
    from modelyard.deploy import progressive, release

    loaded = load_spec(spec)
    release.target(loaded, environment)  # a wrong environment fails before MLflow is asked
    chosen = release.version_to_deploy(settings(), loaded, version)
    done = progressive.deploy(settings(), loaded, environment, chosen, progress,
                              lock=_release_lock())  # fmt: skip
    console.print(f"[green]✓[/] {done.model} v{done.version} serves {environment}")


def _release_lock() -> Lock:
    """The lock the pipeline's releases take too, so a person and a run never overlap."""
    from flows.locks import release_lock

    return release_lock(settings())


@app.command()
@reports_errors
def rollback(environment: EnvArgument, spec: SpecOption = Path("modelyard.yaml")) -> None:
    """Put the previous good version of an environment back, from the release ledger."""
    from modelyard.deploy import release

    done = release.rollback(settings(), load_spec(spec), environment, progress,
                            lock=_release_lock())  # fmt: skip
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
    verify: Annotated[bool, typer.Option("--verify", help=VERIFY_HELP)] = False,
) -> None:
    """The release ledger: every deploy, promotion, rejection and rollback, newest first."""
    from modelyard.deploy import ledger

    if verify:
        _verify_ledger(model, environment, as_json)
        return
    records = ledger.history(settings(), model, environment)
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


@app.command()
@reports_errors
def card(
    model: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="A version number, or @ALIAS (@production).")],
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write the card as an HTML page here.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The card's facts as JSON.")] = False,
) -> None:
    """A version's model card: intended use, data, metrics with intervals, slices, behaviour,
    the champion comparison, importance, parity, lineage, releases and drift checks, read
    from MLflow and the release ledger as they are now."""
    from modelyard.deploy import card as cards

    made = cards.gather(settings(), model, version_number(model, version))
    if html is not None:
        html.write_text(cards.to_html(made))
    if as_json:
        console.print_json(json.dumps(made.to_dict(), default=str))
    else:
        typer.echo(cards.markdown(made))


def _verify_ledger(model: str | None, environment: str | None, as_json: bool) -> None:
    from modelyard.deploy import ledger

    chains = ledger.verify(settings(), model, environment)
    if as_json:
        console.print_json(json.dumps([
            {"model": m, "environment": e, "intact": not breaks,
             "breaks": [b.describe() for b in breaks]} for (m, e), breaks in chains.items()
        ]))  # fmt: skip
    else:
        for (name, env), breaks in chains.items():
            console.print(_chain_verdict(name, env, breaks))
        if not chains:
            console.print(f"no release records for {model or 'any model'}")
    if any(chains.values()):
        raise typer.Exit(1)


def _chain_verdict(model: str, environment: str, breaks: list[Break]) -> str:
    if not breaks:
        return f"[green]✓[/] {model} → {environment}: chain intact"
    lines = [f"[red]✗[/] {model} → {environment}: first break: {breaks[0].describe()}"]
    return "\n".join(lines + [f"  then: {b.describe()}" for b in breaks[1:]])


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
@reports_errors
def approve(
    run_id: RunArgument = None,
    comment: Annotated[str, typer.Option(help="Why; goes to the ledger.")] = "",
    commit: CommitOption = None,
    model: ModelOption = None,
) -> None:
    """Approve a paused run: it deploys its version to the next environment."""
    _answer(_waiting_runs(run_id, commit, model), True, comment)


@app.command()
@reports_errors
def reject(
    run_id: RunArgument = None,
    reason: Annotated[str, typer.Option(help="Why; goes to the ledger.")] = "",
    commit: CommitOption = None,
    model: ModelOption = None,
) -> None:
    """Reject a paused run: the next environment keeps what it serves."""
    _answer(_waiting_runs(run_id, commit, model), False, reason)


def _waiting_runs(run_id: str | None, commit: str | None, models: list[str] | None) -> list[str]:
    if run_id and not commit:
        return [run_id]
    if not commit or run_id:
        raise usage("name the run: a flow run id, or --commit SHA")
    from flows import orchestration

    prefect_url()
    waiting = [str(r.id) for r in orchestration.paused_runs(commit, models)]
    if not waiting:
        raise usage(f"no run of commit {commit} is waiting for approval", code=1)
    return waiting


def _answer(run_ids: list[str], approve: bool, comment: str) -> None:
    from flows.pipeline import answer_approval
    from modelyard.deploy.release import actor_name
    from modelyard.registry import signed_in_user

    # Signed in to MLflow: that identity, checked by its server, not a name from settings.
    actor = signed_in_user(settings()) or actor_name(settings())
    verb = "approved" if approve else "rejected"
    for run_id in run_ids:
        answer_approval(run_id, approve=approve, approver=actor, comment=comment)
        console.print(f"[green]✓[/] run {run_id} {verb} by {actor}")


rollout_app = typer.Typer(
    help="A canary that is walking its steps: where it is, and promote or abort it now.",
    no_args_is_help=True,
)
app.add_typer(rollout_app, name="rollout")


@rollout_app.command("status")
@reports_errors
def rollout_status(
    environment: EnvArgument,
    spec: SpecOption = Path("modelyard.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The canary's share of traffic (or the shadow's of copies), its step and the last
    window's checks."""
    from modelyard.deploy import progressive

    loaded = load_spec(spec)
    state = progressive.status(settings(), loaded.name, environment)
    if state is None:
        console.print(f"no canary or shadow of {loaded.name} runs in {environment}")
        return
    if as_json:
        console.print_json(json.dumps(state))
        return
    done = len(state["analyses"])
    if state.get("kind") == "shadow":
        share = (f"v{state['baseline']} answers every request, v{state['version']} gets copies "
                 f"of {state['copied']:.0%} of them (duration {state['bake']} s")  # fmt: skip
    else:
        percent = state["percent"]
        share = (f"{percent} % on v{state['version']}, {100 - percent} % on v{state['baseline']} "
                 f"(steps {state['steps']}, bake {state['bake']} s")  # fmt: skip
    console.print(f"{state.get('kind', 'canary')} of {state['model']} v{state['version']} in "
                  f"{environment}: {share}, {done} window(s) judged)")  # fmt: skip
    if done:
        last = state["analyses"][-1]
        table = Table(title=f"{last['stage']}: {last['outcome']}")
        for column in ("check", "value", "threshold", "verdict"):
            table.add_column(column)
        for check in last["checks"]:
            verdict = {True: "[green]ok[/]", False: "[red]failed[/]"}.get(
                check["passed"], "[yellow]inconclusive[/]"
            )
            value = "n/a" if check["value"] is None else f"{check['value']:.4g}"
            table.add_row(check["metric"], value, f"{check['threshold']:g}", verdict)
        console.print(table)


def _ask(environment: str, spec: Path, request: Request) -> None:
    from modelyard.deploy import progressive

    loaded = load_spec(spec)
    done = progressive.ask(settings(), loaded, environment, request, progress, _release_lock())
    console.print(f"[green]✓[/] {loaded.name} in {environment}: {done}")


@rollout_app.command("promote")
@reports_errors
def rollout_promote(environment: EnvArgument, spec: SpecOption = Path("modelyard.yaml")) -> None:
    """Skip the remaining steps: all traffic to the canary, which becomes the live version
    (also after the walk's process died)."""
    _ask(environment, spec, "promote")


@rollout_app.command("abort")
@reports_errors
def rollout_abort(environment: EnvArgument, spec: SpecOption = Path("modelyard.yaml")) -> None:
    """Roll back now: all traffic to the baseline, the canary stopped, the alias unmoved."""
    _ask(environment, spec, "abort")
