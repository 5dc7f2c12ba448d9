"""The serving app's OpenAPI 3.1 document, written from the bundle's schema.

`GET /openapi.json` serves it: clients generate code from it, and the tests drive the app with
schemathesis from it. Input columns appear with their types, allowed categories, nullability
and float32 range, exactly what the codecs enforce; couplings JSON Schema cannot state (columns
of one request having equal lengths, a V2 tensor's shape matching its data) are in the
descriptions and answered with a 400 naming the field. Both request limits answer 413: the row
limit is each row list's `maxItems`, the byte limit (which JSON Schema cannot state) is in the
413 response's description.
"""

from __future__ import annotations

from typing import Any

from modelyard.serve.codecs import FLOAT32_MAX, MLFLOW_KEYS
from modelyard.serve.runtime import Column, Runtime

JSON = "application/json"
_ERROR = {"$ref": "#/components/schemas/Error"}


def document(runtime: Runtime, auth: bool, max_rows: int, max_body_bytes: int) -> dict[str, Any]:
    name = runtime.name
    columns = runtime.columns
    secured: list[dict[str, list[str]]] = [{"bearer": []}] if auth else []
    rejections = _errors(max_rows, max_body_bytes)
    infer = _v2_infer(columns, max_rows, secured, rejections)
    paths: dict[str, Any] = {
        "/invocations": {
            "post": _invocations(columns, max_rows, secured, rejections, _label(runtime))
        },
        f"/v2/models/{name}/infer": {"post": infer},
        f"/v2/models/{name}/versions/{runtime.version}/infer": {"post": infer},
        "/health/live": {"get": _simple("The process is up", {"status": {"type": "string"}})},
        "/health/ready": {"get": _ready("The model is loaded and warmed up")},
        "/ping": {"get": _ready("MLflow's readiness route")},
        "/version": {"get": _simple("The served model version and bundle digest", {})},
        "/v2": {"get": _simple("Open Inference Protocol server metadata", {})},
        "/v2/health/live": {"get": _simple("Server live", {"live": {"type": "boolean"}})},
        "/v2/health/ready": {"get": _ready("Server ready")},
        f"/v2/models/{name}": {"get": _simple("Model metadata: inputs and outputs", {})},
        f"/v2/models/{name}/ready": {"get": _ready("Model ready")},
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    components: dict[str, Any] = {
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error_code", "message"],
                "properties": {
                    "error_code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": ["string", "null"]},
                },
            },
        },
    }
    if auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"{name} v{runtime.version}",
            "version": runtime.version,
            "description": f"modelyard serving {name} (bundle {runtime.digest[:16]}): MLflow's "
            "/invocations and the Open Inference Protocol V2.",
        },
        "paths": paths,
        "components": components,
    }


def _value_schema(column: Column) -> dict[str, Any]:
    if column.kind == "numeric":
        schema: dict[str, Any] = {
            "type": ["number", "null"] if column.nullable else "number",
            "minimum": -FLOAT32_MAX,
            "maximum": FLOAT32_MAX,
        }
    else:
        schema = {"type": ["string", "null"] if column.nullable else "string"}
        if column.categories is not None:
            schema["enum"] = [*sorted(column.categories), *([None] if column.nullable else [])]
    return schema


def _label(runtime: Runtime) -> dict[str, Any]:
    """A prediction's schema: a number, or one of the classifier's labels."""
    return {"type": "number"} if runtime.classes is None else {"enum": runtime.classes}


def _invocations(
    columns: list[Column],
    max_rows: int,
    secured: list,
    rejections: dict[int, Any],
    label: dict[str, Any],
) -> dict[str, Any]:
    names = [c.name for c in columns]
    record = {
        "type": "object",
        "properties": {c.name: _value_schema(c) for c in columns},
        "required": names,
    }
    records = {"type": "array", "items": record, "minItems": 1, "maxItems": max_rows}
    row = {"type": "array", "prefixItems": [_value_schema(c) for c in columns],
           "minItems": len(columns), "maxItems": len(columns)}  # fmt: skip
    split = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "columns": {"type": "array", "items": {"enum": names}, "description": "default: "
                        "the model's inputs in order"},
            "data": {"type": "array", "items": row, "minItems": 1, "maxItems": max_rows},
        },
    }  # fmt: skip
    body = {
        "description": f"Exactly one of {list(MLFLOW_KEYS)}, as `mlflow models serve` accepts. "
        "Columns given as an object of lists must all have the same length.",
        "oneOf": [
            {"type": "object", "required": ["dataframe_split"],
             "properties": {"dataframe_split": split}},
            {"type": "object", "required": ["dataframe_records"],
             "properties": {"dataframe_records": records}},
            {"type": "object", "required": ["instances"], "properties": {"instances": records}},
            {"type": "object", "required": ["inputs"], "properties": {"inputs": records}},
        ],
    }  # fmt: skip
    return {
        "summary": "Predict (MLflow scoring protocol)",
        "security": secured,
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": body},
                "text/csv": {"schema": {"type": "string", "description": f"header {names}"}},
            },
        },
        "responses": {
            "200": {"description": "One prediction per row", "content": {JSON: {"schema": {
                "type": "object", "required": ["predictions"],
                "properties": {"predictions": {"type": "array", "items": label}},
            }}}},
            **_pick(rejections, 400, 401, 413, 415),
        },
    }  # fmt: skip


def _v2_infer(
    columns: list[Column], max_rows: int, secured: list, rejections: dict[int, Any]
) -> dict[str, Any]:
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"enum": [c.name for c in columns]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0},
                      "minItems": 1, "maxItems": 2},
            "datatype": {"enum": ["FP32", "FP64", "INT32", "INT64", "BYTES"]},
            "data": {"type": "array", "maxItems": max_rows,
                     "description": "shape's product of values, one per row"},
        },
    }  # fmt: skip
    request = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "items": tensor, "minItems": 1},
            "outputs": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"enum": ["predict", "predict_proba"]}}}},
        },
    }  # fmt: skip
    response = {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": ["string", "null"]},
            "outputs": {"type": "array", "items": {"type": "object"}},
        },
    }
    return {
        "summary": "Predict (Open Inference Protocol V2)",
        "security": secured,
        "requestBody": {"required": True, "content": {JSON: {"schema": request}}},
        "responses": {
            "200": {"description": "Named output tensors",
                    "content": {JSON: {"schema": response}}},
            **_pick(rejections, 400, 401, 413),
        },
    }  # fmt: skip


def _simple(summary: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "responses": {"200": {"description": summary, "content": {JSON: {"schema": {
            "type": "object", "properties": properties}}}}},
    }  # fmt: skip


def _ready(summary: str) -> dict[str, Any]:
    operation = _simple(summary, {})
    operation["responses"]["503"] = {"description": "Not ready yet", "content": {JSON: {}}}
    return operation


def _errors(max_rows: int, max_body_bytes: int) -> dict[int, Any]:
    """Every client error the prediction routes answer, with the limits as configured."""
    why = {
        400: "Bad input; `field` names it",
        401: "Missing or wrong bearer token",
        413: f"More than {max_rows} rows (`TOO_MANY_ROWS`) or a body over {max_body_bytes} "
        "bytes (`PAYLOAD_TOO_LARGE`): send fewer rows per request",
        415: "Unsupported Content-Type",
    }
    return {s: {"description": d, "content": {JSON: {"schema": _ERROR}}} for s, d in why.items()}


def _pick(rejections: dict[int, Any], *statuses: int) -> dict[str, Any]:
    return {str(s): rejections[s] for s in statuses}
