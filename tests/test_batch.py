"""Batch scoring with the server's code, in process: chunks, rejects with the server's reason,
and a run killed mid-way that resumes without losing or repeating a row."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from modelyard import batch
from modelyard.bundle import parse_public_keys, verify
from modelyard.package.build import frame_columns
from modelyard.serve import codecs
from modelyard.serve.runtime import Runtime
from tests.conftest import example_data
from tests.serving import Built, build_example


@pytest.fixture(scope="module")
def ads(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_example("ad_clicks", tmp_path_factory.mktemp("ads"))


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    """12,000 generated rows, three of them bad in ways the server refuses."""
    frame = example_data("ad_clicks").generate(12_000, 11).drop(columns=["clicked"])
    frame = frame.astype({"gender": object, "device": object, "age": object})
    frame.loc[17, "device"] = "smart fridge"  # a category the model does not know
    frame.loc[9_001, "age"] = "forty"  # text where a number belongs
    frame.loc[11_999, "gender"] = 7  # a number where a category belongs
    return frame


def _runtime(built: Built) -> Runtime:
    return Runtime(verify(built.bundle.path, parse_public_keys(built.public_key)))


def _digest(path) -> str:
    return hashlib.sha256(pd.read_parquet(path).to_csv(index=False).encode()).hexdigest()


class Killed(Exception):
    pass


def test_a_killed_run_resumes_without_losing_or_repeating_a_row(ads, rows, tmp_path):
    runtime = _runtime(ads)

    def job(folder: str) -> batch.Job:
        out = tmp_path / folder
        return batch.Job("ads", "7", "d" * 64, out / "scored.parquet", out / "rejects.csv",
                         chunk_rows=2_000)  # fmt: skip

    whole = batch.score(rows, runtime, job("whole"), lambda _: None)
    assert (whole.rows, whole.scored, whole.rejected, whole.chunks) == (12_000, 11_997, 3, 6)

    said: list[str] = []

    def kill_after_three(line: str) -> None:
        said.append(line)
        if len(said) == 3:
            raise Killed  # as a SIGKILL would, between two chunks' records

    interrupted = job("interrupted")
    with pytest.raises(Killed):
        batch.score(rows, runtime, interrupted, kill_after_three)
    assert json.loads((interrupted.parts / batch.STATE).read_text())["done"] == [0, 1, 2]
    resumed = batch.score(rows, runtime, interrupted, said.append)
    assert resumed.resumed_at == 3 and "resuming: chunks [0, 1, 2] of 6 were done" in said[3]
    assert (resumed.scored, resumed.rejected) == (11_997, 3)
    assert _digest(interrupted.output) == _digest(job("whole").output)  # the same rows, once
    assert not interrupted.parts.exists()

    scored = pd.read_parquet(interrupted.output)
    assert scored["row"].is_unique and len(scored) == 11_997
    assert set(scored["model_version"]) == {"7"} and set(scored["bundle_digest"]) == {"d" * 64}
    rejects = pd.read_csv(interrupted.rejects)
    assert sorted(rejects["row"]) == [17, 9_001, 11_999]
    by_row = rejects.set_index("row")
    assert by_row.loc[17, "field"] == "device" and "smart fridge" in by_row.loc[17, "reason"]
    assert by_row.loc[9_001, "field"] == "age" and by_row.loc[11_999, "field"] == "gender"
    # The server's own answers for a sample of rows (its validation, its session).
    sample = rows.drop(index=[17, 9_001, 11_999]).sample(200, random_state=0)
    feeds, _ = codecs.to_feeds(frame_columns(sample), runtime.columns, max_rows=1_000)
    expected = runtime.predict(feeds)
    got = scored.set_index("row").loc[sample.index]
    np.testing.assert_array_equal(got["prediction"].to_numpy(), expected.values)
    np.testing.assert_allclose(got["probability"].to_numpy(), expected.probabilities, rtol=1e-6)


def test_parts_of_another_job_are_refused_not_mixed_in(ads, rows, tmp_path):
    runtime = _runtime(ads)
    job = batch.Job("ads", "7", "d" * 64, tmp_path / "out.csv", tmp_path / "rej.csv", 4_000)

    def stop(_: str) -> None:
        raise Killed

    with pytest.raises(Killed):
        batch.score(rows, runtime, job, stop)
    other = batch.Job("ads", "8", "e" * 64, job.output, job.rejects, 4_000)
    with pytest.raises(Exception, match="holds a run of another version, digest"):
        batch.score(rows, runtime, other, lambda _: None)
    with pytest.raises(Exception, match="another input"):
        batch.score(rows.head(100), runtime, job, lambda _: None)
    done = batch.score(rows, runtime, job, lambda _: None)  # the same job resumes
    assert done.scored + done.rejected == len(rows)
    assert len(pd.read_csv(job.output)) == done.scored


def test_every_input_kind_gives_the_same_scores(ads, rows, tmp_path, moto, monkeypatch):
    """A CSV file, a Parquet file, an s3:// object (moto in server mode) and a SQL query
    (SQLite) of the same rows are scored alike."""
    import boto3
    from sqlalchemy import create_engine

    sample = rows.head(3_000)
    sample.to_csv(tmp_path / "rows.csv", index=False)
    sample.astype({"age": float, "device": str, "gender": str}).to_parquet(
        tmp_path / "rows.parquet", index=False
    )
    database = f"sqlite:///{tmp_path / 'rows.db'}"
    sample.astype({"age": float}).to_sql("visitors", create_engine(database), index=False)
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIAMODELYARDTEST", "AWS_SECRET_ACCESS_KEY": "x",
                        "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ENDPOINT_URL": moto}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3")
    s3.create_bucket(
        Bucket="batch-rows", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    s3.upload_file(str(tmp_path / "rows.csv"), "batch-rows", "in/rows.csv")
    sources = {
        "csv": (str(tmp_path / "rows.csv"), None),
        "parquet": (str(tmp_path / "rows.parquet"), None),
        "s3": ("s3://batch-rows/in/rows.csv", None),
        "sql": (database, "SELECT * FROM visitors"),
    }
    runtime = _runtime(ads)
    scored = {}
    for kind, (source, query) in sources.items():
        out = tmp_path / kind
        job = batch.Job("ads", "7", "d" * 64, out / "scored.parquet", out / "rejects.csv", 1_000)
        done = batch.score(batch.read_input(source, query), runtime, job, lambda _: None)
        assert (done.scored, done.rejected) == (2_999, 1), kind  # row 17's unknown device
        scored[kind] = pd.read_parquet(job.output)
    for kind, frame in scored.items():
        pd.testing.assert_frame_equal(frame, scored["csv"], obj=kind)
    with pytest.raises(Exception, match=r"give a \.csv or \.parquet file"):
        batch.read_input(str(tmp_path / "rows.json"))
