"""What every command group shares: the app, the consoles, settings read once, one way to turn
a `ModelyardError` into a red line and an exit code."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console

from modelyard.config import Settings, runtime
from modelyard.errors import ModelyardError

app = typer.Typer(
    help="ML CI/CD as code: train, validate, register and ship scikit-learn models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, files) has no width; rich would assume 80 columns and fold tables.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)

SpecOption = Annotated[Path, typer.Option("--spec", "-s", help="Pipeline spec file.")]
EnvArgument = Annotated[str, typer.Argument(help="Environment named in the spec's deploy section.")]

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def settings() -> Settings:
    """The process's settings, read once: a command is one short-lived process."""
    return runtime()


@app.callback()
def _set_up_the_process() -> None:
    """Before any command, once, what the libraries read from the environment only: Prefect's
    server (or the embedded one in the workspace), read when `flows` is first imported (lazily,
    by the commands that run flows), and MLflow's credentials."""
    os.environ.update(settings().orchestrator_env() | settings().mlflow_credentials_env())


def usage(message: str, code: int = 2) -> typer.Exit:
    """A command called wrongly: say how to call it."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def version_number(model: str, version: str) -> str:
    """A version as given on the command line: its number, or @ALIAS for the one it names."""
    if not version.startswith("@"):
        return version
    from modelyard import registry

    number = registry.aliases(registry.connect(settings()), model).get(version[1:])
    if not number:
        raise usage(f"{model} has no alias {version[1:]!r}; see `modelyard models {model}`")
    return number


def fail(exc: ModelyardError) -> typer.Exit:
    return usage(str(exc), exc.exit_code)


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """A `ModelyardError` from anywhere in the command: its message in red, its exit code, no
    traceback (the message names the field and the fix; a traceback would bury it)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except ModelyardError as exc:
            raise fail(exc) from None

    return wrapper


def progress(message: str) -> None:
    console.print(f"  {message}", highlight=False)


def prefect_url() -> str:
    """The Prefect server's API URL; a clear error when none is configured or up."""
    from modelyard.trigger import require_server

    return require_server(settings())
