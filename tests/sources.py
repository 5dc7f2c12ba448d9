"""One generated table with awkward column names, and a spec that reads it from any source:
every source must hand the pipeline the same typed rows, hence the same fingerprint."""

from __future__ import annotations

from typing import Any

import pandas as pd

from modelyard import estimators
from modelyard.data import conform, fingerprint
from modelyard.spec import Spec
from tests.test_models import CATEGORICAL, NUMERIC, generate, spec_for


def table(rows: int = 300, seed: int = 3) -> pd.DataFrame:
    """Floats of every magnitude, gaps, text, unicode, integer codes and booleans."""
    return generate(rows, seed)


def spec_reading(dataset: dict[str, Any]) -> Spec:
    """The conformance spec for a random forest, reading from `dataset`."""
    forest = next(s for s in estimators.MATRIX if s.name == "RandomForestRegressor")
    raw = spec_for(forest, "regression").model_dump(mode="json", by_alias=True)
    return Spec.model_validate(raw | {"dataset": dataset})


def expected_fingerprint(frame: pd.DataFrame) -> str:
    """The fingerprint of the table as generated, typed in memory: no file in between."""
    return fingerprint(conform(frame, spec_reading({"path": "unused.csv"})))


__all__ = ["CATEGORICAL", "NUMERIC", "expected_fingerprint", "spec_reading", "table"]
