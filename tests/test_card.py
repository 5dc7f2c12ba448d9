"""The model card's measurements and rendering, in process, on generated data and several
estimators (the card over a real registry and ledger: test_deploy.py)."""

from __future__ import annotations

import html

import numpy as np
import pytest

from modelyard import stages
from modelyard.deploy import card
from modelyard.spec import Estimator, load_spec
from tests.conftest import ROOT
from tests.serving import build_example

CASES = [
    ("ad_clicks", {"class": "sklearn.ensemble.HistGradientBoostingClassifier",
                   "params": {"max_iter": 30}}),
    ("ad_clicks", {"class": "sklearn.linear_model.LogisticRegression"}),
    ("house_prices", {"class": "sklearn.ensemble.RandomForestRegressor",
                      "params": {"n_estimators": 20}}),
]  # fmt: skip


@pytest.mark.parametrize(("example", "estimator"), CASES)
def test_measure_gives_intervals_around_the_metrics_stats_and_importance(example, estimator):
    spec = load_spec(ROOT / "examples" / example / "modelyard.yaml")
    spec = spec.model_copy(update={"estimator": Estimator.model_validate(estimator)})
    prepared = stages.prepare(spec)
    trained = stages.train(spec, prepared.splits)
    facts = card.measure(spec, prepared.splits, trained.model, trained.eval_scores, trained.classes)
    assert facts["rows"] == {"train": len(prepared.splits.train), "eval": len(prepared.splits.eval)}
    for name, value in trained.metrics.items():
        low, high = facts["intervals"][name]
        if np.isnan(value):
            continue
        assert low <= value <= high, (name, low, value, high)  # the estimate inside its interval
        assert high - low < 0.5 * (abs(value) + 1), (name, low, high)  # and not vacuous
    stats = {f["name"]: f for f in facts["features"]}
    assert set(stats) == set(spec.feature_names)
    for feature in spec.features:
        column = prepared.splits.train[feature.name]
        assert stats[feature.name]["missing"] == pytest.approx(column.isna().mean())
        if feature.type == "numeric":
            assert stats[feature.name]["mean"] == pytest.approx(column.mean())
        else:
            top = column.astype(str).value_counts(normalize=True)
            assert stats[feature.name]["top"][0] == [top.index[0], pytest.approx(top.iloc[0])]
    importance = facts["importance"]
    assert [i["feature"] for i in importance] != [] and {i["feature"] for i in importance} == set(
        spec.feature_names
    )
    assert [i["mean"] for i in importance] == sorted((i["mean"] for i in importance), reverse=True)
    assert importance[0]["mean"] > 0  # some feature matters to a model that learned something
    # Deterministic: the same run measures the same.
    again = card.measure(spec, prepared.splits, trained.model, trained.eval_scores, trained.classes)
    assert again == facts


def test_every_section_renders_in_markdown_and_escaped_html(tmp_path):
    built = build_example("ad_clicks", tmp_path)
    facts = card.measure(built.spec, built.prepared.splits, built.trained.model,
                         built.trained.eval_scores, built.trained.classes)  # fmt: skip
    hostile = "<script>alert(1)</script> | pipes"
    made = card.Card(
        model="ads", version="3", description=hostile, facts=facts,
        metrics=built.trained.metrics,
        tags={"git_commit": "abc", "data_source": "generator", "data_fingerprint": "f" * 64},
        gates={"model": {"passed": True, "checks": [
            {"name": "slice device=mobile: roc_auc", "passed": True, "detail": "0.7 | 0.6"},
            {"name": "champion (production)", "passed": False, "detail": "worse by 3 %"}]}},
        parity={"onnx": {"passed": True, "rows": 1000, "max_abs_diff": 1e-7},
                "pmml": {"skipped": "no Java"}},
        releases=[{"when": "2026-12-01T10:00:00+00:00", "action": "rollback",
                   "environment": "production", "version": "2", "previous": "3",
                   "outcome": "succeeded", "actor": "ops", "reason": "latency"}],
    )  # fmt: skip
    text = card.markdown(made)
    for section in card.SECTIONS:
        assert f"\n## {section}\n" in text
    assert "worse by 3 %" in text and "slice device=mobile" in text and "rollback" in text
    assert "0.7 \\| 0.6" in text  # a pipe in a cell does not split the table
    assert "<script>" not in text  # nor does a spec's text become markup where it is shown
    page = card.to_html(made)
    assert "<script>" not in page and html.escape(hostile) in page
    assert page.count("<h2 ") == len(card.SECTIONS)
    summary = card.summary(made)
    assert "roc_auc" in summary and "model passed" in summary and "card/card.html" in summary
