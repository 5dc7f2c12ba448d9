"""Commands for whoever runs the machines: the local stack, the doctor, the AWS target."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from modelyard.cli.common import (
    EnvArgument,
    SpecOption,
    app,
    console,
    err,
    progress,
    reports_errors,
    settings,
)
from modelyard.spec import load_spec

if TYPE_CHECKING:
    from modelyard.doctor import Finding
    from modelyard.stack import Status

stack_app = typer.Typer(
    help="The local servers: Prefect, MLflow, a Docker registry and Prometheus on 127.0.0.1.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")
ServicesArgument = Annotated[
    list[str] | None,
    typer.Argument(
        help="prefect, mlflow, registry, prometheus, alertmanager (default: all).",
        show_default=False,
    ),
]


@stack_app.command("up")
@reports_errors
def stack_up(services: ServicesArgument = None) -> None:
    """Start the stack (what is already up stays), wait until each server answers."""
    from modelyard import stack

    stack.up(settings(), services, progress)
    _print_stack(stack.status(settings()))


@stack_app.command("down")
@reports_errors
def stack_down(services: ServicesArgument = None) -> None:
    """Stop the stack's servers; their data stays in the workspace."""
    from modelyard import stack

    stack.down(settings(), services, progress)


@stack_app.command("status")
def stack_status() -> None:
    """What is up and what is not; exits 1 when any server is down."""
    from modelyard import stack

    statuses = stack.status(settings())
    _print_stack(statuses)
    if not all(s.up for s in statuses):
        raise typer.Exit(1)


def _print_stack(statuses: list[Status]) -> None:
    table = Table(title="modelyard stack")
    for column in ("service", "url", "state", "pid"):
        table.add_column(column)
    for s in statuses:
        state = "[green]up[/]" if s.up else f"[red]down[/] {s.detail}"
        table.add_row(s.name, s.url, state, str(s.pid or ""))
    console.print(table)
    # From the statuses, not the settings: `stack up` starts what this process found not running.
    up = {s.name: s.url for s in statuses if s.up}
    if up:
        console.print(f"Prefect UI: {up.get('prefect') or settings().api_url or 'not running'}")
        console.print(f"MLflow UI:  {up.get('mlflow') or settings().tracking_uri}")


@app.command()
@reports_errors
def doctor(
    models: Annotated[
        list[str] | None, typer.Argument(help="Models to examine (default: the spec's).")
    ] = None,
    spec: SpecOption = Path("modelyard.yaml"),
    fix: Annotated[bool, typer.Option("--fix", help="Repair what is found.")] = False,
) -> None:
    """Find half-finished operations (a version never packaged, an alias the ledger disagrees
    with) and, with --fix, repair them; check the release ledger's chains; exit 1 when
    something is left to fix."""
    from modelyard import doctor as checks
    from modelyard.deploy.release import actor_name

    names = models or [load_spec(spec).name]
    # A ledger edited behind modelyard's back stops the doctor: its repairs follow the ledger.
    tampered = [problem for name in names for problem in checks.ledger_breaks(settings(), name)]
    for problem in tampered:
        console.print(
            f"[red]✗[/] {problem}\n  fix: none here (`modelyard history --verify` "
            "lists every break): restore them from the MLflow store's backup"
        )
    if tampered:
        raise typer.Exit(1)
    if fix:
        healthy = checks.repair_all(settings(), names, actor_name(settings()), _report)
    else:
        findings = [f for name in names for f in checks.examine(settings(), name)]
        for finding in findings:
            _report(finding, repaired=False)
        if findings:
            err.print("run `modelyard doctor --fix` to repair")
            raise typer.Exit(1)
        healthy = True
    if healthy:
        console.print(f"[green]✓[/] nothing half-finished for {', '.join(names)}")


def _report(finding: Finding, repaired: bool) -> None:
    if repaired:
        console.print(f"  [green]repaired[/] {finding.fix} (recorded in the ledger)")
    else:
        console.print(f"[yellow]![/] {finding.problem}\n  fix: {finding.fix}")


aws_app = typer.Typer(help="The AWS target: EC2 hosts found by tags.", no_args_is_help=True)
app.add_typer(aws_app, name="aws")


@aws_app.command("plan")
@reports_errors
def aws_plan(
    environment: EnvArgument,
    spec: SpecOption = Path("modelyard.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Which EC2 instances a deploy to ENVIRONMENT would touch (changes nothing)."""
    from modelyard.deploy import aws

    loaded = load_spec(spec)
    # Progress to stderr: with --json, stdout carries the JSON alone.
    hosts = aws.plan(settings(), loaded, environment, lambda m: err.print(f"  {m}"))
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
@reports_errors
def aws_collection() -> None:
    """Install the amazon.aws Ansible collection the EC2 inventory needs (once)."""
    from modelyard.deploy.collections import AMAZON_AWS, ensure_amazon_aws

    path = ensure_amazon_aws(settings(), progress)
    console.print(f"[green]✓[/] amazon.aws {AMAZON_AWS} in {path}")
