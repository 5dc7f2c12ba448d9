"""Dataset sources that need a server: S3 objects (moto in server mode, on loopback) and SQL
queries on a real PostgreSQL (Debian's). The same table from either gives the same rows, and so
the same fingerprint, as from a file; what was read is recorded without a secret."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator

import boto3
import pandas as pd
import pytest
from sqlalchemy import create_engine

from modelyard.data import fingerprint, load_with_source
from modelyard.errors import DataError
from tests.conftest import Postgres
from tests.sources import expected_fingerprint, spec_reading, table

# Every test here needs a server: `make check` need not even import the module.
pytestmark = pytest.mark.integration

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


@pytest.fixture
def s3(moto: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[object, str]]:
    """A client and a fresh bucket; the process's AWS chain points at moto as a user's would
    point at S3 (AWS_ENDPOINT_URL_S3)."""
    for name, value in (AWS | {"AWS_ENDPOINT_URL_S3": moto}).items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3")
    bucket = f"datasets-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    yield client, bucket


def as_bytes(frame: pd.DataFrame, kind: str) -> bytes:
    buffer = io.BytesIO()
    if kind == "parquet":
        frame.to_parquet(buffer, index=False)
    else:
        frame.to_csv(buffer, index=False)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_an_s3_object_gives_the_files_rows_and_records_its_version(s3, kind) -> None:
    client, bucket = s3
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    key = f"churn/2026-11/user rows.{kind}"  # a space in the key, as people name files
    frame = table()
    version = client.put_object(Bucket=bucket, Key=key, Body=as_bytes(frame, kind))["VersionId"]
    spec = spec_reading({"path": f"s3://{bucket}/{key}"})
    loaded, source = load_with_source(spec)
    assert fingerprint(loaded) == expected_fingerprint(frame)
    assert str(source) == f"s3://{bucket}/{key} (version {version})"

    # New rows under the same key: another version, another fingerprint.
    client.put_object(Bucket=bucket, Key=key, Body=as_bytes(table(seed=4), kind))
    again, newer = load_with_source(spec)
    assert fingerprint(again) != fingerprint(loaded) and newer.version != source.version


def test_an_unversioned_s3_object_is_recorded_by_its_etag(s3) -> None:
    client, bucket = s3
    etag = client.put_object(Bucket=bucket, Key="rows.csv", Body=as_bytes(table(), "csv"))["ETag"]
    _, source = load_with_source(spec_reading({"path": f"s3://{bucket}/rows.csv"}))
    assert source.version == f"etag {etag.strip(chr(34))}"


def test_a_missing_s3_object_or_bucket_is_named_with_the_fix(s3) -> None:
    _, bucket = s3
    with pytest.raises(DataError, match=f"s3://{bucket}/nope.csv: no object has that key"):
        load_with_source(spec_reading({"path": f"s3://{bucket}/nope.csv"}))
    with pytest.raises(
        DataError, match=r"s3://no-such-bucket-7f/x\.csv: the bucket does not exist"
    ):
        load_with_source(spec_reading({"path": "s3://no-such-bucket-7f/x.csv"}))


def sales_database(postgres: Postgres, name: str) -> str:
    """A database owned by the password-only role; returns its URL, with no password in it."""
    postgres.psql(f"CREATE DATABASE {name} OWNER modelyard")
    return f"postgresql://modelyard@127.0.0.1:{postgres.port}/{name}"


def test_a_postgresql_query_gives_the_files_rows_with_the_password_from_the_environment(
    postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sales_database(postgres, "sales")
    frame = table()
    engine = create_engine(url.replace("modelyard@", f"modelyard:{postgres.password}@"))
    frame.to_sql("user rows", engine, index=False)  # real booleans, bigints, float8, text
    engine.dispose()
    monkeypatch.setenv("SALES_DB_PASSWORD", postgres.password)
    query = 'SELECT * FROM "user rows"\nORDER BY "mean radius" NULLS FIRST, "a b"'
    spec = spec_reading({"sql": {"url": url, "query": query, "password_env": "SALES_DB_PASSWORD"}})
    loaded, source = load_with_source(spec)
    ordered = frame.sort_values(["mean radius", "a b"], na_position="first", kind="stable")
    assert fingerprint(loaded) == expected_fingerprint(ordered.reset_index(drop=True))
    assert str(source).startswith(f"{url} (query sha256 ")
    assert postgres.password not in str(source) + spec.model_dump_json()


def test_a_wrong_database_password_or_query_fails_clearly_and_shows_no_password(
    postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sales_database(postgres, "refusals")
    wrong = "not-the-password-3b9d"
    monkeypatch.setenv("SALES_DB_PASSWORD", wrong)
    spec = spec_reading({"sql": {"url": url, "query": "SELECT 1",
                                 "password_env": "SALES_DB_PASSWORD"}})  # fmt: skip
    with pytest.raises(DataError, match=f"dataset.sql on {url} failed: .*password authentication "
                       "failed for user \"modelyard\"") as refused:  # fmt: skip
        load_with_source(spec)
    assert wrong not in str(refused.value)

    monkeypatch.setenv("SALES_DB_PASSWORD", postgres.password)
    spec = spec_reading({"sql": {"url": url, "query": "SELECT * FROM churn",
                                 "password_env": "SALES_DB_PASSWORD"}})  # fmt: skip
    with pytest.raises(DataError, match='relation "churn" does not exist') as refused:
        load_with_source(spec)
    assert postgres.password not in str(refused.value)


def test_init_drafts_a_spec_from_an_s3_object_that_names_it(s3, tmp_path) -> None:
    from modelyard.draft import draft
    from modelyard.spec import Spec

    client, bucket = s3
    frame = table().assign(target=lambda f: (f["target"] > 0).map({True: "yes", False: "no"}))
    client.put_object(Bucket=bucket, Key="crm/my customers.csv", Body=as_bytes(frame, "csv"))
    drafted = draft(f"s3://{bucket}/crm/my customers.csv", "target", tmp_path)
    assert drafted.spec["dataset"] == {"path": f"s3://{bucket}/crm/my customers.csv"}
    assert drafted.spec["name"] == "my-customers" and drafted.spec["positive_label"] == "yes"
    loaded = load_with_source(Spec.model_validate(drafted.spec))[0]
    assert len(loaded) == len(frame)
