"""The batcher and the metrics it feeds: requests that arrive in one turn of the loop share one
prediction whichever way each was decoded (the one-pass decoder's rows or the general path's
columns), each gets its own rows' answers back, and the batches' rows are counted into the
histogram and drift bins exactly as if each batch were counted alone."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelyard.bins import categorical_bins, numeric_bins
from modelyard.serve import codecs
from modelyard.serve.batching import Batcher
from modelyard.serve.metrics import BIN_ROWS, PROBABILITY_BUCKETS, Metrics
from modelyard.serve.runtime import Column, Prediction
from tests.conftest import examples

SCHEMA = [
    Column("age", "numeric", True, None),
    Column("device", "categorical", True, frozenset({"desktop", "mobile"})),
    Column("clicks", "numeric", False, None),
]
DEVICE_CODES = {"desktop": 0.25, "mobile": 0.5, "": 0.75}


class EchoRuntime:
    """Answers each row with a number made of its values: an answer shows whose row it was."""

    columns = SCHEMA

    def __init__(self) -> None:
        self.batches: list[int] = []

    def predict(self, feeds: dict[str, np.ndarray]) -> Prediction:
        age, clicks = feeds["age"][:, 0], feeds["clicks"][:, 0]
        devices = np.array([DEVICE_CODES[d] for d in feeds["device"][:, 0]])
        self.batches.append(len(age))
        return Prediction(np.where(np.isnan(age), -1.0, age) * 1e6 + clicks * 10 + devices, None)


ROW = st.tuples(
    st.one_of(st.none(), st.integers(0, 120), st.floats(0, 120)),
    st.sampled_from([None, "desktop", "mobile"]),
    st.integers(0, 99),
)
# A request: its rows (a long one's numeric columns become arrays) and whether it comes as
# dataframe_split through the one-pass decoder or as `inputs` through the general path.
REQUEST = st.tuples(
    st.lists(ROW, min_size=1, max_size=4) | st.lists(ROW, min_size=64, max_size=80),
    st.booleans(),
)


def _submitted(rows: list[tuple[Any, ...]], decoded: bool) -> codecs.Values | codecs.Rows:
    """What the app hands the batcher for these rows, as a client would send them."""
    if decoded:
        body = json.dumps({"dataframe_split": {"data": [list(r) for r in rows]}}).encode()
        split = codecs.SplitDecoder(SCHEMA).rows(body, max_rows=100)
        assert split is not None, rows
        return split
    columns = {c.name: [r[i] for r in rows] for i, c in enumerate(SCHEMA)}
    body = json.dumps({"inputs": columns}).encode()
    values, _ = codecs.validate(codecs.mlflow_columns(body, "application/json", SCHEMA), SCHEMA,
                                max_rows=100)  # fmt: skip
    return values


def _plain(values: Any) -> list[Any]:
    listed = values.tolist() if isinstance(values, np.ndarray) else list(values)
    return ["nan" if isinstance(v, float) and math.isnan(v) else v for v in listed]


@settings(max_examples=examples(60), deadline=None)
@given(requests=st.lists(REQUEST, min_size=1, max_size=12))
def test_a_batch_of_decoded_rows_and_validated_columns_answers_each_request_its_own_rows(
    requests: list[tuple[list[tuple[Any, ...]], bool]],
) -> None:
    runtime = EchoRuntime()
    observed: list[tuple[codecs.Values, Prediction]] = []
    alone = [
        runtime.predict(codecs.to_arrays(codecs.validate(
            {c.name: [r[i] for r in rows] for i, c in enumerate(SCHEMA)}, SCHEMA, max_rows=100
        )[0], SCHEMA)).values
        for rows, _ in requests
    ]  # fmt: skip
    runtime.batches.clear()

    async def in_one_turn() -> list[Prediction | Exception]:
        batcher = Batcher(runtime, lambda columns, p: observed.append((columns, p)))  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        answers = [loop.create_future() for _ in requests]
        for (rows, decoded), answer in zip(requests, answers, strict=True):
            batcher.submit(_submitted(rows, decoded), len(rows), answer.set_result)
        done = await asyncio.gather(*answers)
        await asyncio.sleep(0)  # the batch's observation is queued after its answers
        return done

    answers = asyncio.run(in_one_turn())
    assert runtime.batches == [sum(len(rows) for rows, _ in requests)]  # one prediction
    for answer, expected in zip(answers, alone, strict=True):
        assert isinstance(answer, Prediction)
        np.testing.assert_array_equal(answer.values, expected)
    [(columns, _)] = observed
    for i, column in enumerate(SCHEMA):
        sent = [r[i] for rows, _ in requests for r in rows]
        missing = math.nan if column.kind == "numeric" else ""
        assert _plain(columns[column.name]) == _plain([missing if v is None else v for v in sent])


def _metrics(drift: bool) -> Metrics:
    ages = numeric_bins([float(a) for a in range(100)])
    devices = categorical_bins(["desktop", "mobile"], ["desktop", "mobile"])
    reference = {
        "features": {"age": ages.to_json(), "device": devices.to_json()},
        "prediction": numeric_bins([i / 100 for i in range(100)]).to_json(),
    }
    return Metrics("ads", "1", "0" * 64, list(PROBABILITY_BUCKETS), reference if drift else None)


def _counts(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


@pytest.mark.parametrize("drift", [True, False], ids=["drift bins", "no reference"])
def test_batches_rows_are_counted_once_enough_have_come_as_each_batch_would_be_alone(
    drift: bool,
) -> None:
    rng = np.random.default_rng(7)
    batches: list[tuple[codecs.Values, Prediction]] = []
    # Lists and arrays, past BIN_ROWS in all, with a batch past BIN_ROWS alone among them.
    for size in [3, 1, 4, 70, 2] * 8 + [2000] + [3, 1, 4, 70, 2] * 8:
        ages = rng.uniform(-10, 130, size)
        ages[rng.random(size) < 0.1] = math.nan
        devices = rng.choice(["desktop", "mobile", "tablet", ""], size).tolist()
        columns = {"age": ages if size >= 64 else ages.tolist(), "device": devices}
        batches.append((columns, Prediction(rng.integers(0, 2, size), rng.random(size))))

    async def serving() -> tuple[Metrics, Metrics]:  # on a loop, as the server counts
        together, each = _metrics(drift), _metrics(drift)
        for columns, prediction in batches:
            before = together._waiting.rows
            counted = sum(together._predictions.counts)
            together.observe_batch(columns, prediction)
            each.observe_predictions(prediction.scores, prediction.drift_values)
            each.observe_inputs(columns)
            rows, waiting = len(prediction.values), together._waiting.rows
            if rows >= BIN_ROWS:  # counted at once, alone
                assert (waiting, sum(together._predictions.counts)) == (before, counted + rows)
            elif before + rows < BIN_ROWS:  # waits for more, or for the flush
                assert (waiting, sum(together._predictions.counts)) == (before + rows, counted)
            else:  # enough have come: counted together
                assert (waiting, sum(together._predictions.counts)) == (0, counted + before + rows)
        assert together._waiting.rows > 0
        together.flush()
        each.flush()
        return together, each

    together, each = asyncio.run(serving())
    assert _counts(together) == pytest.approx(_counts(each), rel=1e-12)
    rows = sum(len(p.values) for _, p in batches)
    assert _counts(together)[("modelyard_predicted_rows_total", ())] == rows
