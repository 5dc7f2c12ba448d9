"""Request decoding and response encoding for both protocols, strict about what clients send.

Every client mistake becomes a `ClientError` (4xx) that names the field and the fix; nothing a
client sends can reach ONNX Runtime unvalidated. No pandas: columns are plain lists until they
become the (n, 1) arrays ONNX Runtime wants.

A `dataframe_split` body with the schema's columns in its order, the shape clients send most,
is first tried by `SplitDecoder`: msgspec decodes it into typed rows and checks every value while
it parses. Anything it does not take goes the general way below, which says what is wrong.
"""

from __future__ import annotations

import csv
import io
import math
import operator
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import orjson

from modelyard.bins import VECTOR_FROM, as_float64
from modelyard.serve.runtime import Column, Prediction
from modelyard.values import category_text

Columns = dict[str, list[Any]]
# Rows as `SplitDecoder` decodes them: one tuple per row, the schema's columns in order.
Rows = list[tuple[Any, ...]]
MLFLOW_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


class ClientError(Exception):
    def __init__(
        self, message: str, field: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status
        self.code = code or _ERROR_CODES.get(status, "BAD_REQUEST")

    def body(self) -> bytes:
        return orjson.dumps({"error_code": self.code, "message": self.message, "field": self.field})


_ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


def parse_json(body: bytes) -> Any:
    if not body:
        raise ClientError("empty request body; send JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"malformed JSON: {exc}") from None


# --- MLflow /invocations --------------------------------------------------------------------


def mlflow_columns(body: bytes, content_type: str, schema: list[Column]) -> Columns:
    if content_type.startswith("text/csv"):
        return csv_columns(body, schema)
    if not is_json(content_type):
        raise ClientError(
            f"unsupported Content-Type {content_type!r}; use application/json or text/csv",
            status=415,
        )
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise ClientError(f"the JSON body must be an object with one of {list(MLFLOW_KEYS)}")
    given = [k for k in MLFLOW_KEYS if k in payload]
    if len(given) != 1:
        raise ClientError(
            f"the JSON body must have exactly one of {list(MLFLOW_KEYS)}; it has {given or 'none'}"
        )
    key = given[0]
    value = payload[key]
    if key == "dataframe_split":
        return _split(value, schema)
    if key == "dataframe_records":
        return _records(value, key)
    return _loose(value, key, schema)


def is_json(content_type: str) -> bool:
    """What `/invocations` reads as JSON: a body with no Content-Type, or application/json
    (`content_type` lower-cased, its parameters cut)."""
    return not content_type or content_type.startswith("application/json")


def _split(value: Any, schema: list[Column]) -> Columns:
    if not isinstance(value, dict) or not isinstance(value.get("data"), list):
        raise ClientError(
            "dataframe_split must be {'columns': [...], 'data': [[...], ...]}",
            field="dataframe_split",
        )
    names = value.get("columns")
    if names is None or names == []:  # left out: the schema's order (`false` or 0 is refused)
        names = [c.name for c in schema]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ClientError(
            "dataframe_split.columns must be a list of names", field="dataframe_split.columns"
        )
    return _rows(value["data"], names, "dataframe_split.data")


def _rows(rows: Any, names: list[str], field: str) -> Columns:
    if not isinstance(rows, list):
        raise ClientError(f"{field} must be a list of rows", field=field)
    width = len(names)
    # Checked with C-level set/map first; the row-by-row loop only runs to name the bad row.
    if set(map(type, rows)) - _LIST or set(map(len, rows)) - {width}:
        for i, row in enumerate(rows):
            if type(row) is not list or len(row) != width:
                raise ClientError(
                    f"{field}[{i}] must be a list of {width} values ({names})", field=field
                )
    if not rows:
        return {name: [] for name in names}
    return dict(zip(names, map(list, zip(*rows, strict=True)), strict=True))


def _records(records: Any, field: str) -> Columns:
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ClientError(f"{field} must be a list of objects, one per row", field=field)
    names = {k for r in records for k in r}
    return {name: [r.get(name) for r in records] for name in names}


def _loose(value: Any, field: str, schema: list[Column]) -> Columns:
    """`instances`/`inputs`: columns as an object of lists, records, or rows in schema order."""
    if isinstance(value, dict):
        columns = {k: v if isinstance(v, list) else [v] for k, v in value.items()}
        return columns
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return _records(value, field)
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return _rows(value, [c.name for c in schema], field)
    raise ClientError(
        f"{field} must be an object of columns, a list of records or a list of rows", field=field
    )


class SplitDecoder:
    """`dataframe_split` bodies whose columns are the schema's in its order (or left out),
    decoded and checked in one pass: msgspec parses each row into a tuple of the schema's types,
    numbers within float32's range, categories among the declared ones, null only where a column
    may be missing. Timed side by side on a 10,000-row body, the typed decode took a third of
    orjson's plain parse alone (rows become tuples, and category strings are the declared ones,
    not new objects), and the checks a column at a time after that parse are gone.

    `rows` gives the rows, which `columns_of` turns into what `validate` would give, or None
    for anything else (another shape, another column order, a value to refuse, integer codes for
    a category, too many rows): the general path then answers, in its own words. Rows, not
    columns: the batcher turns a whole batch's rows into columns at once (`columns_of`), where
    one-row requests' columns cost a join per column and request."""

    def __init__(self, schema: list[Column]) -> None:
        # Built at run time from the schema: tuple[...] and list[...] of values, not of names.
        rows = list.__class_getitem__(tuple.__class_getitem__(tuple(map(_decoded_type, schema))))
        split = msgspec.defstruct("Split", [("data", rows), ("columns", list[str] | None, None)])
        others = [(key, msgspec.Raw | msgspec.UnsetType, msgspec.UNSET) for key in MLFLOW_KEYS[1:]]
        body = msgspec.defstruct("Body", [("dataframe_split", split), *others])
        self._decoder = msgspec.json.Decoder(body)
        self._names = [c.name for c in schema]
        # The other shapes' fields, all of which a dataframe_split body leaves unset.
        self._others = operator.attrgetter(*MLFLOW_KEYS[1:])
        self._unset = (msgspec.UNSET,) * (len(MLFLOW_KEYS) - 1)

    def rows(self, body: bytes, max_rows: int) -> Rows | None:
        try:
            payload: Any = self._decoder.decode(body)
        except msgspec.MsgspecError:
            return None
        if self._others(payload) != self._unset:
            return None  # more than one shape: refused by the general path
        split = payload.dataframe_split
        rows: Rows = split.data
        if (split.columns and split.columns != self._names) or not 0 < len(rows) <= max_rows:
            return None
        return rows


def columns_of(rows: Rows, schema: list[Column]) -> Values:
    """`SplitDecoder`'s rows as `validate` gives columns: NaN or "" for missing; a long numeric
    column as float64 (numpy reads None as NaN there). A column that may hold no null is used as
    it comes out of the transpose."""
    values: dict[str, list[Any] | np.ndarray] = dict(
        zip([c.name for c in schema], map(list, zip(*rows, strict=True)), strict=True)
    )
    long = len(rows) >= VECTOR_FROM
    for column in schema:
        if long and column.kind == "numeric":
            values[column.name] = np.asarray(values[column.name], dtype=np.float64)
        elif column.nullable and None in values[column.name]:
            missing = math.nan if column.kind == "numeric" else ""
            values[column.name] = [missing if v is None else v for v in values[column.name]]
    return values


def _decoded_type(column: Column) -> Any:
    """The type msgspec checks a column's values against (`_numeric`'s and `_categorical`'s rules
    for JSON values, but for category codes, which the general path turns into text)."""
    kind: Any
    if column.kind == "numeric":
        kind = Annotated[float, msgspec.Meta(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
    elif column.categories is not None:
        kind = Literal[tuple(sorted(column.categories))]
    else:
        kind = str
    return kind | None if column.nullable else kind


def csv_columns(body: bytes, schema: list[Column]) -> Columns:
    try:
        reader = csv.reader(io.StringIO(body.decode("utf-8")))
        header = next(reader, None)
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ClientError(f"malformed CSV: {exc}") from None
    if not header:
        raise ClientError("CSV needs a header row with the column names")
    kinds = {c.name: c.kind for c in schema}
    columns: Columns = {name: [] for name in header}
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ClientError(f"CSV line {line} has {len(row)} cells, the header {len(header)}")
        for name, cell in zip(header, row, strict=True):
            columns[name].append(_csv_cell(cell, kinds.get(name), name, line))
    return columns


def _csv_cell(cell: str, kind: str | None, name: str, line: int) -> Any:
    if cell == "":
        return None
    if kind != "numeric":
        return cell
    try:
        return float(cell)
    except ValueError:
        raise ClientError(
            f"column {name!r}: {cell!r} on CSV line {line} is not a number", field=name
        ) from None


# --- Open Inference Protocol V2 -----------------------------------------------------------------


def v2_columns(body: bytes) -> tuple[Columns, list[str] | None, Any]:
    """Named input tensors → columns; also the requested output names and the request id."""
    payload = parse_json(body)
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise ClientError(
            "a V2 inference request needs 'inputs': a list of tensors", field="inputs"
        )
    columns: Columns = {}
    for i, tensor in enumerate(payload["inputs"]):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise ClientError(
                f"inputs[{i}] must be a tensor object with a 'name'", field=f"inputs[{i}]"
            )
        name = tensor["name"]
        data = tensor.get("data")
        if not isinstance(data, list):
            raise ClientError(f"input {name!r}: 'data' must be a list", field=name)
        data = _flatten(data)
        shape = tensor.get("shape")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) for d in shape)
            or math.prod(shape) != len(data)
        ):
            raise ClientError(
                f"input {name!r}: shape {shape} does not match {len(data)} values", field=name
            )
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise ClientError(
                f"input {name!r}: one column per input, shape [n] or [n, 1]", field=name
            )
        if tensor.get("datatype") == "BYTES":
            data = [v.decode() if isinstance(v, bytes) else v for v in data]
        columns[name] = data
    outputs = payload.get("outputs")
    wanted = None
    if isinstance(outputs, list):
        wanted = [str(o.get("name")) for o in outputs if isinstance(o, dict)]  # None: unknown
    return columns, wanted, payload.get("id")


def _flatten(data: list[Any]) -> list[Any]:
    if data and all(isinstance(v, list) for v in data):
        return [x for row in data for x in row]
    return data


# --- validation into ONNX feeds ---------------------------------------------------------------


# Validated columns: floats (NaN for missing) or strings ("" for missing). A long numeric column
# stays the float64 array its check made: to_arrays and the drift bins take it as it is (turned
# back into a list of floats and into an array again, it cost a 10,000-row request 1.5 ms).
Values = Mapping[str, list[Any] | np.ndarray]
FLOAT32_MAX = float(np.finfo(np.float32).max)  # numeric inputs are float32 tensors
_LIST = frozenset({list})
_NUMBERS: frozenset[type] = frozenset({int, float, type(None)})
_TEXT, _TEXT_OR_NONE, _NONE = frozenset({str}), frozenset({str, type(None)}), frozenset({None})


def to_feeds(
    columns: Columns, schema: list[Column], max_rows: int
) -> tuple[dict[str, np.ndarray], int]:
    values, n = validate(columns, schema, max_rows)
    return to_arrays(values, schema), n


def validate(columns: Columns, schema: list[Column], max_rows: int) -> tuple[Values, int]:
    """Check every value against the schema; returns plain lists, ready to become arrays."""
    missing = [c.name for c in schema if c.name not in columns]
    if missing:
        raise ClientError(
            f"missing input column(s) {missing}; the model takes {[c.name for c in schema]}",
            field=missing[0],
        )
    lengths = {c.name: len(columns[c.name]) for c in schema}
    n = lengths[schema[0].name]
    if n == 0:
        raise ClientError("no rows to predict")
    uneven = {k: v for k, v in lengths.items() if v != n}
    if uneven:
        raise ClientError(f"columns differ in length: {lengths}", field=next(iter(uneven)))
    if n > max_rows:
        # 413 like an oversized body (the client must send less), told apart by its code.
        raise ClientError(f"{n} rows is more than the {max_rows} allowed per request",
                          status=413, code="TOO_MANY_ROWS")  # fmt: skip
    values = {
        c.name: (_numeric if c.kind == "numeric" else _categorical)(c, columns[c.name])
        for c in schema
    }
    return values, n


def to_arrays(values: Values, schema: list[Column]) -> dict[str, np.ndarray]:
    """ONNX Runtime's feeds: an (n, 1) array per input, built once per batch, not per request."""
    return {c.feed: np.asarray(values[c.name], dtype=c.dtype).reshape(-1, 1) for c in schema}


def _missing(column: Column, row: int) -> ClientError:
    return ClientError(
        f"{column.name!r} is missing at row {row}; the schema forbids missing values for it",
        field=column.name,
    )


def _numeric(column: Column, values: list[Any]) -> list[float] | np.ndarray:
    if len(values) >= VECTOR_FROM:
        checked = _all_numbers(column, values)
        if checked is not None:
            return checked
    out: list[float] = []
    append = out.append
    for i, value in enumerate(values):
        kind = type(value)  # `type is`, not isinstance: a bool is not a number here
        if (kind is int or kind is float) and -FLOAT32_MAX <= value <= FLOAT32_MAX:
            append(float(value))
        elif value is None or (kind is float and math.isnan(value)):
            if not column.nullable:
                raise _missing(column, i)
            append(math.nan)
        elif kind is int or kind is float:
            raise ClientError(
                f"{column.name!r}: {str(value)[:24]} at row {i} is not a finite number within the "
                f"model's float32 range (±{FLOAT32_MAX:.3g})",
                field=column.name,
            )
        else:
            raise ClientError(
                f"{column.name!r} must be a number; row {i} has {value!r}", field=column.name
            )
    return out


def _all_numbers(column: Column, values: list[Any]) -> np.ndarray | None:
    """The column as float64 (NaN for missing) when every value is an int or a float within
    float32's range, or missing where the column may be; checked a column at a time. None
    otherwise: the loop then finds the row to name."""
    numbers = as_float64(values, _NUMBERS)  # `type is`: a bool is not a number here
    if numbers is None:
        return None
    fits = np.abs(numbers) <= FLOAT32_MAX  # False for NaN and infinities
    if not fits.all() and not (column.nullable and (fits | np.isnan(numbers)).all()):
        return None
    return numbers


def _all_texts(column: Column, values: list[Any]) -> list[str] | None:
    """The column when every value is known text, or missing where the column may be (made
    ""); checked a column at a time. None otherwise (codes to turn into text, a value to
    refuse): the loop does it, row by row."""
    kinds = set(map(type, values))
    if not (kinds == _TEXT or (kinds == _TEXT_OR_NONE and column.nullable)):
        return None
    if column.categories is not None and not column.categories.issuperset(set(values) - _NONE):
        return None
    if kinds == _TEXT:
        return values
    return ["" if v is None else v for v in values]  # the model's level for a missing category


def _categorical(column: Column, values: list[Any]) -> list[str]:
    if len(values) >= VECTOR_FROM:
        checked = _all_texts(column, values)
        if checked is not None:
            return checked
    out: list[str] = []
    append = out.append
    allowed = column.categories
    for i, value in enumerate(values):
        kind = type(value)
        if kind is int or kind is bool or (kind is float and math.isfinite(value)):
            value = category_text(value)  # integer codes and booleans, as in training
            kind = str
        if kind is str:
            if allowed is not None and value not in allowed:
                raise ClientError(
                    f"{column.name!r}: {value!r} at row {i} is not one of {sorted(allowed)}",
                    field=column.name,
                )
            append(value)
        elif value is None:
            if not column.nullable:
                raise _missing(column, i)
            append("")  # the model's level for a missing category
        else:
            raise ClientError(
                f"{column.name!r} must be a category (text, an integer code or true/false); "
                f"row {i} has {value!r}",
                field=column.name,
            )
    return out


# --- responses --------------------------------------------------------------------------------


def mlflow_response(prediction: Prediction) -> bytes:
    """What `mlflow models serve` returns for a scikit-learn model: predict() per row."""
    return orjson.dumps({"predictions": _plain(prediction.values)},
                        option=orjson.OPT_SERIALIZE_NUMPY)  # fmt: skip


_V2_TYPES = {"f": "FP64", "O": "BYTES", "U": "BYTES"}  # numpy dtype kind -> V2 datatype


def _plain(values: np.ndarray) -> Any:
    """numpy arrays of numbers go out as they are; text labels (object arrays) as a list."""
    return values.tolist() if values.dtype.kind in "OU" else values


def v2_outputs(prediction: Prediction, wanted: list[str] | None) -> list[dict[str, Any]]:
    n = len(prediction.values)
    available = {
        "predict": {
            "name": "predict",
            "shape": [n],
            "data": _plain(prediction.values),
            "datatype": _V2_TYPES.get(prediction.values.dtype.kind, "INT64"),
        },
    }
    probabilities = prediction.probabilities
    if probabilities is not None:
        if probabilities.ndim == 1:  # binary: the positive class's; both columns go out
            probabilities = np.column_stack([1 - probabilities, probabilities])
        available["predict_proba"] = {
            "name": "predict_proba",
            "shape": list(probabilities.shape),
            "datatype": "FP64",
            "data": probabilities.reshape(-1),
        }
    if not wanted:
        return list(available.values())
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise ClientError(
            f"unknown output(s) {unknown}; available: {list(available)}", field="outputs"
        )
    return [available[w] for w in wanted]
