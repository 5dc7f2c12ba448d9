"""Fixed bins for drift: built once from the reference data, shared by the bundle, the server's
counters and the PSI computation, so every side speaks of the same bins by the same labels.

No pandas here: the serving app imports this module to count live inputs (numpy it has).

- numeric inputs: up to `NUMERIC_BINS` bins cut at the reference's quantiles (so each holds about
  the same share of the reference), plus `missing`;
- categorical inputs: one bin per known category, `other` (a value the model never saw) and
  `missing`;
- predictions: the classifier's probability in tenths, or a regression's reference quantiles.

PSI is Σ (live − reference) · ln(live / reference) over the bins, with both shares floored at
`PSI_FLOOR` so an empty bin counts as rare rather than infinitely surprising. The same floor is
used by the Prometheus recording rules (infra/prometheus/rules.yml), so both agree.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise
from typing import Any

import numpy as np

NUMERIC_BINS = 10
PSI_FLOOR = 1e-4
MISSING = "missing"
OTHER = "other"
VECTOR_FROM = 64  # values; below it the plain loop is quicker
PROBABILITY_EDGES = tuple(round(i / 10, 1) for i in range(1, 10))


@dataclass(frozen=True)
class Bins:
    """How one signal (an input column or the prediction) is binned, and its reference shares."""

    kind: str  # "numeric" | "categorical"
    labels: tuple[str, ...]
    edges: tuple[float, ...] = ()  # numeric: inner cut points, ascending
    reference: tuple[float, ...] = ()  # share of the reference rows per label

    def count(self, values: Iterable[Any], counts: list[int]) -> None:
        """Add each value to `counts` (indexed like `labels`): None, NaN and "" (a missing
        category after validation) are `missing`; an unknown category is `other`. The one
        binning both the bundle's reference and the server's live counters use. A list or array
        of `VECTOR_FROM` values or more is counted a column at a time (one by one, a
        10,000-row request's bins took longer than its prediction); fewer go through the plain
        loop, whose cost per call is lower."""
        if (
            isinstance(values, list | np.ndarray)
            and len(values) >= VECTOR_FROM
            and self._count_at_once(values, counts)
        ):
            return
        missing = len(self.labels) - 1  # labels end with `missing`
        if self.kind == "numeric":
            edges = self.edges
            for v in values:
                counts[missing if v is None or v != v else bisect_right(edges, v)] += 1
        else:
            slots, other = self._slots, missing - 1  # ... `other`, `missing`
            for v in values:
                counts[missing if v is None or v != v else slots.get(v, other)] += 1

    def _count_at_once(self, values: list[Any] | np.ndarray, counts: list[int]) -> bool:
        """`count` for many values; False (nothing counted) when a numeric signal holds a value
        that is not a number, so the loop raises as it would."""
        missing = len(self.labels) - 1
        if self.kind != "numeric":  # each distinct value looked up once, grouped at C speed
            slots, other = self._slots, missing - 1
            listed = values.tolist() if isinstance(values, np.ndarray) else values
            for v, n in Counter(listed).items():
                counts[missing if v is None or v != v else slots.get(v, other)] += n
            return True
        numbers = _as_numbers(values)
        if numbers is None:
            return False
        # `bisect_right`'s rule, on every value at once.
        slot = np.searchsorted(np.asarray(self.edges, dtype=np.float64), numbers, side="right")
        slot[np.isnan(numbers)] = missing
        add_slots(counts, slot)
        return True

    @cached_property
    def _slots(self) -> dict[str, int]:
        """Category -> its position; "" (what validation makes of a missing one) -> missing."""
        known = {label: i for i, label in enumerate(self.labels[:-2])}
        return known | {"": len(self.labels) - 1}

    def label_of(self, value: Any) -> str:
        counts = [0] * len(self.labels)
        self.count([value], counts)
        return self.labels[counts.index(1)]

    def shares(self, values: Iterable[Any]) -> tuple[float, ...]:
        counts = [0] * len(self.labels)
        self.count(values, counts)
        total = sum(counts) or 1
        return tuple(round(c / total, 6) for c in counts)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "labels": list(self.labels),
            "edges": list(self.edges),
            "reference": list(self.reference),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Bins:
        return cls(
            kind=data["kind"],
            labels=tuple(data["labels"]),
            edges=tuple(float(e) for e in data["edges"]),
            reference=tuple(float(r) for r in data["reference"]),
        )


def _as_numbers(values: list[Any] | np.ndarray) -> np.ndarray | None:
    """Float64 with NaN for None, or None unless every value is a number or missing."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        return values.astype(np.float64)
    return as_float64(values.tolist() if isinstance(values, np.ndarray) else values, _NUMBER_TYPES)


_NUMBER_TYPES: frozenset[type] = frozenset({int, float, bool, type(None)})


def as_float64(values: Sequence[Any], kinds: frozenset[type]) -> np.ndarray | None:
    """`values` as float64 (None becomes NaN) when the type of each is exactly one of `kinds`;
    None otherwise, or for an integer beyond float64. The types are checked first: numpy would
    read the text "1.5" as a number."""
    if not set(map(type, values)) <= kinds:
        return None
    try:
        return np.asarray(values, dtype=np.float64)
    except OverflowError:
        return None


def add_slots(counts: list[int], slots: np.ndarray) -> None:
    """Add to each of `counts` how many of `slots` hold its index."""
    for i, n in enumerate(np.bincount(slots, minlength=len(counts)).tolist()):
        counts[i] += n


def numeric_bins(values: Sequence[float], edges: Sequence[float] | None = None) -> Bins:
    """Bins cut at the reference's deciles (or at given `edges`), with the reference's shares."""
    present = sorted(v for v in values if v is not None and not math.isnan(v))
    if edges is None:
        edges = _quantile_edges(present)
    cuts = tuple(sorted({float(e) for e in edges}))
    bins = Bins("numeric", (*_range_labels(cuts), MISSING), cuts)
    return _with_reference(bins, values)


def categorical_bins(values: Sequence[Any], categories: Sequence[str] | None) -> Bins:
    """A bin per known category (the spec's, else those seen in the reference)."""
    known = list(categories) if categories else sorted({v for v in values if isinstance(v, str)})
    return _with_reference(Bins("categorical", (*known, OTHER, MISSING)), values)


def psi(live: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """Population stability index of live counts (or shares) against reference shares.

    Rules of thumb: < 0.1 stable, 0.1–0.25 a moderate shift, > 0.25 a large one.
    """
    total = sum(live.values())
    if total <= 0:
        return 0.0
    score = 0.0
    for label, expected in reference.items():
        actual = max(live.get(label, 0.0) / total, PSI_FLOOR)
        expected = max(expected, PSI_FLOOR)
        score += (actual - expected) * math.log(actual / expected)
    return score


def _with_reference(bins: Bins, values: Iterable[Any]) -> Bins:
    return Bins(bins.kind, bins.labels, bins.edges, bins.shares(values))


def _quantile_edges(ordered: list[float]) -> list[float]:
    if not ordered:
        return []
    n = len(ordered)
    return [ordered[min(n - 1, (n * i) // NUMERIC_BINS)] for i in range(1, NUMERIC_BINS)]


def _range_labels(cuts: tuple[float, ...]) -> list[str]:
    """`<24`, `24–31`, …, `≥80`: readable on a dashboard, unique per bin."""
    if not cuts:
        return ["all"]
    text = [f"{c:.4g}" for c in cuts]
    middle = [f"{a}–{b}" for a, b in pairwise(text)]
    return [f"<{text[0]}", *middle, f"≥{text[-1]}"]
