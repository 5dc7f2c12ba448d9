"""`modelyard init`: a starting spec drafted from a look at the data.

Every column but the target becomes a feature with its type, its range (widened by a margin, so
next month's data is not refused for a new maximum), its categories and the share of gaps it may
have. Columns a model cannot use as they are (dates, identifiers, constants) are left out, each
with the reason, as a comment at the top of the spec. The estimator is a histogram gradient
boosting model, which copes with any mix of columns; the gates only demand that the model beats
guessing, so a first run passes on data with any signal in it. Tighten them once you know what
the model can do.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from modelyard.data import looks_like_dates
from modelyard.errors import DataError
from modelyard.readers import read_s3, read_table
from modelyard.values import category_text

MARGIN = 0.1  # of the observed range, added on each side
MAX_CATEGORIES = 50  # more distinct texts than this, and a column looks like an identifier
ESTIMATORS = {
    "regression": "sklearn.ensemble.HistGradientBoostingRegressor",
    "binary_classification": "sklearn.ensemble.HistGradientBoostingClassifier",
    "multiclass_classification": "sklearn.ensemble.HistGradientBoostingClassifier",
}
GATES = {  # beats guessing: the mean (regression) or a coin (classification)
    "regression": {"r2": {"min": 0.0}},
    "binary_classification": {"roc_auc": {"min": 0.55}},
    "multiclass_classification": {"roc_auc_ovr": {"min": 0.55}},
}


@dataclass
class Draft:
    spec: dict[str, Any]
    left_out: dict[str, str] = field(default_factory=dict)  # column -> why
    notes: list[str] = field(default_factory=list)  # choices made for the user, to check

    def to_yaml(self) -> str:
        import yaml

        head = [
            "# Drafted by `modelyard init` from the data; every field is in docs/spec.md.",
            "# The gates only ask the model to beat guessing: tighten them once you know it.",
        ]
        head += [f"# Left out: {name!r}: {why}" for name, why in self.left_out.items()]
        head += [f"# Chosen: {note}" for note in self.notes]
        body = yaml.safe_dump(self.spec, sort_keys=False, allow_unicode=True, width=100)
        return "\n".join(head) + "\n" + body


def draft(data: Path | str, target: str, spec_folder: Path, task: str | None = None,
          name: str | None = None) -> Draft:  # fmt: skip
    """`data`: a local file, or an s3:// URI that the spec then names as it is."""
    remote = str(data).startswith("s3://")
    frame = read_s3(str(data))[0] if remote else read_table(Path(data))
    if target not in frame.columns:
        raise DataError(f"--target {target!r} is not a column of {data}; it has {list(frame)}")
    chosen = task or _task_of(frame[target], target)
    features, left_out = [], {}
    for column in frame.columns.drop(target):
        feature, why = _feature(column, frame[column])
        if feature is not None:
            features.append(feature)
        else:
            left_out[str(column)] = why
    if not features:
        raise DataError(f"{data} has no column modelyard can use as a feature: {left_out}")
    spec: dict[str, Any] = {
        "name": name or _model_name(PurePosixPath(str(data))),
        "task": chosen,
        "dataset": {"path": str(data) if remote else _relative(Path(data), spec_folder)},
        "features": features,
        "target": target,
        "estimator": {"class": ESTIMATORS[chosen], "params": {"random_state": 0}},
        "expectations": {"min_rows": max(1, len(frame) // 2)},
        "gates": {"metrics": GATES[chosen]},
    }
    if chosen == "regression":
        low, high = _widened(frame[target].dropna())
        spec["expectations"] |= {"target_min": low, "target_max": high}
    notes = []
    if chosen == "binary_classification" and not _zero_one(frame[target]):
        positive, why = _positive_label(frame[target])
        spec = _with_positive_label(spec, positive)
        notes.append(f"positive_label {positive!r}: {why}; name the other label if it is the event")
    return Draft(spec, left_out, notes)


def _zero_one(target: pd.Series) -> bool:
    return set(target.dropna().unique().tolist()) <= {0, 1}


POSITIVE_WORDS = ("yes", "y", "true", "positive", "pos")


def _positive_label(target: pd.Series) -> tuple[str, str]:
    """The event of a two-label target: a label that reads as yes, else the rarer one."""
    counts = target.dropna().map(category_text).value_counts()
    for label in counts.index:
        if str(label).strip().lower() in POSITIVE_WORDS:
            return str(label), "it reads as yes"
    rarer = str(counts.index[-1])
    return rarer, f"the rarer label ({counts.iloc[-1]} of {int(counts.sum())} rows)"


def _with_positive_label(spec: dict[str, Any], positive: str) -> dict[str, Any]:
    """positive_label right after target, where a reader looks for it."""
    out: dict[str, Any] = {}
    for key, value in spec.items():
        out[key] = value
        if key == "target":
            out["positive_label"] = positive
    return out


def _task_of(target: pd.Series, name: str) -> str:
    """0/1 or two labels: binary; other numbers: regression; 3 to MAX_CATEGORIES labels of
    text: multiclass.
    (Whole numbers with few values may be classes too: pass --task then.)"""
    values = set(target.dropna().unique().tolist())
    if _zero_one(target) and len(values) == 2:
        return "binary_classification"
    if pd.api.types.is_numeric_dtype(target) and not pd.api.types.is_bool_dtype(target):
        return "regression"
    if len(values) == 2:  # two labels of text: positive_label says which is the event
        return "binary_classification"
    if 3 <= len(values) <= MAX_CATEGORIES:
        return "multiclass_classification"
    raise DataError(
        f"target {name!r} has values {sorted(map(str, values))[:10]}: modelyard takes a numeric "
        "target (regression), two labels (binary_classification) or 3 to "
        f"{MAX_CATEGORIES} labels (multiclass_classification); recode it, or pass --task"
    )


def _feature(name: Any, column: pd.Series) -> tuple[dict[str, Any] | None, str]:
    present = column.dropna()
    if present.empty or present.nunique() == 1:
        return None, "the same value in every row (or none): it cannot inform a prediction"
    if pd.api.types.is_datetime64_any_dtype(column) or looks_like_dates(present):
        return None, "dates or times: derive numbers from it (day of week, age in days)"
    missing = _allowed_missing(column)
    if pd.api.types.is_bool_dtype(column) or set(present.unique().tolist()) <= {True, False}:
        return _categorical(name, present, missing), ""
    if pd.api.types.is_numeric_dtype(column):
        low, high = _widened(present)
        return {"name": str(name), "type": "numeric", "min": low, "max": high,
                "max_missing": missing}, ""  # fmt: skip
    if present.nunique() > MAX_CATEGORIES:
        return None, (f"{present.nunique()} distinct texts: an identifier or free text, not a "
                      "category")  # fmt: skip
    return _categorical(name, present, missing), ""


def _categorical(name: Any, present: pd.Series, missing: float) -> dict[str, Any]:
    categories = sorted({category_text(v) for v in present})
    return {"name": str(name), "type": "categorical", "categories": categories,
            "max_missing": missing}  # fmt: skip


def _widened(values: pd.Series) -> tuple[float, float]:
    """The observed range with MARGIN of it on each side; a non-negative column stays so."""
    low, high = float(values.min()), float(values.max())
    pad = (high - low) * MARGIN or abs(high) * MARGIN or 1.0
    widened_low = low - pad if low < 0 else max(0.0, low - pad)
    return _round(widened_low, down=True), _round(high + pad, down=False)


def _round(value: float, down: bool) -> float:
    """Four significant digits, rounded outwards, so the spec reads well and stays wide."""
    if value == 0:
        return 0.0
    exponent = math.floor(math.log10(abs(value))) - 3
    steps = (math.floor if down else math.ceil)(value / 10.0**exponent)
    return round(steps * 10.0**exponent, max(0, -exponent))


def _allowed_missing(column: pd.Series) -> float:
    """Half as many gaps again as now, and at least one in a hundred, to two decimals."""
    share = float(column.isna().mean())
    return min(1.0, math.ceil((share * 1.5 + 0.01) * 100) / 100)


def _model_name(data: PurePosixPath) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", data.stem).strip("-.") or "model"
    return stem if stem[0].isalpha() else f"model-{stem}"


def _relative(data: Path, folder: Path) -> str:
    return os.path.relpath(data.resolve(), folder.resolve())
