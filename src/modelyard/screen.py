"""A table checked against a served model's inputs a column at a time, at numpy's speed.

Batch scoring must refuse exactly the rows the server would refuse and feed ONNX Runtime exactly
what the server would (`serve.codecs`, one value at a time in Python, where 200,000 rows took
seconds). Here a column held in a numpy array of numbers or booleans is judged as a whole;
one of objects or of pandas' own dtypes (text, nullable integers, categories) has the type of
each value read at C speed and only the few values that are neither text nor missing looked at
in Python. The verdict per row and the feed values equal what
`codecs.to_feeds(frame_columns(rows))` gives row by row (tests/test_screen.py draws frames of
every dtype to hold the two equal).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from modelyard.serve import codecs
from modelyard.serve.codecs import FLOAT32_MAX
from modelyard.serve.runtime import Column
from modelyard.values import category_text

Judged = tuple[np.ndarray, np.ndarray]  # (feed values for every row, rows refused)


def feeds(frame: pd.DataFrame, schema: list[Column]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """ONNX feeds ((n, 1) arrays) for every row of `frame`, and a mask of the rows the server
    would refuse (their feed values are placeholders). Raises `Unjudged` when the table lacks a
    column the model takes (the per-value path names it for each row)."""
    refused = np.zeros(len(frame), dtype=bool)
    judged: dict[str, Any] = {}
    for column in schema:
        if column.name not in frame:
            raise Unjudged(f"no column {column.name!r}")
        judge = _numeric if column.kind == "numeric" else _categorical
        judged[column.name], bad = judge(column, frame[column.name])
        refused |= bad
    return codecs.to_arrays(judged, schema), refused  # the server's own feed shapes and types


class Unjudged(Exception):
    """A table this module does not judge (it lacks a column): use the per-value path."""


def _numeric(column: Column, series: pd.Series) -> Judged:
    kind = _numpy_kind(series)
    if kind in ("i", "u", "f"):
        numbers = series.to_numpy(dtype=np.float64)
        missing = np.isnan(numbers) if kind == "f" else np.zeros(len(numbers), dtype=bool)
    elif kind == "b":  # a bool is not a number to the server
        return np.zeros(len(series)), np.ones(len(series), dtype=bool)
    else:
        numbers, missing = _object_numbers(_listed(series))
    with np.errstate(invalid="ignore"):
        in_range = np.abs(numbers) <= FLOAT32_MAX  # False for NaN, inf and non-numbers
    refused = ~in_range & ~(missing & column.nullable)
    return np.where(in_range, numbers, np.nan), refused


def _numpy_kind(series: pd.Series) -> str:
    """The numpy kind of a column held in a numpy array; "" for pandas' own dtypes (text,
    nullable integers, categories), whose values are judged one by one as listed."""
    dtype = series.dtype
    return "" if isinstance(dtype, pd.api.extensions.ExtensionDtype) else dtype.kind


def _listed(series: pd.Series) -> np.ndarray:
    """The column's values as `frame_columns` hands them to the server's decoder."""
    values = np.empty(len(series), dtype=object)
    values[:] = series.tolist()
    return values


def _object_numbers(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numbers where the value is an int or a float (exactly: not a bool, not a numpy scalar,
    as the server's decoder sees JSON), NaN elsewhere; and where it is missing (None, NaN)."""
    numbers = np.full(len(values), np.nan)
    missing = np.zeros(len(values), dtype=bool)
    for i, value in enumerate(values):
        kind = type(value)
        if kind is float:
            numbers[i] = value
            missing[i] = value != value  # NaN
        elif kind is int:
            numbers[i] = float(value) if abs(value) <= FLOAT32_MAX else np.inf
        elif value is None or (isinstance(value, float) and value != value):
            missing[i] = True  # a NaN of numpy's too: `frame_columns` sends it as null
    return numbers, missing


def _categorical(column: Column, series: pd.Series) -> Judged:
    kind, n = _numpy_kind(series), len(series)
    missing, wrong = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    if kind in ("i", "u"):
        text = series.astype(str).to_numpy(dtype=object)
    elif kind == "b":
        text = np.where(series.to_numpy(), "true", "false").astype(object)
    else:
        text, missing, wrong = _object_texts(_listed(series))
    text[missing | wrong] = ""  # the model's level for a missing category
    refused = wrong | (missing & (not column.nullable))
    if column.categories is not None:
        refused |= ~pd.Series(text).isin(column.categories).to_numpy() & ~missing
    return text, refused


def _object_texts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each value's category text as the server makes it (text as it is; integer codes,
    booleans and finite floats by `category_text`), which are missing (None, or a NaN, which
    `frame_columns` sends as null), and which the server refuses as no category at all."""
    kinds = np.fromiter(map(type, values), dtype=object, count=len(values))
    text = values.copy()
    is_text, missing = _are(kinds, str), _are(kinds, type(None))
    coded = _are(kinds, int) | _are(kinds, bool)
    for i in np.flatnonzero(~is_text & ~missing & ~coded):  # floats and the unknown
        value = values[i]
        if isinstance(value, float) and value != value:
            missing[i] = True
        elif type(value) is float and math.isfinite(value):
            coded[i] = True
    text[coded] = [category_text(v) for v in values[coded]]
    wrong = ~(is_text | missing | coded)
    return text, missing, wrong


def _are(kinds: np.ndarray, kind: type) -> np.ndarray:
    """Where the type is exactly `kind` (a subclass is not: `type is`, as the decoder tests),
    compared in C over the array of types."""
    same: np.ndarray = np.equal(kinds, np.array(kind, dtype=object))
    return same
