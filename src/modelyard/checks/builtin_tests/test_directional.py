"""Raising a feature must move predictions the way domain knowledge says."""

import numpy as np

from modelyard.checks.model_tests_plugin import Candidate
from modelyard.spec import Directional


def test_direction_of(candidate: Candidate, directional_rule: Directional) -> None:
    rule = directional_rule
    frame = candidate.features.copy()
    frame = frame[frame[rule.feature].notna()]
    before = candidate.score_of(frame, rule.class_)
    raised = frame.assign(**{rule.feature: frame[rule.feature] + rule.delta})
    after = candidate.score_of(raised, rule.class_)
    moved = after > before if rule.expect == "increase" else after < before
    share = float(np.mean(moved))
    assert share >= rule.min_fraction, (
        f"raising {rule.feature} by {rule.delta} gave a {rule.expect}"
        f"{f' of P({rule.class_})' if rule.class_ else ''} on {share:.1%} of rows; "
        f"at least {rule.min_fraction:.0%} required"
    )
