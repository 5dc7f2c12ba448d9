"""Named slices of the evaluation data must each meet their own metric bound."""

from modelyard.checks.model_tests_plugin import Candidate
from modelyard.evaluation import compute_metrics, passes, target_values
from modelyard.spec import Slice


def test_slice_meets_bound(candidate: Candidate, slice_rule: Slice) -> None:
    rows = candidate.eval_frame.query(slice_rule.where)
    assert len(rows) >= 20, (
        f"slice {slice_rule.name!r} ({slice_rule.where}) has only {len(rows)} rows"
    )
    values = compute_metrics(
        candidate.spec.task,
        target_values(candidate.spec, rows),
        candidate.predict(rows),
        candidate.classes,
    )
    value = values[slice_rule.metric]
    assert passes(slice_rule.metric, value, slice_rule.min, slice_rule.max), (
        f"slice {slice_rule.name!r}: {slice_rule.metric} = {value:.4g}, "
        f"required min={slice_rule.min} max={slice_rule.max} on {len(rows)} rows"
    )
