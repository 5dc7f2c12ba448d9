"""Batch scoring as a Prefect flow: `modelyard predict` runs it here, a deployment anywhere.
Only wiring: the work is in modelyard.batch; a rerun of a killed flow resumes its job."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import logs
from flows.process import run_settings
from modelyard import batch, registry
from modelyard.lineage import slug

logs.install()


@flow(name="modelyard-batch", log_prints=True)
def batch_scoring(
    model: str,
    version: str,
    source: str,
    output: str,
    rejects: str,
    chunk_rows: int = 10_000,
    query: str | None = None,
    password_env: str | None = None,
) -> dict[str, Any]:
    """Score `source` with `model` `version` into `output`; refused rows into `rejects`."""
    logger = get_run_logger()
    settings = run_settings()
    frame = batch.read_input(source, query, password_env)
    logger.info("batch: %s rows from %s", len(frame), source if not query else "the query")
    tags = registry.connect(settings).get_model_version(model, version).tags
    job = batch.Job(model, version, tags.get("bundle_digest", ""), Path(output), Path(rejects),
                    chunk_rows)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="modelyard-batch-") as folder:
        runtime = batch.open_version(settings, model, version, Path(folder))
        result = batch.score(frame, runtime, job, logger.info)
    create_markdown_artifact(
        markdown=(f"## Batch scoring: {model} v{version}\n\n{result.scored} rows scored into "
                  f"`{output}`, {result.rejected} refused into `{rejects}` "
                  f"({result.chunks} chunks{', resumed' if result.resumed_at else ''}).\n"),
        key=f"{slug(model)}-batch", description=f"{model} v{version}: batch scoring",
    )  # fmt: skip
    return asdict(result)
