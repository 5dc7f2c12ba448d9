"""Loading a user's columns: codes and booleans as categories, dates refused with the fix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from modelyard.data import conform, fingerprint
from modelyard.errors import DataError
from modelyard.serve import codecs
from modelyard.serve.runtime import Column
from modelyard.spec import Spec


def spec_with(*features: dict) -> Spec:
    return Spec.model_validate({
        "name": "data-test", "task": "regression", "dataset": {"path": "x.csv"},
        "features": list(features), "target": "y",
        "estimator": {"class": "sklearn.linear_model.LinearRegression"},
    })  # fmt: skip


def test_codes_and_booleans_are_categories_written_one_way() -> None:
    spec = spec_with({"name": "plan", "type": "categorical", "categories": [1, 2, 3]},
                     {"name": "active", "type": "categorical", "categories": [True, False]},
                     {"name": "size", "type": "numeric", "max_missing": 0.5})  # fmt: skip
    assert spec.feature("plan").categories == ["1", "2", "3"]
    assert spec.feature("active").categories == ["true", "false"]
    # A code column with a gap is read as floats; it is still "2", not "2.0".
    frame = pd.DataFrame({"plan": [1.0, 2.0, np.nan], "active": [True, False, True],
                          "size": [1, 2, None], "y": [1.0, 2.0, 3.0]})  # fmt: skip
    conformed = conform(frame, spec)
    assert conformed["plan"].tolist()[:2] == ["1", "2"] and np.isnan(conformed["plan"][2])
    assert conformed["active"].tolist() == ["true", "false", "true"]
    # A request sends them as JSON numbers and booleans: the same categories.
    schema = [Column("plan", "categorical", True, frozenset({"1", "2", "3"})),
              Column("active", "categorical", False, frozenset({"true", "false"}))]  # fmt: skip
    values, _ = codecs.validate({"plan": [2, "3", None], "active": [True, "false", False]},
                                schema, max_rows=10)  # fmt: skip
    assert values == {"plan": ["2", "3", ""], "active": ["true", "false", "false"]}
    with pytest.raises(codecs.ClientError, match="'plan': '4' at row 0 is not one of"):
        codecs.validate({"plan": [4], "active": [True]}, schema, max_rows=10)


@pytest.mark.parametrize("kind", ["numeric", "categorical"])
@pytest.mark.parametrize("dates", [pd.to_datetime(["2026-01-05", "2026-02-01"]),
                                   ["2026-01-05T10:00:00", "2026-02-01T11:30:00"]],
                         ids=["datetime-dtype", "iso-text"])  # fmt: skip
def test_a_date_column_is_refused_with_what_to_do_instead(kind: str, dates: object) -> None:
    spec = spec_with({"name": "signed up", "type": kind})
    frame = pd.DataFrame({"signed up": dates, "y": [1.0, 2.0]})
    with pytest.raises(DataError, match=r"'signed up' holds dates or times.*derive numbers"):
        conform(frame, spec)


def test_init_drafts_a_spec_from_the_data(tmp_path) -> None:
    from modelyard.draft import draft
    from modelyard.spec import load_spec

    rows = 200
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "monthly charges": rng.uniform(20, 120, rows), "tenure months": rng.integers(0, 72, rows),
        "contract": rng.choice(["monthly", "yearly"], rows), "paperless": rng.random(rows) < 0.5,
        "signed up": [f"2026-01-{i % 28 + 1:02d}" for i in range(rows)],
        "customer id": [f"c{i:05d}" for i in range(rows)], "country": "NL",
        "churned": rng.integers(0, 2, rows),
    })  # fmt: skip
    frame.loc[:9, "monthly charges"] = np.nan
    (tmp_path / "data").mkdir()
    frame.to_csv(tmp_path / "data" / "telco churn.csv", index=False)
    drafted = draft(tmp_path / "data" / "telco churn.csv", "churned", tmp_path)
    spec = drafted.spec
    assert spec["task"] == "binary_classification" and spec["name"] == "telco-churn"
    assert spec["dataset"] == {"path": "data/telco churn.csv"}
    by_name = {f["name"]: f for f in spec["features"]}
    assert list(by_name) == ["monthly charges", "tenure months", "contract", "paperless"]
    charges = by_name["monthly charges"]
    assert charges["min"] < frame["monthly charges"].min() and charges["min"] >= 0  # widened
    assert charges["max"] > frame["monthly charges"].max() and charges["max_missing"] == 0.09
    assert by_name["paperless"]["categories"] == ["false", "true"]
    assert set(drafted.left_out) == {"signed up", "customer id", "country"}
    (tmp_path / "modelyard.yaml").write_text(drafted.to_yaml())
    assert load_spec(tmp_path / "modelyard.yaml").feature("contract").categories == [
        "monthly", "yearly"]  # fmt: skip
    with pytest.raises(DataError, match="target 'customer id' has values"):
        draft(tmp_path / "data" / "telco churn.csv", "customer id", tmp_path)


def test_a_target_of_text_labels_is_drafted_as_multiclass(tmp_path) -> None:
    from modelyard.draft import draft

    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"size": rng.normal(size=90), "tier": ["gold", "silver", "bronze"] * 30})
    frame.to_csv(tmp_path / "tiers.csv", index=False)
    spec = draft(tmp_path / "tiers.csv", "tier", tmp_path).spec
    assert spec["task"] == "multiclass_classification"
    assert spec["gates"]["metrics"] == {"roc_auc_ovr": {"min": 0.55}}


RULE = {"feature": "size", "delta": 1, "expect": "increase"}


@pytest.mark.parametrize(("task", "rule", "ok"), [
    ("multiclass_classification", RULE | {"class": "gold"}, True),
    ("multiclass_classification", RULE, False),
    ("binary_classification", RULE | {"class": 1}, False),
])  # fmt: skip
def test_a_multiclass_directional_rule_names_its_class_and_only_there(task, rule, ok) -> None:
    from pydantic import ValidationError

    spec = {
        "name": "tiers", "task": task, "dataset": {"path": "x.csv"}, "target": "tier",
        "features": [{"name": "size", "type": "numeric"}],
        "estimator": {"class": "sklearn.linear_model.LogisticRegression"},
        "behaviour": {"directional": [rule]},
    }  # fmt: skip
    if ok:
        assert Spec.model_validate(spec).behaviour.directional[0].class_ == "gold"
        return
    with pytest.raises(ValidationError, match=r"directional\[0\]\.class"):
        Spec.model_validate(spec)


# --- sources: a file, S3 (tests/test_sources.py) or a SQL query; the same rows from each -------


def test_csv_parquet_and_sql_give_the_same_rows_and_fingerprint(tmp_path) -> None:
    from sqlalchemy import create_engine

    from modelyard.data import load_with_source
    from tests.sources import expected_fingerprint, spec_reading, table

    frame = table()
    frame.to_csv(tmp_path / "rows.csv", index=False)
    frame.to_parquet(tmp_path / "rows.parquet", index=False)
    database = tmp_path / "rows.db"
    engine = create_engine(f"sqlite:///{database}")
    # SQLite has no boolean type (it stores 1/0): its table holds them as the text they mean.
    as_text = frame["is active"].map({True: "true", False: "false"})
    frame.assign(**{"is active": as_text}).to_sql("user rows", engine, index=False)
    engine.dispose()
    query = 'SELECT * FROM "user rows" ORDER BY rowid'
    sources = {
        "csv": {"path": str(tmp_path / "rows.csv")},
        "parquet": {"path": str(tmp_path / "rows.parquet")},
        "sql": {"sql": {"url": f"sqlite:///{database}", "query": query}},
    }
    expected = expected_fingerprint(frame)
    for name, dataset in sources.items():
        loaded, source = load_with_source(spec_reading(dataset))
        assert fingerprint(loaded) == expected, name
    assert str(source) == f"sqlite:///{database} (query sha256 {sha256(query)[:16]})"


def sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(("dataset", "message"), [
    ({"sql": {"url": "postgresql://reader:hunter2@db/sales", "query": "SELECT 1"}},
     "dataset.sql.url: .*holds a password.*password_env"),
    ({"sql": {"url": "postgresql://reader@db/sales?password=hunter2", "query": "SELECT 1"}},
     "dataset.sql.url: .*holds a password"),
    ({"sql": {"url": "not a url", "query": "SELECT 1"}}, "dataset.sql.url: .*not a database URL"),
    ({"sql": {"url": "sqlite://", "query": "SELECT 1", "password_env": "DB PASSWORD"}},
     "dataset.sql.password_env: .*not an environment variable name"),
    ({"sql": {"url": "sqlite://", "query": "  "}}, "dataset.sql.query: .*empty"),
    ({"path": "x.csv", "sql": {"url": "sqlite://", "query": "SELECT 1"}},
     "exactly one of 'path'.*given: \\['path', 'sql'\\]"),
    ({"path": "https://example.com/x.csv"}, "the one remote store is S3"),
    ({"path": "s3://bucket-only.csv"}, "s3://bucket/key"),
])  # fmt: skip
def test_a_bad_source_is_refused_when_the_spec_loads(tmp_path, dataset, message) -> None:
    import yaml

    from modelyard.errors import SpecError
    from modelyard.spec import load_spec
    from tests.sources import spec_reading

    raw = spec_reading({"path": "x.csv"}).model_dump(mode="json", by_alias=True)
    (tmp_path / "modelyard.yaml").write_text(yaml.safe_dump(raw | {"dataset": dataset}))
    with pytest.raises(SpecError, match=message) as refused:
        load_spec(tmp_path / "modelyard.yaml")
    assert "hunter2" not in str(refused.value)


def test_a_password_variable_that_is_not_set_is_named(monkeypatch) -> None:
    from modelyard.data import load_dataset
    from tests.sources import spec_reading

    monkeypatch.delenv("SALES_DB_PASSWORD", raising=False)
    spec = spec_reading({"sql": {"url": "sqlite://", "query": "SELECT 1",
                                 "password_env": "SALES_DB_PASSWORD"}})  # fmt: skip
    with pytest.raises(DataError, match="password_env names SALES_DB_PASSWORD, which is not set"):
        load_dataset(spec)


def test_a_failing_query_says_what_the_database_said(tmp_path) -> None:
    from modelyard.data import load_dataset
    from tests.sources import spec_reading

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    spec = spec_reading({"sql": {"url": url, "query": "SELECT * FROM churn"}})
    with pytest.raises(DataError, match=f"dataset.sql on {url} failed: .*no such table: churn"):
        load_dataset(spec)


# --- binary targets of two text labels -----------------------------------------------------


@pytest.mark.parametrize(("labels", "positive", "why"), [
    (["Yes", "No", "No", "Yes", "No"], "Yes", "it reads as yes"),
    (["stayed", "left", "stayed", "stayed", "stayed"], "left", "the rarer label (20 of 100 rows)"),
])  # fmt: skip
def test_a_two_label_target_is_binary_with_the_positive_label_drafted(
    tmp_path, labels, positive, why
) -> None:
    from modelyard.draft import draft

    frame = pd.DataFrame({"tenure": range(len(labels) * 20), "churn": labels * 20})
    frame.to_csv(tmp_path / "churn.csv", index=False)
    drafted = draft(tmp_path / "churn.csv", "churn", tmp_path)
    assert drafted.spec["task"] == "binary_classification"
    assert drafted.spec["positive_label"] == positive
    assert list(drafted.spec).index("positive_label") == list(drafted.spec).index("target") + 1
    assert any(why in note for note in drafted.notes) and why in drafted.to_yaml()
    spec = Spec.model_validate(drafted.spec)
    target = conform(frame, spec)["churn"]
    assert target.tolist() == [float(v == positive) for v in frame["churn"]]


def test_a_positive_label_must_be_one_of_exactly_two() -> None:
    spec = spec_with({"name": "size", "type": "numeric"})
    binary = Spec.model_validate(spec.model_dump(mode="json", by_alias=True) | {
        "task": "binary_classification", "positive_label": "yes",
        "estimator": {"class": "sklearn.linear_model.LogisticRegression"}})  # fmt: skip
    frame = pd.DataFrame({"size": [1.0, 2.0, 3.0], "y": ["yes", "no", "maybe"]})
    with pytest.raises(DataError, match=r"labels \['maybe', 'no', 'yes'\]; positive_label 'yes'"):
        conform(frame, binary)
    with pytest.raises(DataError, match="positive_label 'yes' must be one of exactly two"):
        conform(frame.assign(y=["Yes", "no", "no"]), binary)
    # Booleans are labels too, written as true/false.
    booleans = Spec.model_validate(binary.model_dump(mode="json", by_alias=True)
                                   | {"positive_label": True})  # fmt: skip
    assert conform(frame.assign(y=[True, False, True]), booleans)["y"].tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="positive_label names the event of a binary"):
        Spec.model_validate(spec.model_dump(mode="json", by_alias=True) | {"positive_label": "a"})
