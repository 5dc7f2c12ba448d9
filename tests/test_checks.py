"""The gates' logic on real data: Great Expectations, the bootstrap, the pytest-driven tests."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from modelyard import stages
from modelyard.checks.model import paired_bootstrap
from modelyard.data import conform, fingerprint, load_dataset
from modelyard.errors import DataError
from modelyard.spec import load_spec
from tests.conftest import ROOT

HOUSE = ROOT / "examples" / "house_prices" / "modelyard.yaml"
ADS = ROOT / "examples" / "ad_clicks" / "modelyard.yaml"


@pytest.fixture(scope="module")
def house():
    spec = load_spec(HOUSE)
    return spec, stages.prepare(spec)


def test_dataset_is_deterministic_and_fingerprint_sees_one_value():
    spec = load_spec(HOUSE)
    first, second = load_dataset(spec), load_dataset(spec)
    assert fingerprint(first) == fingerprint(second)
    changed = first.copy()
    changed.loc[17, "area"] += 0.1
    assert fingerprint(changed) != fingerprint(first)
    assert first.isna().any().any(), "examples must carry missing values for the checks to find"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_file_datasets_load_like_generated_ones(tmp_path, suffix):
    generated = load_spec(HOUSE)
    frame = load_dataset(generated)
    file = tmp_path / f"houses{suffix}"
    frame.to_csv(file, index=False) if suffix == ".csv" else frame.to_parquet(file)
    from_file = generated.model_copy(
        update={
            "dataset": generated.dataset.model_copy(update={"generator": None, "path": file.name}),
            "source_dir": tmp_path,
        }
    )
    assert fingerprint(load_dataset(from_file)) == fingerprint(frame)


def test_missing_dataset_file_names_the_field(tmp_path):
    spec = load_spec(HOUSE)
    missing = spec.model_copy(
        update={
            "dataset": spec.dataset.model_copy(update={"generator": None, "path": "x.csv"}),
            "source_dir": tmp_path,
        }
    )
    with pytest.raises(DataError, match=r"dataset.path .*x.csv does not exist"):
        load_dataset(missing)


def test_conform_names_missing_and_mistyped_columns():
    spec = load_spec(HOUSE)
    frame = load_dataset(spec)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['area'\]"):
        conform(frame.drop(columns=["area"]), spec)
    frame["bedrooms"] = frame["bedrooms"].astype(object)
    frame.loc[3, "bedrooms"] = "three"
    with pytest.raises(DataError, match=r"'bedrooms' is declared numeric .*\['three'\]"):
        conform(frame, spec)


def test_an_empty_dataset_is_named_before_any_work():
    spec = load_spec(ROOT / "examples" / "house_prices" / "modelyard.yaml")
    empty = load_dataset(spec).head(0)
    with pytest.raises(DataError, match=r"the dataset has no rows.*min_rows"):
        conform(empty, spec)


def test_data_gate_passes_clean_data_and_names_each_violation(house):
    spec, prepared = house
    assert stages.data_gate(spec, prepared.splits).report.passed

    bad_train = prepared.splits.train.copy()
    bad_train.loc[:4, "neighbourhood"] = "atlantis"
    bad_train.loc[:400, "bathrooms"] = np.nan  # far more than the 5% allowed
    result = stages.data_gate(spec, stages.Splits(train=bad_train, eval=prepared.splits.eval))
    failures = " | ".join(result.report.failures)
    assert not result.report.passed
    assert (
        "train: expect_column_values_to_be_in_set(neighbourhood)" in failures
        and "atlantis" in failures
    )
    assert "train: expect_column_values_to_not_be_null(bathrooms)" in failures
    assert "eval:" not in failures
    assert len(result.docs) > 1000  # the Data Docs site travels with the result


def test_data_gate_rejects_a_single_class_target():
    spec = load_spec(ADS)
    prepared = stages.prepare(spec)
    one_class = [s.assign(clicked=0.0) for s in (prepared.splits.train, prepared.splits.eval)]
    report = stages.data_gate(spec, stages.Splits(*one_class)).report
    assert "train: expect_column_distinct_values_to_equal_set(clicked)" in " ".join(report.failures)


def test_paired_bootstrap_separates_noise_from_a_real_loss_increase():
    rng = np.random.default_rng(3)
    champion = rng.exponential(1.0, 2000)
    same = paired_bootstrap(champion * rng.normal(1, 0.05, 2000), champion, 2000, 0.05)
    assert same["lower_bound"] < 0 < same["upper_bound"]
    worse = paired_bootstrap(champion * 1.10, champion, 2000, 0.05)
    assert worse["lower_bound"] > 0.05 and worse["relative_loss_change"] == pytest.approx(0.10)


def test_behaviour_gate_runs_model_tests_and_reports_each(house, tmp_path):
    spec, prepared = house
    trained = stages.train(spec, prepared.splits)
    report = stages.behaviour_gate(spec, prepared.splits, trained)
    names = {c.name for c in report.checks}
    assert report.passed, report.failures
    assert {
        "test_directional::test_direction_of[area]",
        "test_invariance::test_invariant_to[listing_weekday]",
        "test_slices::test_slice_meets_bound[downtown]",
        "test_latency::test_single_row_latency",
    } <= names

    directional = spec.behaviour.directional[0].model_copy(update={"expect": "decrease"})
    latency = spec.behaviour.latency.model_copy(update={"budget_ms": 1e-6, "calls": 10})
    wrong = spec.model_copy(update={"behaviour": spec.behaviour.model_copy(
        update={"directional": [directional], "latency": latency}
    )})  # fmt: skip
    failed = stages.behaviour_gate(wrong, prepared.splits, trained)
    assert not failed.passed
    assert any("raising area by 10.0 gave a decrease on 0.0% of rows" in f for f in failed.failures)
    slow = next(f for f in failed.failures if f.startswith("test_latency::"))
    assert re.search(r"p95 one-row latency [\d.]+ ms of CPU time \([\d.]+ ms wall\) exceeds "
                     r"the 1e-06 ms budget", slow), slow  # fmt: skip


def test_behaviour_gate_fails_on_a_missing_tests_folder(house):
    spec, prepared = house
    moved = spec.model_copy(
        update={"behaviour": spec.behaviour.model_copy(update={"tests": "no_such_dir"})}
    )
    report = stages.behaviour_gate(moved, prepared.splits, stages.train(spec, prepared.splits))
    assert not report.passed and "behaviour.tests:" in report.failures[0]


def test_model_gate_thresholds(house):
    spec, prepared = house
    trained = stages.train(spec, prepared.splits)
    from modelyard.checks.model import check_model

    report = check_model(spec, prepared.splits.eval, trained.metrics, trained.eval_scores, None)
    assert report.passed and "no version holds the alias 'production'" in report.notes[0]
    strict = spec.model_copy(
        update={
            "gates": spec.gates.model_copy(
                update={
                    "metrics": {"r2": spec.gates.metrics["r2"].model_copy(update={"min": 0.999})}
                }
            )
        }
    )
    report = check_model(strict, prepared.splits.eval, trained.metrics, trained.eval_scores, None)
    assert report.failures == [f"metric r2: r2 = {trained.metrics['r2']:.4g}, required >= 0.999"]


def test_generated_frames_keep_declared_dtypes(house):
    _, prepared = house
    frame: pd.DataFrame = prepared.frame
    assert frame["neighbourhood"].dtype == object and frame["area"].dtype == "float64"
