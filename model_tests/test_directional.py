"""Raising a feature must move predictions the way domain knowledge says."""

import numpy as np


def test_direction_of(candidate, directional_rule):
    frame = candidate.features.copy()
    known = frame[directional_rule.feature].notna()
    frame = frame[known]
    before = candidate.predict(frame)
    raised = frame.assign(**{directional_rule.feature: frame[directional_rule.feature] + directional_rule.delta})
    after = candidate.predict(raised)
    moved = after > before if directional_rule.expect == "increase" else after < before
    share = float(np.mean(moved))
    assert share >= directional_rule.min_fraction, (
        f"raising {directional_rule.feature} by {directional_rule.delta} gave a {directional_rule.expect} "
        f"on {share:.1%} of rows; at least {directional_rule.min_fraction:.0%} required"
    )
