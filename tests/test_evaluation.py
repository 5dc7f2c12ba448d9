"""The card's vectorised bootstrap gives each resample the numbers scikit-learn's metrics give
it (`compute_metrics`), ties, one-class resamples and constant targets included."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelyard.evaluation import compute_metrics, resampled_metrics
from tests.conftest import examples


@st.composite
def resamples(draw: st.DrawFn) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    task = draw(st.sampled_from(["binary_classification", "regression"]))
    n = draw(st.integers(2, 40))
    if task == "binary_classification":
        truth = np.array(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n)))
        # Few distinct scores: ties, and scores on the 0.5 threshold, are common.
        levels = st.sampled_from([0.0, 0.1, 0.5, 0.5, 0.7, 1.0, 1e-20])
        score = np.array(draw(st.lists(st.one_of(levels, st.floats(0, 1)), min_size=n,
                                       max_size=n)))  # fmt: skip
    else:
        values = st.one_of(st.sampled_from([0.0, 3.0]), st.floats(-1e3, 1e3))
        truth = np.array(draw(st.lists(values, min_size=n, max_size=n)))
        score = np.array(draw(st.lists(values, min_size=n, max_size=n)))
    seed = draw(st.integers(0, 2**32 - 1))
    draws = np.random.default_rng(seed).integers(0, n, (5, n))
    return task, truth, score, draws


@settings(max_examples=examples(150), deadline=None)
@given(resamples())
def test_resampled_metrics_equal_scikit_learns_per_resample(drawn):
    task, truth, score, draws = drawn
    together = resampled_metrics(task, truth, score, draws)
    assert together is not None
    for i, rows in enumerate(draws):
        expected = compute_metrics(task, truth[rows], score[rows])
        assert set(together) == set(expected)
        for name, value in expected.items():
            got = float(together[name][i])
            if math.isnan(value):
                assert math.isnan(got), (name, rows)
            else:
                assert got == pytest.approx(value, rel=1e-9, abs=1e-9), (name, rows)


def test_multiclass_and_a_target_not_coded_0_1_are_left_to_the_per_resample_call():
    draws = np.zeros((2, 3), dtype=int)
    scores = np.full((3, 3), 1 / 3)
    assert (
        resampled_metrics("multiclass_classification", np.array([0, 1, 2]), scores, draws) is None
    )
    binary = np.array([0.2, 0.6, 0.9])
    assert resampled_metrics("binary_classification", np.array([1, 2, 1]), binary, draws) is None
