"""pytest plugin that hands the candidate model to the tests in `model_tests/`.

Fixtures:
- `candidate`: the fitted model, the spec, the evaluation rows and a `predict(frame)` helper.
- `invariance_rule`, `directional_rule`, `slice_rule`: one test per rule in the spec's
  `behaviour` section, with the rule's feature or name as the test id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest

from modelyard.evaluation import classes_of, scores, target_values
from modelyard.spec import Spec
from modelyard.values import category_text


@dataclass
class Candidate:
    model: Any
    spec: Spec
    eval_frame: pd.DataFrame

    @property
    def features(self) -> pd.DataFrame:
        return self.eval_frame.loc[:, self.spec.feature_names]

    @property
    def target(self) -> np.ndarray:
        """The evaluation rows' target: numbers, or a multiclass target's labels."""
        return target_values(self.spec, self.eval_frame)

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """The scores the gates judge: a value, the positive class's probability, or
        (multiclass) a row of probabilities, one column per class of `classes`."""
        return scores(self.model, frame.loc[:, self.spec.feature_names], self.spec.task)

    @property
    def classes(self) -> list | None:
        return None if self.spec.task == "regression" else classes_of(self.model)

    def score_of(self, frame: pd.DataFrame, label: str | None) -> np.ndarray:
        """One number per row: `predict`, or for a multiclass model the probability of the
        class written `label` (as the spec writes classes: `modelyard.values.category_text`)."""
        predicted = self.predict(frame)
        if label is None:
            return predicted
        texts = [category_text(c) for c in self.classes or []]
        if label not in texts:
            raise ValueError(f"class {label!r} is not one of the model's classes {texts}")
        return predicted[:, texts.index(label)]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--modelyard-candidate", help="work folder written by the behaviour gate")


def _load(config: pytest.Config) -> Candidate:
    folder = config.getoption("--modelyard-candidate")
    if not folder:
        raise pytest.UsageError("model_tests need --modelyard-candidate; run them via modelyard")
    cached = getattr(config, "_modelyard_candidate", None)
    if cached is None:
        root = Path(folder)
        spec = Spec.model_validate(json.loads((root / "spec.json").read_text()))
        cached = Candidate(
            model=joblib.load(root / "model.joblib"),
            spec=spec,
            eval_frame=pd.read_parquet(root / "eval.parquet"),
        )
        config._modelyard_candidate = cached  # type: ignore[attr-defined]
    return cached


@pytest.fixture(scope="session")
def candidate(request: pytest.FixtureRequest) -> Candidate:
    return _load(request.config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    behaviour = None
    for fixture, section, label in (
        ("invariance_rule", "invariance", "feature"),
        ("directional_rule", "directional", "feature"),
        ("slice_rule", "slices", "name"),
    ):
        if fixture in metafunc.fixturenames:
            behaviour = behaviour or _load(metafunc.config).spec.behaviour
            rules = getattr(behaviour, section)
            metafunc.parametrize(fixture, rules, ids=[getattr(r, label) for r in rules])
