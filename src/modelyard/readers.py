"""Where a dataset's rows come from: a local CSV/Parquet file, an S3 object, a SQL query.

Each reader returns the table as the source gives it plus a `Source`, a line for lineage tags
that says exactly what was read (an S3 object's version, a query's hash) and never a secret.
Typing the columns and fingerprinting them happen after, in `data`, the same for every source.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pandas as pd

from modelyard.errors import DataError

if TYPE_CHECKING:
    from sqlalchemy import Connection, TextClause

    from modelyard.spec import SqlQuery

log = logging.getLogger(__name__)
PROGRESS_BYTES = 64 * 2**20  # an S3 read logs how far it got every 64 MiB
SQL_CHUNK_ROWS = 100_000  # a query's rows arrive, and are counted in the log, in these chunks


@dataclass(frozen=True)
class Source:
    """What was read, exactly enough to read it again; safe for logs and tags."""

    uri: str
    version: str = ""

    def __str__(self) -> str:
        return f"{self.uri} ({self.version})" if self.version else self.uri


def read_table(path: Path) -> pd.DataFrame:
    """A local CSV or Parquet file as a DataFrame, or a DataError that names the file."""
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read dataset {path}: {exc.strerror}") from exc
    with stream:
        return parse_table(stream, path.name, str(path))


def parse_table(stream: BinaryIO, name: str, where: str) -> pd.DataFrame:
    """CSV or Parquet by the name's suffix. (pandas parses CSV floats exactly, so a CSV and a
    Parquet file of the same table give the same fingerprint; tests/test_data.py checks it.)"""
    try:
        if name.lower().endswith(".parquet"):
            return pd.read_parquet(stream)
        return pd.read_csv(stream)
    except Exception as exc:  # pandas and pyarrow raise many types; the message is what matters
        raise DataError(f"cannot read dataset {where}: {exc}") from exc


def read_s3(uri: str) -> tuple[pd.DataFrame, Source]:
    """An S3 object through boto3's usual chain: credentials, region and endpoint
    (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-compatible store)."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as exc:
        raise DataError(f"reading {uri} needs boto3: pip install 'modelyard[aws]'") from exc
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        answer = boto3.client("s3").get_object(Bucket=bucket, Key=key)
        body = _read_with_progress(answer["Body"], answer.get("ContentLength", 0), uri)
    except ClientError as exc:
        raise DataError(_s3_refusal(uri, exc.response.get("Error", {}))) from exc
    except BotoCoreError as exc:  # no credentials, no endpoint, a dropped connection
        raise DataError(f"cannot read dataset {uri}: {exc}; check the AWS credentials, region "
                        "and endpoint this process sees") from exc  # fmt: skip
    version = answer.get("VersionId") or f"etag {answer.get('ETag', '').strip(chr(34))}"
    frame = parse_table(io.BytesIO(body), key, uri)
    return frame, Source(uri, f"version {version}" if answer.get("VersionId") else version)


def _read_with_progress(body: BinaryIO, size: int, uri: str) -> bytes:
    log.info("reading %s (%.1f MiB)", uri, size / 2**20)
    chunks: list[bytes] = []
    done = 0
    while chunk := body.read(PROGRESS_BYTES):
        chunks.append(chunk)
        done += len(chunk)
        if size > PROGRESS_BYTES:
            log.info("read %.0f of %.0f MiB of %s", done / 2**20, size / 2**20, uri)
    return b"".join(chunks)


def _s3_refusal(uri: str, error: dict[str, str]) -> str:
    code = error.get("Code", "")
    fixes = {
        "NoSuchBucket": "the bucket does not exist: fix dataset.path",
        "NoSuchKey": "no object has that key: fix dataset.path",
        "404": "no object has that key: fix dataset.path",
        "AccessDenied": "access denied: give this process's AWS identity s3:GetObject on it",
        "403": "access denied: give this process's AWS identity s3:GetObject on it",
    }
    return f"cannot read dataset {uri}: " + fixes.get(code, f"{code} {error.get('Message', '')}")


def read_sql(sql: SqlQuery) -> tuple[pd.DataFrame, Source]:
    """The rows of a query, through SQLAlchemy. The password comes from the environment
    variable the spec names and is never logged: error messages are scrubbed of it."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(sql.url)
    password = _password(sql.password_env)
    if password is not None:
        url = url.set(password=password)
    source = Source(sql.url, "query sha256 " + hashlib.sha256(sql.query.encode()).hexdigest()[:16])
    try:
        engine = create_engine(url)
    except Exception as exc:  # NoSuchModuleError: the dialect or its driver is not installed
        raise DataError(
            f"cannot open {sql.url}: {exc}; install the database's driver "
            "(PostgreSQL: pip install 'psycopg[binary]')"
        ) from exc
    try:
        with engine.connect() as connection:
            return _fetch(connection, text(sql.query), sql.url), source
    except DataError:
        raise
    except Exception as exc:  # OperationalError, ProgrammingError: the database's words
        message = _scrub(str(exc).split("\n[SQL:")[0], password)
        raise DataError(f"dataset.sql on {sql.url} failed: {message}") from exc
    finally:
        engine.dispose()


def _password(variable: str | None) -> str | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if value is None:
        raise DataError(
            f"dataset.sql.password_env names {variable}, which is not set in this environment; "
            "set it (a CI secret, a worker's environment) or remove password_env"
        )
    return value


def _fetch(connection: Connection, query: TextClause, where: str) -> pd.DataFrame:
    chunks: list[pd.DataFrame] = []
    for chunk in pd.read_sql_query(query, connection, chunksize=SQL_CHUNK_ROWS):
        chunks.append(chunk)
        log.info("read %d rows from %s", sum(len(c) for c in chunks), where)
    if not chunks:
        return pd.DataFrame()
    return pd.concat(chunks, ignore_index=True)


def _scrub(message: str, secret: str | None) -> str:
    return message.replace(secret, "***") if secret else message
