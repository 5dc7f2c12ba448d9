"""Batch scoring benchmark: `modelyard predict`'s scoring vs `mlflow.pyfunc` `predict`, the same
version on the same rows, side by side in one process on this machine.

The ad-clicks example's version is registered through the real pipeline; 200,000 generated rows
(a CSV file) are scored by modelyard's batch path (the signed bundle verified, every row through
the server's validation and ONNX session, chunks written and recorded as done, the output file
written) and by MLflow's pyfunc flavour (the pickled scikit-learn pipeline, `predict` on the
whole DataFrame, the output written the same way). Each is timed from reading the file to the
written output, best of three. Prints a Markdown table; `--write` replaces the batch section of
docs/benchmarks.md.

Usage: python -m bench.batch [--rows 200000] [--write]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from bench.common import replace_section, stamp
from bench.serving import ad_clicks_rows, train

REPEATS = 3


def _timed(run: Callable[[], int]) -> tuple[float, int]:
    """Best wall time of REPEATS runs, and the rows the last one wrote."""
    best, rows = float("inf"), 0
    for _ in range(REPEATS):
        started = time.perf_counter()
        rows = run()
        best = min(best, time.perf_counter() - started)
    return best, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelyard-bench-batch-") as tmp:
        work = Path(tmp)
        os.environ |= {"MODELYARD_WORKSPACE": str(work / "ws"), "MODELYARD_BUILD_IMAGE": "never"}
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        name, version, _ = train(work / "ws", None)
        frame = ad_clicks_rows(args.rows, 3)
        source = work / "rows.csv"
        frame.to_csv(source, index=False)
        ours = _timed(lambda: _modelyard(name, version, source, work))
        theirs = _timed(lambda: _pyfunc(name, version, source, work))
    text = table(args.rows, ours, theirs)
    print(text)
    if args.write:
        replace_section("batch", text)


def _modelyard(name: str, version: str, source: Path, work: Path) -> int:
    from modelyard import batch, registry
    from modelyard.config import runtime

    settings = runtime()
    tags = registry.connect(settings).get_model_version(name, version).tags
    job = batch.Job(name, version, tags["bundle_digest"], work / "modelyard.parquet",
                    work / "rejects.csv")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        scorer = batch.open_version(settings, name, version, Path(folder))
        result = batch.score(batch.read_input(str(source)), scorer, job, lambda _: None)
    return result.scored


def _pyfunc(name: str, version: str, source: Path, work: Path) -> int:
    import mlflow

    from modelyard.config import runtime

    mlflow.set_tracking_uri(runtime().tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    frame = pd.read_csv(source)
    answers = pd.DataFrame({"prediction": model.predict(frame)})
    answers.to_parquet(work / "pyfunc.parquet", index=False)
    return len(answers)


def table(rows: int, ours: tuple[float, int], theirs: tuple[float, int]) -> str:
    (ours_s, ours_n), (theirs_s, theirs_n) = ours, theirs
    return "\n".join([
        f"{stamp()}; {rows:,} rows of the ad-clicks data from a CSV file, best of {REPEATS}.",
        "",
        "| scorer | seconds | rows/s | rows written |",
        "|---|---|---|---|",
        f"| modelyard batch (bundle verified, server validation, ONNX, chunks recorded) | "
        f"{ours_s:.2f} | {ours_n / ours_s:,.0f} | {ours_n:,} |",
        f"| `mlflow.pyfunc` `predict` (pickled scikit-learn) | {theirs_s:.2f} | "
        f"{theirs_n / theirs_s:,.0f} | {theirs_n:,} |",
        "",
        f"modelyard: {theirs_s / ours_s:.2f}× pyfunc's rows/s.",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
