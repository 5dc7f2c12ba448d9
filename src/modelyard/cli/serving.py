"""`modelyard serve`: a signed bundle behind MLflow's /invocations and the V2 protocol; and
`modelyard predict`: the same code over a file or a table."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from modelyard.cli.common import app, console, reports_errors, settings, usage, version_number


@app.command()
@reports_errors
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
    from modelyard.bundle import MANIFEST, from_tarball
    from modelyard.package import sealing
    from modelyard.package.keys import trusted_keys
    from modelyard.serve.server import ServeConfig

    bundle = _registered_bundle(source) if source.startswith("models:/") else Path(source)
    if bundle.is_file():
        folder = settings().workspace / "serving" / bundle.stem
        bundle = from_tarball(bundle.read_bytes(), folder)
    if not bundle.is_dir():
        raise usage(f"bundle {bundle} is neither a folder nor a .bundle.tar.gz")
    secret = settings().serve_token
    # A KMS-sealed bundle: its data key, unwrapped (MODELYARD_BUNDLE_KEY opens the others).
    manifest = bundle / MANIFEST
    unwrapped = sealing.unwrapped(json.loads(manifest.read_text())) if manifest.is_file() else []
    os.environ.update({
        "MODELYARD_SERVE_HOST": host,
        "MODELYARD_SERVE_PORT": str(port),
        "MODELYARD_TRUSTED_KEYS": trusted_keys(settings()),
        **({"MODELYARD_SERVE_WORKERS": str(workers)} if workers else {}),
        **({"MODELYARD_SERVE_TOKEN": secret.get_secret_value()} if secret else {}),
        **({"MODELYARD_BUNDLE_KEY": sealing.key_text(unwrapped)} if unwrapped else {}),
    })  # fmt: skip
    config = ServeConfig.from_env(bundle)
    console.print(
        f"serving {bundle} on {'https' if config.tls_cert else 'http'}://{host}:{port} "
        f"({config.workers} worker(s), auth {'on' if config.tokens else 'off'})"
    )
    # The server as deployments run it, in a fresh interpreter: workers forked from this process
    # would each carry the CLI's imports (Typer, MLflow, boto3), 593 MB of RSS for a parent and
    # two workers against 197 MB, and 2.3 s to ready against 0.5 s.
    # -P: the folder the command was run from is not put on the path (a `modelyard/` there
    # must not shadow the package).
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-P", "-m", "modelyard.serve", str(bundle)])


def _registered_bundle(uri: str) -> Path:
    """The signed bundle tarball of a registered version (as MLflow's `-m models:/…`): the
    workspace's copy or MLflow's."""
    from modelyard import registry

    name, version, tags = registry.resolve_model_uri(registry.connect(settings()), uri)
    return registry.bundle_archive(settings(), name, version, tags)


@app.command()
@reports_errors
def predict(
    model: Annotated[str, typer.Argument(help="NAME@ALIAS (iris@production) or NAME/VERSION.")],
    input_: Annotated[
        str,
        typer.Option(
            "--input",
            help="A .csv or .parquet file, an s3:// object, or a database URL with --query.",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", help="Where the scores go (.csv/.parquet).")],
    rejects: Annotated[
        Path | None, typer.Option(help="Refused rows and why (default: beside the output).")
    ] = None,
    query: Annotated[str | None, typer.Option(help="A SELECT, with a database URL.")] = None,
    password_env: Annotated[
        str | None, typer.Option(help="Variable holding the database password.")
    ] = None,
    chunk_rows: Annotated[
        int, typer.Option(help="Rows per chunk (the unit of resuming).")
    ] = 10_000,
) -> None:
    """Score a file or a table with a registered version, in chunks, with the server's
    validation and ONNX session; rerun the same command to resume a killed run."""
    from flows.batch import batch_scoring

    name, version = _version_of(model)
    rejected = rejects or output.with_name(f"{output.stem}.rejects.csv")
    result = batch_scoring(name, version, input_, str(output), str(rejected), chunk_rows, query,
                           password_env)  # fmt: skip
    console.print(f"{result['scored']} rows scored by {name} v{version} into {output}; "
                  f"{result['rejected']} refused into {rejected}")  # fmt: skip


def _version_of(ref: str) -> tuple[str, str]:
    """(name, version) of NAME@ALIAS or NAME/VERSION."""
    name, at, alias = ref.partition("@")
    if at:
        return name, version_number(name, "@" + alias)
    name, _, version = ref.rpartition("/")
    if not name or not version.isdigit():
        raise usage(f"{ref}: give NAME@ALIAS or NAME/VERSION")
    return name, version
