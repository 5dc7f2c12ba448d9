"""Conformance: every estimator of the matrix, for every task it takes, on generated data whose
column names are as awkward as real datasets' (spaces, dots, dashes, unicode, leading digits,
Python keywords, names that collide once sanitised): fit, export to ONNX, seal a signed bundle,
prove parity on the whole evaluation split through the serving code, and answer both protocols
from the real ASGI app; tree ensembles answer large batches through the tree kernel as through
ONNX Runtime. In-process: no Docker, no servers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from modelyard import estimators
from modelyard.bundle import load_or_create_key, parse_public_keys, verify
from modelyard.data import Splits, conform, model_input, split
from modelyard.package.build import build_bundle, frame_columns
from modelyard.package.onnx import ExportError
from modelyard.package.pmml import export_pmml, pmml_for, prove_pmml
from modelyard.serve import codecs
from modelyard.serve import runtime as runtime_module
from modelyard.serve.app import ServingApp
from modelyard.serve.runtime import Runtime
from modelyard.spec import Behaviour, Gates, Spec
from modelyard.train import fit_and_evaluate

# Two pairs collide once sanitised ('a b'/'a_b', 'x-y'/'x.y'); 'narrow band' holds values closer
# together than float32 can tell apart, where a tree's thresholds must be compared exactly.
NUMERIC = ["mean radius", "a b", "a_b", "x-y", "x.y", "1st", "class", "narrow band", "naïve é",
           "two levels"]  # fmt: skip
CATEGORICAL = ["lambda", "Ünïcode 名前", "plan code", "is active"]  # the last two: ints, bools
SMALL = {"n_estimators": 15}  # ensembles: enough trees to matter, few enough to stay quick
PARAMS: dict[str, dict[str, Any]] = {
    "RandomForestRegressor": SMALL, "RandomForestClassifier": SMALL,
    "ExtraTreesRegressor": SMALL, "ExtraTreesClassifier": SMALL,
    "GradientBoostingRegressor": SMALL, "GradientBoostingClassifier": SMALL,
    "HistGradientBoostingRegressor": {"max_iter": 15},
    "HistGradientBoostingClassifier": {"max_iter": 15},
    "XGBRegressor": SMALL, "XGBClassifier": SMALL, "LGBMRegressor": SMALL | {"verbose": -1},
    "LGBMClassifier": SMALL | {"verbose": -1},
    "SVC": {"probability": True, "random_state": 0}, "SGDClassifier": {"loss": "log_loss"},
    "MLPRegressor": {"max_iter": 300, "random_state": 0},
    "MLPClassifier": {"max_iter": 300, "random_state": 0},
}  # fmt: skip
CASES = [(s, task) for s in estimators.MATRIX for task in s.tasks]


def generate(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({name: rng.normal(0, 1, rows) * 10 ** (i % 4) for i, name in
                          enumerate(NUMERIC)})  # fmt: skip
    frame["narrow band"] = 1000 + rng.random(rows) * 1e-3  # 6e-5 apart in float32
    # A third of the rows exactly 0.4, the rest either side: the median, which fills the gaps,
    # is 0.4, and so is the threshold a histogram tree puts among those ties. 0.4 is no float32
    # value: a fill rounded to float32 (0.40000001) takes the other branch.
    ties = rng.choice([0.0, 1.0, 2.0], rows)
    frame["two levels"] = np.where(ties == 1, 0.4, np.where(ties == 0, rng.uniform(0, 0.4, rows),
                                                            rng.uniform(0.41, 1, rows)))  # fmt: skip
    frame.loc[rng.random(rows) < 0.08, "two levels"] = np.nan
    frame.loc[rng.random(rows) < 0.05, "mean radius"] = np.nan
    frame["lambda"] = rng.choice(["red", "green", "blue"], rows)
    frame["Ünïcode 名前"] = rng.choice(["α", "β"], rows)
    frame["plan code"] = rng.integers(1, 4, rows)
    frame["is active"] = rng.random(rows) < 0.7
    signal = (
        frame["mean radius"].fillna(0) + 0.5 * frame["a b"] - 0.01 * frame["x.y"]
        + (frame["narrow band"] - 1000) * 2000 + (frame["lambda"] == "red")
        + 0.5 * frame["plan code"] - frame["is active"] + 3 * (frame["two levels"].fillna(0.4) > 0.4)
    )  # fmt: skip
    frame["target"] = signal + rng.normal(0, 0.3, rows)
    return frame


def spec_for(supported: estimators.Supported, task: str) -> Spec:
    features = [{"name": n, "type": "numeric", "max_missing": 0.2} for n in NUMERIC]
    features += [{"name": n, "type": "categorical"} for n in CATEGORICAL[:2]]
    features += [{"name": "plan code", "type": "categorical", "categories": [1, 2, 3]},
                 {"name": "is active", "type": "categorical", "categories": [True, False]}]  # fmt: skip
    return Spec.model_validate({
        "name": f"conformance-{supported.name.lower()}", "task": task,
        "dataset": {"generator": "data:generate"}, "features": features, "target": "target",
        "estimator": {"class": supported.path, "params": PARAMS.get(supported.name, {})},
        "gates": {"champion": {"enabled": False}},
    })  # fmt: skip


def splits_for(spec: Spec, coded: bool = False) -> Splits:
    """`coded`: multiclass labels 0, 1, 2 (what XGBoost takes) instead of text."""
    frame = generate(600, seed=7)
    if spec.task == "binary_classification":
        frame["target"] = (frame["target"] > frame["target"].median()).astype(float)
    elif spec.task == "multiclass_classification":  # text labels, in no sorted order
        labels = [0, 1, 2] if coded else ["low", "mid", "high"]
        frame["target"] = pd.qcut(frame["target"], 3, labels=labels).astype(object)
    return split(conform(frame, spec), spec)  # as data.load_dataset hands it on


@pytest.mark.parametrize(("supported", "task"), CASES, ids=[f"{s.name}-{t}" for s, t in CASES])
def test_estimator_exports_proves_and_serves(supported, task, tmp_path: Path) -> None:
    if supported.extra:
        pytest.importorskip(supported.path.partition(".")[0])
    spec = spec_for(supported, task)
    splits = splits_for(spec, coded=supported.coded_labels)
    trained = fit_and_evaluate(spec, splits)
    key = load_or_create_key(tmp_path / "signing.pem")
    built = build_bundle(spec, trained.model, splits.eval, tmp_path, key,
                         {"model_version": "1", "git_commit": "0" * 40})  # fmt: skip
    assert built.parity.passed and built.parity.rows == len(splits.eval)
    runtime = Runtime(verify(built.path, parse_public_keys(_public(key))))
    assert [c.name for c in runtime.columns] == spec.feature_names  # requests keep the names
    _assert_parts_answer_as_the_whole(runtime, splits.eval.loc[:, spec.feature_names])
    _assert_the_tree_kernel_answers_as_onnx_runtime(
        runtime, splits.eval.loc[:, spec.feature_names], supported.family in ("tree", "boosting")
    )
    rows = splits.eval.loc[:, spec.feature_names].head(20)
    mlflow, v2 = asyncio.run(_ask(ServingApp(runtime), rows))
    expected = trained.eval_scores[:20]
    if task == "regression":
        np.testing.assert_allclose(mlflow["predictions"], expected, rtol=1e-5, atol=1e-5)
        return
    proba = np.asarray(next(o for o in v2["outputs"] if o["name"] == "predict_proba")["data"])
    # Labels are the estimator's own predict() (an SVC decides by its margin, not p >= 0.5).
    labels = trained.model.predict(model_input(rows)).tolist()
    if task == "binary_classification":
        assert mlflow["predictions"] == labels or _near_half(expected)
        np.testing.assert_allclose(proba[1::2], expected, rtol=1e-5, atol=1e-5)
    else:
        coded = supported.coded_labels
        assert (
            runtime.classes == trained.classes == ([0, 1, 2] if coded else ["high", "low", "mid"])
        )
        assert mlflow["predictions"] == labels or _near_tie(expected)
        np.testing.assert_allclose(proba.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)
        predict = next(o for o in v2["outputs"] if o["name"] == "predict")
        assert predict["datatype"] == ("INT64" if coded else "BYTES")
        assert predict["data"] == mlflow["predictions"]


def _assert_parts_answer_as_the_whole(runtime: Runtime, frame: pd.DataFrame) -> None:
    """A batch large enough to run in parts, side by side, answers row for row as one run of
    the whole batch does."""
    # Drawn, not tiled: every part must hold rows of its own for the order to show.
    many = frame.sample(3 * runtime_module.PART_ROWS + 7, replace=True, random_state=0)
    feeds, _ = codecs.to_feeds(frame_columns(many), runtime.columns, max_rows=len(many))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime_module, "_CORES", 3)  # parts even on a one-core machine
        in_parts = runtime.predict(feeds)
        patch.setattr(runtime_module, "PART_ROWS", len(many) + 1)
        whole = runtime.predict(feeds)
    np.testing.assert_array_equal(in_parts.values, whole.values)
    if whole.probabilities is not None:
        np.testing.assert_allclose(
            in_parts.probabilities, whole.probabilities, rtol=1e-6, atol=1e-9
        )


def _assert_the_tree_kernel_answers_as_onnx_runtime(
    runtime: Runtime, frame: pd.DataFrame, trees: bool
) -> None:
    """Every tree ensemble of the matrix gets the kernel, and a large batch (missing values
    among its rows) answers through it bit for bit as through ONNX Runtime alone."""
    assert (runtime.trees is not None) == trees
    if runtime.trees is None:
        return
    many = frame.sample(2 * runtime_module.TREE_ROWS, replace=True, random_state=1)
    feeds, _ = codecs.to_feeds(frame_columns(many), runtime.columns, max_rows=len(many))
    assert runtime._runner(len(many)) == runtime.trees.run
    expected, got = runtime._run_session(feeds), runtime.trees.run(feeds)
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(want, have)


@pytest.mark.slow  # a JVM per case: about two minutes for the matrix, so `make test` only
@pytest.mark.parametrize(("supported", "task"), CASES, ids=[f"{s.name}-{t}" for s, t in CASES])
def test_pmml_reproduces_the_scores_or_is_skipped_for_a_stated_reason(supported, task) -> None:
    """Where JPMML cannot reproduce an estimator's scores the matrix says why, and that is
    checked too: a stale reason (JPMML learnt it since) fails here."""
    if supported.extra:
        pytest.importorskip(supported.path.partition(".")[0])
    spec = spec_for(supported, task)
    spec = spec.model_copy(update={"package": spec.package.model_copy(update={"pmml": True})})
    splits = splits_for(spec, coded=supported.coded_labels)
    trained = fit_and_evaluate(spec, splits)
    pmml, skipped = pmml_for(trained.model, spec)
    proof = (spec, splits.eval, trained.eval_scores, trained.classes)
    if supported.no_pmml is None:
        assert skipped is None and pmml is not None
        report = prove_pmml(pmml, *proof)
        assert report.passed, report.describe()
        return
    assert pmml is None and skipped is not None and supported.no_pmml in skipped
    with pytest.raises(ExportError, match="gives no probabilit"):
        prove_pmml(export_pmml(trained.model, spec), *proof)


def test_an_unseeded_estimator_trains_the_same_model_twice() -> None:
    """No `random_state` in the spec: the split's seed stands in, so reruns agree."""
    forest = next(s for s in estimators.MATRIX if s.name == "RandomForestClassifier")
    spec = spec_for(forest, "binary_classification")
    assert "random_state" not in spec.estimator.params
    first, second = (fit_and_evaluate(spec, splits_for(spec)) for _ in range(2))
    np.testing.assert_array_equal(first.eval_scores, second.eval_scores)
    assert first.params["estimator.random_state"] == str(spec.split.seed)


async def _ask(app: ServingApp, rows: pd.DataFrame) -> tuple[dict, dict]:
    # Codes and booleans as a client sends them: JSON numbers and booleans, not their text.
    rows = rows.astype({"plan code": int}).assign(**{"is active": rows["is active"] == "true"})
    columns = frame_columns(rows)
    v2_inputs = [{"name": name, "shape": [len(values)], "data": values,
                  "datatype": {"plan code": "INT64", "is active": "BOOL"}.get(
                      name, "BYTES" if name in CATEGORICAL else "FP64")}
                 for name, values in columns.items()]  # fmt: skip
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        mlflow = await client.post("/invocations", json={"dataframe_records": rows.replace(
            {np.nan: None}).to_dict("records")})  # fmt: skip
        v2 = await client.post(f"/v2/models/{app.runtime.name}/infer", json={"inputs": v2_inputs})
    assert mlflow.status_code == 200, mlflow.text
    assert v2.status_code == 200, v2.text
    return mlflow.json(), v2.json()


def _near_tie(probabilities: np.ndarray) -> bool:
    top_two = np.sort(probabilities, axis=1)[:, -2:]
    return bool(np.any(top_two[:, 1] - top_two[:, 0] < 1e-6))


def _near_half(probabilities: np.ndarray) -> bool:
    return bool(np.any(np.abs(probabilities - 0.5) < 1e-6))


def _public(key: Any) -> str:
    from modelyard.bundle import public_key_text

    return public_key_text(key.public_key())


@pytest.mark.slow  # two behaviour-gate subprocesses and two data gates: 18 s, `make test` only
def test_a_multiclass_model_passes_every_gate_a_binary_one_does(tmp_path: Path) -> None:
    """Data gate (three classes at least), metric thresholds, champion comparison on per-row
    log-loss, and the built-in behaviour tests: a directional rule on a named class's
    probability, invariance, a slice judged on macro F1. Then the same gates fail where they
    should: the wrong direction, a one-class-short target."""
    from modelyard import stages
    from modelyard.checks.model import ChampionModel, check_model

    forest = next(s for s in estimators.MATRIX if s.name == "RandomForestClassifier")
    spec = spec_for(forest, "multiclass_classification").model_copy(update={
        "behaviour": Behaviour.model_validate({
            "directional": [{"feature": "a b", "delta": 15, "expect": "increase",
                             "class": "high", "min_fraction": 0.5}],
            "invariance": [{"feature": "naïve é", "noise": 0.01, "tolerance": 0.5}],
            "slices": [{"name": "reds", "where": "`lambda` == 'red'", "metric": "f1_macro",
                        "min": 0.3}],
        }),
        "gates": Gates.model_validate({"metrics": {"f1_macro": {"min": 0.4},
                                                   "roc_auc_ovr": {"min": 0.6}}}),
    })  # fmt: skip
    splits = splits_for(spec)
    assert stages.data_gate(spec, splits).report.passed
    trained = fit_and_evaluate(spec, splits)
    assert set(trained.metrics) == {"accuracy", "f1_macro", "f1_weighted", "log_loss",
                                    "roc_auc_ovr"}  # fmt: skip
    itself = ChampionModel("1", trained.model, spec.feature_names)
    model = check_model(spec, splits.eval, trained.metrics, trained.eval_scores, itself,
                        trained.classes)  # fmt: skip
    assert model.passed, model.failures
    assert model.data["champion"]["relative_loss_change"] == pytest.approx(0.0)
    behaviour = stages.behaviour_gate(spec, splits, trained)
    assert behaviour.passed, behaviour.failures
    names = {c.name for c in behaviour.checks}
    assert {"test_directional::test_direction_of[a b]", "test_slices::test_slice_meets_bound[reds]",
            "test_invariance::test_invariant_to[naïve é]"} <= names, names  # fmt: skip

    wrong = spec.model_copy(update={"behaviour": spec.behaviour.model_copy(update={
        "directional": [spec.behaviour.directional[0].model_copy(update={"expect": "decrease"})]
    })})  # fmt: skip
    failed = stages.behaviour_gate(wrong, splits, trained)
    assert any("gave a decrease of P(high)" in f for f in failed.failures), failed.failures
    two_classes = Splits(*(s[s["target"] != "mid"] for s in (splits.train, splits.eval)))
    assert not stages.data_gate(spec, two_classes).report.passed
