"""An example of a project's own behaviour test: every evaluation row gets a finite score, rows
with missing values included (the model's imputers must cover every gap the data can have)."""

import numpy as np

from modelyard.checks.model_tests_plugin import Candidate


def test_every_row_gets_a_finite_score(candidate: Candidate) -> None:
    scores = candidate.predict(candidate.features)
    assert np.isfinite(scores).all(), f"{int((~np.isfinite(scores)).sum())} rows scored NaN or inf"
