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

from modelyard.evaluation import scores
from modelyard.spec import Spec


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
        return self.eval_frame[self.spec.target].to_numpy(dtype=float)

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return scores(self.model, frame.loc[:, self.spec.feature_names], self.spec.task)


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
