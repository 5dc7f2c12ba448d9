"""Loading a user's columns: codes and booleans as categories, dates refused with the fix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from modelyard.data import conform
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
    with pytest.raises(DataError, match="target 'contract' has values"):
        draft(tmp_path / "data" / "telco churn.csv", "contract", tmp_path)


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
