"""Column-at-a-time validation (batch scoring) refuses exactly the rows the server's per-value
validation refuses, and feeds ONNX Runtime exactly the same values, for frames of every dtype
the batch reader produces and the odd values users' files hold."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from modelyard import screen
from modelyard.package.build import frame_columns
from modelyard.serve import codecs
from modelyard.serve.runtime import Column
from tests.conftest import examples

LEVELS = ["a", "b", "7", "true", "1"]
# Values a column of object dtype may hold after a CSV, Parquet or SQL read, and a few that
# only a user's own frame would: numpy scalars, bools, huge integers, containers.
ODD = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.booleans(),
    st.sampled_from([*LEVELS, "", "zz", "1.5"]),
    st.text(max_size=3),
    st.sampled_from([np.float64("nan"), np.float64(2.5), np.int64(3), np.str_("a"), pd.NA, [1]]),
)


@st.composite
def columns(draw: st.DrawFn, n: int) -> pd.Series:
    """A column of one of the dtypes pandas gives a read table."""
    dtype = draw(
        st.sampled_from(
            ["float64", "float32", "int64", "bool", "object", "category", "str", "Int64", "Float64"]
        )
    )
    if dtype in ("float64", "float32"):
        values = draw(st.lists(st.floats(width=32 if dtype == "float32" else 64), min_size=n,
                               max_size=n))  # fmt: skip
    elif dtype == "int64":
        values = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n))
    elif dtype == "bool":
        values = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    elif dtype in ("Int64", "Float64"):  # pandas' nullable numbers: missing is pd.NA
        values = draw(st.lists(st.one_of(st.none(), st.integers(-(2**53), 2**53)), min_size=n,
                               max_size=n))  # fmt: skip
    else:
        values = draw(st.lists(ODD, min_size=n, max_size=n))
        if dtype in ("category", "str"):  # text, missing as NaN
            values = [v if isinstance(v, str) else None for v in values]
    return pd.Series(values, dtype=dtype)


@st.composite
def frames(draw: st.DrawFn) -> tuple[pd.DataFrame, list[Column]]:
    n = draw(st.integers(1, 8))
    schema = [
        Column("x", "numeric", draw(st.booleans()), None,
               number_type=draw(st.sampled_from([np.float32, np.float64]))),
        Column("c", "categorical", draw(st.booleans()),
               draw(st.sampled_from([None, frozenset(LEVELS)]))),
    ]  # fmt: skip
    return pd.DataFrame({"x": draw(columns(n)), "c": draw(columns(n))}), schema


def _per_value(frame: pd.DataFrame, schema: list[Column], row: int) -> dict | None:
    """The server's verdict on one row: its feeds, or None when refused."""
    try:
        return codecs.to_feeds(frame_columns(frame.iloc[[row]]), schema, max_rows=2)[0]
    except codecs.ClientError:
        return None


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@settings(max_examples=examples(150), deadline=None)
@given(frames())
def test_screen_refuses_and_feeds_as_the_server_does(drawn):
    frame, schema = drawn
    feeds, refused = screen.feeds(frame, schema)
    for row in range(len(frame)):
        server = _per_value(frame, schema, row)
        assert refused[row] == (server is None), (row, frame.iloc[row].tolist())
        if server is not None:
            for name, values in server.items():
                ours = feeds[name][row, 0]
                assert feeds[name].dtype == values.dtype, name
                assert _same(ours.item() if hasattr(ours, "item") else ours,
                             values[0, 0].item() if hasattr(values[0, 0], "item")
                             else values[0, 0]), (name, row, frame.iloc[row].tolist())  # fmt: skip


def test_a_column_the_model_takes_but_the_table_lacks_is_left_to_the_per_value_path():
    schema = [Column("x", "numeric", False, None)]
    with pytest.raises(screen.Unjudged, match="no column 'x'"):
        screen.feeds(pd.DataFrame({"y": [1.0]}), schema)


# What a decoded request's column may hold: JSON's values, and the floats a CSV cell becomes.
REQUEST_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([*LEVELS, "", "zz"]),
)
# Columns as clients mostly send them (numbers or text, some missing), which the quick path
# takes, and columns of anything, which it must leave to the loop.
REQUEST_COLUMNS = st.one_of(
    st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(min_value=-(10**40), max_value=10**40)), min_size=1, max_size=12),
    st.lists(st.one_of(st.none(), st.sampled_from([*LEVELS, "", "zz"])), min_size=1, max_size=12),
    st.lists(REQUEST_VALUES, min_size=1, max_size=12),
)  # fmt: skip


def _validated(column: Column, values: list) -> list | str:
    """`codecs.validate`'s values for one column, or its error (message and field)."""
    try:
        return codecs.validate({column.name: values}, [column], max_rows=len(values))[0][
            column.name
        ]
    except codecs.ClientError as error:
        return f"{error.message} [{error.field}]"


@settings(max_examples=examples(150), deadline=None)
@example(values=["a", None], kind="categorical", nullable=False, levels=None)
@example(values=["a", "zz"], kind="categorical", nullable=True, levels=frozenset(LEVELS))
@example(values=[1.5, None], kind="numeric", nullable=False, levels=None)
@example(values=[1, 3.5e38], kind="numeric", nullable=True, levels=None)
@example(values=["a", 1], kind="categorical", nullable=True, levels=frozenset(LEVELS))
@given(values=REQUEST_COLUMNS, kind=st.sampled_from(["numeric", "categorical"]),
       nullable=st.booleans(), levels=st.sampled_from([None, frozenset(LEVELS)]))  # fmt: skip
def test_a_long_column_is_judged_at_once_as_the_loop_judges_it(values, kind, nullable, levels):
    """A request's column of `VECTOR_FROM` values or more is checked a column at a time; its
    values, or its error, equal the row-by-row loop's on the same column."""
    column = Column("x", kind, nullable, levels if kind == "categorical" else None)
    long = values * (1 + codecs.VECTOR_FROM // len(values))
    at_once = _validated(column, long)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(codecs, "VECTOR_FROM", len(long) + 1)  # the loop for every value
        one_by_one = _validated(column, long)
    if isinstance(one_by_one, str):
        assert at_once == one_by_one
    else:
        # A numeric column comes back as the float64 array its check made, text as a list.
        assert isinstance(at_once, np.ndarray if kind == "numeric" else list), type(at_once)
        listed = at_once.tolist() if isinstance(at_once, np.ndarray) else at_once
        assert len(listed) == len(one_by_one)
        assert all(map(_same, listed, one_by_one)), (listed[:12], one_by_one[:12])
