"""Drift bins and the prediction histogram: the binning every side shares (bundle reference,
server counters, PSI), and batches counted a column at a time exactly as one value at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelyard.bins import VECTOR_FROM, categorical_bins, numeric_bins, psi
from modelyard.monitor.drift import ordered_bins
from modelyard.serve.metrics import LATENCY_BUCKETS, _Tally
from tests.conftest import examples


def test_bins_and_psi():
    ages = [20.0 + i % 50 for i in range(1000)] + [math.nan] * 10
    bins = numeric_bins(ages)
    assert len(bins.labels) == 11 and bins.labels[-1] == "missing"
    assert math.isclose(sum(bins.reference), 1.0, abs_tol=1e-4)
    assert bins.label_of(math.nan) == "missing" and bins.label_of(-5.0) == bins.labels[0]
    assert bins.label_of(1e9) == bins.labels[-2]
    reference = dict(zip(bins.labels, bins.reference, strict=True))
    same = {label: share * 1000 for label, share in reference.items()}
    assert psi(same, reference) == pytest.approx(0.0, abs=1e-9)
    older = {label: 0.0 for label in bins.labels} | {bins.labels[-2]: 1000.0}
    assert psi(older, reference) > 2.0
    assert ordered_bins(list(reversed(bins.labels))) == list(bins.labels)
    devices = categorical_bins(["mobile", None, "desktop", "mobile"], ["desktop", "mobile"])
    assert devices.labels == ("desktop", "mobile", "other", "missing")
    assert devices.reference == (0.25, 0.5, 0.0, 0.25)
    assert devices.label_of("fridge") == "other" and devices.label_of("") == "missing"


_EDGES = (-1.0, 0.0, 1.0, 2.5, 1e30)
_SOME_NUMBERS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                          st.sampled_from(_EDGES), st.integers(-3, 3),
                          st.integers(-(2**70), 2**70), st.booleans())  # fmt: skip
_SOME_CATEGORIES = st.one_of(st.none(), st.just(math.nan), st.sampled_from(["", "a", "b", "zz"]),
                             st.integers(-3, 3), st.booleans())  # fmt: skip


@given(numbers=st.lists(_SOME_NUMBERS, min_size=1, max_size=300),
       texts=st.lists(_SOME_CATEGORIES, min_size=1, max_size=300), as_array=st.booleans())  # fmt: skip
@settings(max_examples=examples(60), deadline=None)
def test_bins_count_many_values_at_once_as_they_count_one_by_one(numbers, texts, as_array):
    """Batches of `VECTOR_FROM` values or more are counted a column at a time; every count
    must equal the one-value-at-a-time loop's, including missing, unknown and huge values."""
    numeric = numeric_bins([0.0], edges=_EDGES)  # values on the edges are drawn too
    categorical = categorical_bins(["a", "b", "1"], ["a", "b", "1"])
    for bins, values in ((numeric, numbers), (categorical, texts)):
        one_by_one = [0] * len(bins.labels)
        for value in values:
            bins.count([value], one_by_one)
        repeats = 1 + VECTOR_FROM // len(values)  # enough to take the batch path
        batch = values * repeats
        at_once = [0] * len(bins.labels)
        bins.count(np.array(batch, dtype=object) if as_array else batch, at_once)
        assert at_once == [n * repeats for n in one_by_one]


@given(scores=st.lists(st.one_of(st.sampled_from(LATENCY_BUCKETS), st.floats(0, 6, width=32)),
                      min_size=1, max_size=200), wide=st.booleans())  # fmt: skip
@settings(max_examples=examples(40), deadline=None)
def test_a_batchs_scores_fill_the_histogram_as_one_by_one(scores, wide):
    """The prediction histogram's buckets and sum for a batch, counted at once, equal the
    one-value-at-a-time ones, values on the bucket bounds included."""
    batch = np.array(
        scores * (1 + VECTOR_FROM // len(scores)), dtype=np.float64 if wide else np.float32
    )
    at_once, one_by_one = _Tally(LATENCY_BUCKETS), _Tally(LATENCY_BUCKETS)
    at_once.add_all(batch)
    for value in batch.tolist():
        one_by_one.add(value)
    assert at_once.counts == one_by_one.counts
    assert at_once.total == pytest.approx(one_by_one.total, rel=1e-12)
