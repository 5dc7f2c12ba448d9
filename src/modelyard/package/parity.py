"""Prove an export before keeping it: its predictions on the whole evaluation split must match
scikit-learn's within a stated tolerance, |export - sklearn| <= atol + rtol * |sklearn|."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from modelyard.errors import ExportFailed


class ParityError(ExportFailed):
    """An export's predictions differ from scikit-learn's; the worst rows are in the message."""


@dataclass
class ParityReport:
    export: str
    rows: int
    rtol: float
    atol: float
    max_abs_diff: float
    mismatched: int
    worst: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.mismatched == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}

    def describe(self) -> str:
        head = (
            f"{self.export} export: {self.mismatched} of {self.rows} rows differ from "
            f"scikit-learn beyond atol={self.atol:g} + rtol={self.rtol:g}·|expected| "
            f"(max |diff| {self.max_abs_diff:.3g})"
        )
        rows = [
            f"  row {w['row']}: expected {w['expected']:.6g}, got {w['got']:.6g}; "
            f"inputs {w['inputs']}"
            for w in self.worst
        ]
        return "\n".join([head, *rows])


def compare(
    export: str,
    expected: np.ndarray,
    got: np.ndarray,
    features: pd.DataFrame,
    rtol: float,
    atol: float,
    top: int = 5,
) -> ParityReport:
    expected = np.asarray(expected, dtype=float)
    got = np.asarray(got, dtype=float)
    if expected.shape != got.shape:
        raise ParityError(
            f"{export} export answers shape {got.shape}, scikit-learn {expected.shape}"
        )
    diff = np.abs(expected - got)
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only is a mismatch too
    allowed = atol + rtol * np.abs(expected)
    excess = diff - allowed
    if excess.ndim == 2:  # multiclass: a row is as wrong as its worst class probability
        worst_class = excess.argmax(axis=1)
        rows = np.arange(len(excess))
        expected, got, diff = (a[rows, worst_class] for a in (expected, got, diff))
        excess = excess[rows, worst_class]
    bad = excess > 0
    order = np.argsort(-excess)[:top]
    worst = [
        {
            "row": int(i),
            "expected": float(expected[i]),
            "got": float(got[i]),
            "abs_diff": float(diff[i]),
            "inputs": {k: _plain(v) for k, v in features.iloc[int(i)].items()},
        }
        for i in order
        if bad[i]
    ]
    return ParityReport(
        export, len(expected), rtol, atol, float(diff.max(initial=0.0)), int(bad.sum()), worst
    )


def _plain(value: Any) -> Any:
    if isinstance(value, float) and np.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value
