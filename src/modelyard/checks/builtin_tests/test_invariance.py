"""Predictions must not move when a feature that should not matter changes."""

import numpy as np

from modelyard.checks.model_tests_plugin import Candidate
from modelyard.spec import Invariance


def test_invariant_to(candidate: Candidate, invariance_rule: Invariance) -> None:
    frame = candidate.features.copy()
    baseline = candidate.predict(frame)
    column = invariance_rule.feature
    if invariance_rule.values is not None:
        variants = [frame.assign(**{column: value}) for value in invariance_rule.values]
    else:
        rng = np.random.default_rng(0)
        noise = 1 + rng.normal(0, invariance_rule.noise or 0.0, len(frame))  # set: the spec checks
        variants = [frame.assign(**{column: frame[column] * noise})]
    worst = max(float(np.max(np.abs(candidate.predict(v) - baseline))) for v in variants)
    assert worst <= invariance_rule.tolerance, (
        f"changing {column} moved a prediction by {worst:.4g} "
        f"(tolerance {invariance_rule.tolerance})"
    )
