"""Bad input, generated: schemathesis drives the live serving app from its own OpenAPI document,
and hypothesis throws mutated specs at the spec loader and arbitrary JSON at the codecs. None of
it may produce a 500, a crash or an exception other than the clear, field-naming error."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from modelyard.errors import SpecError
from modelyard.serve import codecs
from modelyard.serve.codecs import ClientError
from modelyard.serve.runtime import Column
from modelyard.spec import load_spec
from tests.conftest import ROOT, examples
from tests.serving import TOKEN, Built, Server, build_example

MAX_ROWS, MAX_BODY_BYTES = 20, 8192
EXAMPLE = yaml.safe_load((ROOT / "examples" / "ad_clicks" / "modelyard.yaml").read_text())
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


# --- the serving app, from its OpenAPI document --------------------------------------------------


@pytest.fixture(scope="module")
def ads(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_example("ad_clicks", tmp_path_factory.mktemp("fuzz-ads"))


@pytest.fixture(scope="module")
def server(ads: Built) -> Iterator[Server]:
    # Limits low enough that generated bodies cross them, in both modes.
    server = Server(ads.bundle.path, ads.public_key, workers=1,
                    MODELYARD_SERVE_MAX_ROWS=str(MAX_ROWS),
                    MODELYARD_SERVE_MAX_BODY_BYTES=str(MAX_BODY_BYTES)).start()  # fmt: skip
    yield server
    log = server.stop()
    assert "Traceback" not in log, log[-3000:]  # nothing the fuzzer sent crashed a handler


def fuzz_config(document: dict[str, Any]) -> SchemathesisConfig:
    """Schemathesis told what the document promises. Every request carries the valid token
    through the security scheme, and no Authorization header is generated: a generated header
    that the test then overwrote was once counted as the invalid part of a request that was sent
    valid. (Schemathesis's `ignored_auth` check still sends each operation without the token and
    expects the declared 401.) Per operation, invalid data must get one of the 4xx statuses that
    operation declares."""
    operations = [
        {"include-path": path, "include-method": method.upper(),
         "checks": {"negative_data_rejection": {"expected-statuses": declared_rejections(op)}}}
        for path, methods in document["paths"].items() for method, op in methods.items()
    ]  # fmt: skip
    return SchemathesisConfig.from_dict(
        {
            "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
            "operations": operations,
            "generation": {"with-security-parameters": False},
        }
    )


def declared_rejections(operation: dict[str, Any]) -> list[str]:
    return sorted(status for status in operation["responses"] if status.startswith("4"))


@pytest.mark.hypothesis  # its @given is inside: marked so a failure names the session's seed
@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_no_request_gets_a_server_error(server: Server, mode: Any) -> None:
    """Every operation of the document, with bodies that fit it (positive) and bodies that
    break it (negative): a 2xx or a 4xx the operation declares, with a JSON error, never a
    5xx, and every response as the document describes it. (Schema-valid bodies may still get a
    400 where JSON Schema cannot state the rule, such as equal column lengths or a CSV header,
    so schemathesis's positive-data check is off; invalid bodies must be rejected.)"""
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    api = schemathesis.openapi.from_dict(document, config=fuzz_config(document))
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) == 13  # both infer routes, MLflow, health, metadata, metrics
    for operation in operations:
        if mode is schemathesis.GenerationMode.NEGATIVE and not len(operation.body):
            continue  # a GET without parameters has no invalid form

        @settings(max_examples=examples(25), deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            case.call_and_validate(base_url=server.url, excluded_checks=[positive_data_acceptance])

        check()


def test_row_and_byte_limits_are_declared_for_every_operation_that_enforces_them(
    server: Server,
) -> None:
    """The limits the fuzzer checks against are the document's: every operation with a body
    declares 413 and names both limits, and `dataframe_split`/`dataframe_records` carry the row
    limit as `maxItems`."""
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    with_body = {path: op["post"] for path, op in document["paths"].items() if "post" in op}
    assert len(with_body) == 3
    for path, operation in with_body.items():
        assert "413" in declared_rejections(operation), path
        description = operation["responses"]["413"]["description"]
        assert f"{MAX_ROWS} rows" in description and f"{MAX_BODY_BYTES} bytes" in description, (
            path,
            description,
        )
    body = document["paths"]["/invocations"]["post"]["requestBody"]["content"]["application/json"]
    shapes = body["schema"]["oneOf"]
    assert shapes[0]["properties"]["dataframe_split"]["properties"]["data"]["maxItems"] == MAX_ROWS
    assert all(shape["properties"][key]["maxItems"] == MAX_ROWS for shape in shapes[1:]
               for key in shape["properties"])  # fmt: skip


def test_a_request_over_either_limit_gets_the_documented_413(server: Server) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    row = [30.0, "female", 1.0, 2.0, 3.0, "mobile"]
    rows = httpx.post(f"{server.url}/invocations", headers=auth, timeout=30,
                      json={"dataframe_split": {"data": [row] * (MAX_ROWS + 1)}})  # fmt: skip
    assert rows.status_code == 413, rows.text
    assert rows.json()["error_code"] == "TOO_MANY_ROWS"
    assert (
        rows.json()["message"]
        == f"{MAX_ROWS + 1} rows is more than the {MAX_ROWS} allowed per request"
    )
    big = httpx.post(f"{server.url}/invocations", headers=auth, timeout=30,
                     content=b"[" + b" " * MAX_BODY_BYTES + b"]")  # fmt: skip
    assert big.status_code == 413, big.text
    assert big.json()["error_code"] == "PAYLOAD_TOO_LARGE"


def test_openapi_document_describes_the_model(server: Server, ads: Built) -> None:
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    name = ads.spec.name
    assert f"/v2/models/{name}/infer" in document["paths"]
    split = document["paths"]["/invocations"]["post"]["requestBody"]["content"]["application/json"]
    row = split["schema"]["oneOf"][0]["properties"]["dataframe_split"]["properties"]["data"]
    columns = row["items"]["prefixItems"]
    assert len(columns) == len(ads.spec.features)
    device = next(c for c in columns if "enum" in c and "tablet" in c["enum"])
    assert None in device["enum"]  # device may be missing: the schema says so
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


# --- the codecs -----------------------------------------------------------------------------------

SCHEMA = [Column("age", "numeric", True, None), Column("device", "categorical", False,
                                                         frozenset({"desktop", "mobile"}))]  # fmt: skip


@settings(max_examples=examples(300), deadline=None)
@given(payload=JSON_VALUES, key=st.sampled_from([*codecs.MLFLOW_KEYS, "other"]))
def test_codecs_answer_any_json_with_columns_or_a_client_error(payload: Any, key: str) -> None:
    for body in (json.dumps({key: payload}).encode(), json.dumps(payload).encode()):
        try:
            columns = codecs.mlflow_columns(body, "application/json", SCHEMA)
            codecs.validate(columns, SCHEMA, max_rows=100)
        except ClientError as exc:
            assert exc.status in (400, 413, 415) and exc.message
        try:
            columns, _, _ = codecs.v2_columns(body)
            codecs.validate(columns, SCHEMA, max_rows=100)
        except ClientError as exc:
            assert exc.status in (400, 413) and exc.message


CELLS = st.lists(JSON_VALUES | st.sampled_from(["desktop", "mobile", 1.5, None]), max_size=5)
SHAPED = st.one_of(
    st.fixed_dictionaries({"age": CELLS, "device": CELLS}).map(lambda c: {"inputs": c}),
    st.lists(st.fixed_dictionaries({"age": JSON_VALUES, "device": JSON_VALUES}), max_size=4)
    .map(lambda r: {"dataframe_records": r}),
    st.lists(st.lists(JSON_VALUES, min_size=2, max_size=2), max_size=4)
    .map(lambda d: {"dataframe_split": {"columns": ["age", "device"], "data": d}}),
)  # fmt: skip


@settings(max_examples=examples(300), deadline=None)
@given(payload=SHAPED)
def test_codecs_validate_any_values_in_the_right_columns(payload: dict) -> None:
    """Bodies shaped like real requests, with arbitrary values where the schema's go: every
    value check (numbers, float32 range, categories, missing) answers valid columns or a 400."""
    try:
        columns = codecs.mlflow_columns(json.dumps(payload).encode(), "application/json", SCHEMA)
        values, rows = codecs.validate(columns, SCHEMA, max_rows=100)
        codecs.to_arrays(values, SCHEMA)
        assert rows == len(values["age"]) == len(values["device"])
    except ClientError as exc:
        assert exc.status in (400, 413) and exc.message


@settings(max_examples=examples(100), deadline=None)
@given(
    body=st.binary(max_size=64),
    content_type=st.sampled_from(["text/csv", "application/json", "text/plain", ""]),
)
def test_codecs_answer_any_bytes_with_columns_or_a_client_error(
    body: bytes, content_type: str
) -> None:
    try:
        codecs.validate(codecs.mlflow_columns(body, content_type, SCHEMA), SCHEMA, max_rows=100)
    except ClientError as exc:
        assert exc.status in (400, 413, 415) and exc.message


# A schema of every kind of column the one-pass decoder types differently.
WIDE = [
    *SCHEMA,
    Column("clicks", "numeric", False, None),
    Column("note", "categorical", True, None),
]
WIDE_CELL = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False),
    st.none(),
    st.booleans(),
    st.sampled_from(["desktop", "mobile", "tablet", ""]),
    st.sampled_from([3.5e38, -1e39, 1e300, 2**128, 7]),  # past float32's range; a category code
    JSON_VALUES,
)


def _fitting(column: Column) -> st.SearchStrategy:
    """Values the column takes as they are: most rows are a client's plain request."""
    if column.kind == "numeric":
        kind = st.integers(-(10**9), 10**9) | st.floats(-1e30, 1e30, allow_nan=False)
    elif column.categories is not None:
        kind = st.sampled_from(sorted(column.categories))
    else:
        kind = st.text(max_size=5)
    return kind | st.none() if column.nullable else kind


# Half the bodies are plain requests; in the others, three values in four fit their column.
WIDE_ROWS = st.lists(st.tuples(*map(_fitting, WIDE)).map(list), min_size=1, max_size=4) | st.lists(
    st.tuples(*(st.one_of(*[_fitting(c)] * 3, WIDE_CELL) for c in WIDE)).map(list),
    min_size=1,
    max_size=4,
)
WIDE_COLUMNS = st.sampled_from(
    [None, [], [c.name for c in WIDE], [c.name for c in reversed(WIDE)], ["age", "device"]]
)


def _fits(column: Column, value: Any) -> bool:
    """A value the general path takes for the column as it is (category codes aside)."""
    if value is None:
        return column.nullable
    if column.kind == "numeric":
        return type(value) in (int, float) and abs(value) <= codecs.FLOAT32_MAX
    return type(value) is str and (column.categories is None or value in column.categories)


def _plain(values: Any) -> list:
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


@settings(max_examples=examples(300), deadline=None)
@example(rows=[[3.5e38, "desktop", 1, None]], repeat=1, columns=None, other=None)
@example(rows=[[True, "mobile", 1, "x"]], repeat=1, columns=None, other=None)
@example(rows=[[1, 7, 1, "x"]], repeat=1, columns=None, other=None)  # a code: general path
@example(rows=[[None, "mobile", None, None]], repeat=20, columns=None, other=None)
@given(rows=WIDE_ROWS,
       repeat=st.sampled_from([1, 1, 20]), columns=WIDE_COLUMNS,
       other=st.sampled_from([None, None, None, "instances"]))  # fmt: skip
def test_the_one_pass_decoder_takes_only_what_the_general_path_takes_and_gives_the_same(
    rows: list, repeat: int, columns: list | None, other: str | None
) -> None:
    """`SplitDecoder` answers a dataframe_split body with exactly the values the general path
    (`mlflow_columns` + `validate`) gives, or leaves it to that path; and it takes every body
    whose columns are the schema's, in its order, holding values that fit as they are."""
    rows = rows * repeat  # 20 × up to 4 rows: long columns, checked as arrays
    split: dict[str, Any] = {"data": rows} | ({} if columns is None else {"columns": columns})
    payload: dict[str, Any] = {"dataframe_split": split} | ({other: []} if other else {})
    body = json.dumps(payload).encode()
    decoded = codecs.SplitDecoder(WIDE).rows(body, max_rows=60)
    fast = None if decoded is None else (codecs.columns_of(decoded, WIDE), len(decoded))
    try:
        general = codecs.validate(codecs.mlflow_columns(body, "application/json", WIDE), WIDE,
                                  max_rows=60)  # fmt: skip
    except ClientError:
        general = None
    in_order = not columns or columns == [c.name for c in WIDE]
    fitting = all(_fits(c, v) for row in rows for c, v in zip(WIDE, row, strict=True))
    if general is not None and in_order and not other and fitting:
        assert fast is not None, "a plain request left to the general path"
    if fast is None:
        return
    assert general is not None, "the decoder took what the general path refuses"
    assert fast[1] == general[1]
    for column in WIDE:
        mine, theirs = fast[0][column.name], general[0][column.name]
        assert isinstance(mine, np.ndarray) == isinstance(theirs, np.ndarray), column.name
        assert [(type(v), v) for v in _plain(mine) if v == v] == [
            (type(v), v) for v in _plain(theirs) if v == v
        ], column.name
        assert [v != v for v in _plain(mine)] == [v != v for v in _plain(theirs)], column.name


# --- the spec loader ------------------------------------------------------------------------------


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a nested spec, so a mutation can land anywhere."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, inner in value.items():
            found += _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += _paths(inner, (*prefix, index))
    return found


PATHS = _paths(EXAMPLE)
# The loaded profile's suppressions (too_slow under CI) kept where a test adds its own.
PROFILE_SUPPRESSED = list(settings().suppress_health_check)


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[*PROFILE_SUPPRESSED, HealthCheck.function_scoped_fixture],
)
@given(where=st.sampled_from(PATHS), value=JSON_VALUES, drop=st.booleans())
def test_spec_loader_reports_any_mutation_as_a_field_error(where: tuple, value: Any, drop: bool,
                                                           tmp_path: Path) -> None:  # fmt: skip
    spec = copy.deepcopy(EXAMPLE)
    parent = spec
    for step in where[:-1]:
        parent = parent[step]
    if drop and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    path = tmp_path / "modelyard.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "data.py").write_text((ROOT / "examples/ad_clicks/data.py").read_text())
    try:
        load_spec(path)
    except SpecError as exc:
        message = str(exc)
        assert "problem(s)" in message or "not valid YAML" in message, message
        assert "Traceback" not in message


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[*PROFILE_SUPPRESSED, HealthCheck.function_scoped_fixture],
)
@given(text=st.text(max_size=200))
def test_spec_loader_reports_any_text_as_a_spec_error(text: str, tmp_path: Path) -> None:
    path = tmp_path / "modelyard.yaml"
    path.write_text(text)
    with pytest.raises(SpecError):
        load_spec(path)
