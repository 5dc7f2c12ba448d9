"""Batch scoring: a file or a table scored by a registered version with the server's own code.

The version's signed bundle is verified (and, if encrypted, opened in memory) as the server
does, every row goes through the server's validation (`serve.codecs`) and ONNX Runtime
session (`serve.runtime`), and no pickle is loaded. Rows go in chunks; each chunk's answers
and rejects are written as a part file, then the chunk is recorded as done in the job's state
(written aside and renamed), so a run killed at any moment resumes at the first chunk not
recorded and rewrites at most that one: no row is lost or written twice. A row the server
would refuse goes to the rejects file with the server's reason; the chunk's other rows are
scored (a refused chunk is halved until the refused rows are alone). The output names the
version and the bundle digest on every row.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from modelyard import readers, screen
from modelyard.atomic import replace_file
from modelyard.config import Settings
from modelyard.errors import ModelyardError
from modelyard.package.build import frame_columns
from modelyard.package.registered import open_registered
from modelyard.serve import codecs
from modelyard.serve.runtime import Runtime
from modelyard.spec import SqlQuery

Progress = Callable[[str], None]
STATE = "state.json"


@dataclass(frozen=True)
class Job:
    model: str
    version: str
    digest: str  # the bundle's
    output: Path
    rejects: Path
    chunk_rows: int = 10_000

    @property
    def parts(self) -> Path:
        return self.output.with_name(self.output.name + ".parts")


@dataclass
class Result:
    rows: int = 0
    scored: int = 0
    rejected: int = 0
    resumed_at: int = 0  # the first chunk this run scored (0: a fresh run)
    chunks: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def read_input(
    source: str, query: str | None = None, password_env: str | None = None
) -> pd.DataFrame:
    """The rows to score: a CSV or Parquet file, an s3:// object, or with `query` the rows a
    SQL query returns from the database `source` names (a SQLAlchemy URL, password from
    `password_env`)."""
    if query:
        return readers.read_sql(SqlQuery(url=source, query=query, password_env=password_env))[0]
    if source.startswith("s3://"):
        return readers.read_s3(source)[0]
    if not source.lower().endswith((".csv", ".parquet")):
        raise ModelyardError(f"--input {source}: give a .csv or .parquet file, an s3:// object, "
                             "or a database URL with --query")  # fmt: skip
    return readers.read_table(Path(source))


def open_version(settings: Settings, model: str, version: str, folder: Path) -> Runtime:
    """The version's bundle, verified (and opened) as the server does, as an ONNX session."""
    return Runtime(open_registered(settings, model, version, folder))


def score(frame: pd.DataFrame, runtime: Runtime, job: Job, progress: Progress) -> Result:
    """Score `frame` in chunks into `job.output` and `job.rejects`, resuming a killed run."""
    _prepare(job)
    frame = _as_read_from_csv(frame.reset_index(drop=True), runtime)  # row number = place
    fingerprint = _fingerprint(frame)
    done = _resume(job, fingerprint)
    chunks = max(1, -(-len(frame) // job.chunk_rows))
    left = [n for n in range(chunks) if n not in done]
    result = Result(rows=len(frame), chunks=chunks, resumed_at=left[0] if left and done else 0)
    if done:
        progress(f"batch: resuming: chunks {sorted(done)} of {chunks} were done")
    for number in range(chunks):
        if number in done:
            continue
        first = number * job.chunk_rows
        chunk = frame.iloc[first : first + job.chunk_rows]
        answers, refused = _score_chunk(chunk, runtime, job)
        _write_table(answers, job.parts / f"scored-{number:06d}.parquet")
        _write_table(refused, job.parts / f"rejects-{number:06d}.parquet")
        done.add(number)
        _save_state(job, fingerprint, done)
        progress(f"batch: chunk {number + 1}/{chunks}: {len(answers)} scored, "
                 f"{len(refused)} rejected")  # fmt: skip
    return _finish(job, result)


def _as_read_from_csv(frame: pd.DataFrame, runtime: Runtime) -> pd.DataFrame:
    """A numeric column pandas read as text (one bad cell makes the whole column text) holds
    numbers again, as the server's CSV route reads them: text that is a number is the number,
    and only the cells that are not stay text, for the validation to refuse."""
    for column in runtime.columns:
        if column.kind == "numeric" and column.name in frame and frame[column.name].dtype == object:
            frame[column.name] = frame[column.name].map(_number_or_text)
    return frame


def _number_or_text(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if value == "":
        return None
    try:
        return float(value)
    except ValueError:
        return value


def _fingerprint(frame: pd.DataFrame) -> str:
    hashed = pd.util.hash_pandas_object(frame, index=True).to_numpy()
    return hashlib.sha256(hashed.tobytes() + ",".join(map(str, frame.columns)).encode()).hexdigest()


def _resume(job: Job, fingerprint: str) -> set[int]:
    """The chunks a killed run finished, when its state is for this input, version and chunk
    size; a fresh start otherwise (what another job left is refused, not overwritten)."""
    path = job.parts / STATE
    if not path.is_file():
        return set()
    state = json.loads(path.read_text())
    same = {"input": fingerprint, "version": job.version, "digest": job.digest,
            "chunk_rows": job.chunk_rows}  # fmt: skip
    differs = [k for k, v in same.items() if state.get(k) != v]
    if differs:
        raise ModelyardError(f"{job.parts} holds a run of another {', '.join(differs)}: delete it "
                             "to start over, or give the same input, version and chunk size "
                             "to resume it")  # fmt: skip
    return set(state.get("done", []))


def _save_state(job: Job, fingerprint: str, done: set[int]) -> None:
    state = {"input": fingerprint, "version": job.version, "digest": job.digest,
             "chunk_rows": job.chunk_rows, "done": sorted(done)}  # fmt: skip
    replace_file(job.parts / STATE, json.dumps(state).encode())


def _score_chunk(
    chunk: pd.DataFrame, runtime: Runtime, job: Job
) -> tuple[pd.DataFrame, pd.DataFrame]:
    scored: list[pd.DataFrame] = []
    refused: list[dict[str, Any]] = []
    for rows, outcome in _outcomes(chunk, runtime):
        if isinstance(outcome, codecs.ClientError):
            refused.append({"row": int(rows.index[0]), "field": outcome.field or "",
                            "reason": outcome.message,
                            "values": json.dumps(frame_columns(rows), default=str)})  # fmt: skip
        else:
            scored.append(_answers(rows, outcome, runtime, job))
    answers = pd.concat(scored) if scored else _answers(chunk.iloc[:0], None, runtime, job)
    return answers, pd.DataFrame(refused, columns=["row", "field", "reason", "values"])


def _outcomes(chunk: pd.DataFrame, runtime: Runtime) -> Iterator[tuple[pd.DataFrame, Any]]:
    """(rows, prediction) for the rows the server's validation accepts, (row, its error) for
    each it refuses. Judged a column at a time (`screen`); a refused row is then put through
    the server's own per-value validation alone, for its reason. A chunk lacking a column the
    model takes goes down the per-value path, which names the column for each row."""
    try:
        feeds, refused = screen.feeds(chunk, runtime.columns)
    except screen.Unjudged:
        yield from _halves(chunk, runtime)
        return
    accepted = ~refused
    if accepted.any():
        yield chunk[accepted], runtime.predict({k: v[accepted] for k, v in feeds.items()})
    for row in np.flatnonzero(refused):
        yield from _halves(chunk.iloc[[row]], runtime)


def _halves(rows: pd.DataFrame, runtime: Runtime) -> Iterator[tuple[pd.DataFrame, Any]]:
    """(rows, prediction) for rows the server's validation accepts, (row, its error) for each
    it refuses: a refused block is halved until the refused rows stand alone."""
    try:
        feeds, _ = codecs.to_feeds(frame_columns(rows), runtime.columns, max_rows=len(rows) + 1)
    except codecs.ClientError as error:
        if len(rows) == 1:
            yield rows, error
            return
        middle = len(rows) // 2
        yield from _halves(rows.iloc[:middle], runtime)
        yield from _halves(rows.iloc[middle:], runtime)
        return
    yield rows, runtime.predict(feeds)


def _answers(rows: pd.DataFrame, prediction: Any, runtime: Runtime, job: Job) -> pd.DataFrame:
    out = pd.DataFrame({"row": rows.index.to_numpy(dtype=np.int64)})
    classes = runtime.classes
    if prediction is None:
        out["prediction"] = pd.Series(dtype=object)
    else:
        values = prediction.values  # labels of a text-labelled model are objects
        out["prediction"] = (
            [_plain(v) for v in values.tolist()] if values.dtype == object else values
        )
        probabilities = prediction.probabilities
        if probabilities is not None and probabilities.ndim == 1:
            out["probability"] = probabilities
        elif probabilities is not None and classes is not None:
            for i, label in enumerate(classes):
                out[f"probability_{label}"] = probabilities[:, i]
    # The same text on every row: one category each, stored once per Parquet column chunk.
    same = np.zeros(len(out), dtype=np.int8)
    out["model_version"] = pd.Categorical.from_codes(same, [job.version])
    out["bundle_digest"] = pd.Categorical.from_codes(same, [job.digest])
    return out


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _finish(job: Job, result: Result) -> Result:
    """Join the parts into the output and rejects files (CSV or Parquet by their names), then
    remove them: the job is done."""
    scored = _joined(sorted(job.parts.glob("scored-*.parquet")))
    refused = _joined(sorted(job.parts.glob("rejects-*.parquet")))
    _write_table(scored, job.output)
    _write_table(refused, job.rejects)
    result.scored, result.rejected = len(scored), len(refused)
    result.reasons = refused["reason"].value_counts().to_dict() if len(refused) else {}
    shutil.rmtree(job.parts)
    return result


def _joined(paths: list[Path]) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in paths]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _write_table(frame: pd.DataFrame, path: Path) -> None:
    """Parquet or CSV by the name, whole or not at all (written aside, then renamed): a part
    file, the output and the rejects alike."""
    buffer = io.BytesIO()
    if path.suffix.lower() == ".parquet":
        frame.to_parquet(buffer, index=False)
    else:
        frame.to_csv(buffer, index=False)
    replace_file(path, buffer.getvalue())


def _prepare(job: Job) -> None:
    """The job's parts folder, where a killed run's progress waits to be resumed."""
    job.parts.mkdir(parents=True, exist_ok=True)
    job.output.parent.mkdir(parents=True, exist_ok=True)
    job.rejects.parent.mkdir(parents=True, exist_ok=True)
