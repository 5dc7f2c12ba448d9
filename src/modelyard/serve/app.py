"""The serving app: MLflow's `/invocations` and the Open Inference Protocol V2 over one runtime.

No framework: per request it does only routing, auth, decoding and its share of one ONNX
Runtime call, which is what keeps one-row latency in microseconds. `modelyard.serve.http` hands
it whole requests (`handle`) and it answers through a callback: at once, or for a prediction
when its batch has run, with no task or future per request. It is also an ASGI app, for tests
and embedding.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson

from modelyard.serve import codecs, openapi, shadow
from modelyard.serve.batching import Batcher
from modelyard.serve.codecs import ClientError
from modelyard.serve.http import Answer, Headers
from modelyard.serve.metrics import PROBABILITY_BUCKETS, Metrics
from modelyard.serve.runtime import Prediction, Runtime, row_cost

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
# A handler's answer: (status, body, headers besides date and length), or what went wrong.
Reply = tuple[int, bytes, Headers]
Replier = Callable[[Reply | Exception], None]
# (scope, body, reply) -> its reply now, or None when it will call `reply` once its batch has run.
Handler = Callable[[Scope, bytes, Replier], Reply | None]

log = logging.getLogger("modelyard.serve")
JSON = [(b"content-type", b"application/json")]
_V2_TYPES = {"float32": "FP32", "float64": "FP64"}


class ServingApp:
    def __init__(
        self,
        runtime: Runtime,
        tokens: list[str] | None = None,
        max_body_bytes: int = 5 * 1024 * 1024,
        max_rows: int = 10_000,
        reference: Runtime | None = None,
    ) -> None:
        """`reference`: the serving version's model, when this slot runs a shadow of it."""
        self.runtime = runtime
        self.tokens = [t.encode() for t in tokens or [] if t]
        self.max_body = max_body_bytes
        self.max_rows = max_rows
        buckets = runtime.schema.get("prediction_buckets") or list(PROBABILITY_BUCKETS)
        if runtime.classes is not None:  # a classifier's scores are probabilities
            buckets = list(PROBABILITY_BUCKETS)
        self.metrics = Metrics(
            runtime.name, runtime.version, runtime.digest, buckets,
            runtime.schema.get("reference"), runtime.schema.get("monitoring"),
            shadow=reference is not None,
        )  # fmt: skip
        self.comparer = (
            None
            if reference is None
            else shadow.Comparer(shadow.Reference(reference, max_rows), self.metrics.observe_shadow)
        )
        self.batcher = Batcher(runtime, self.metrics.observe_batch)
        self.split_decoder = codecs.SplitDecoder(runtime.columns)
        self.ready = False
        self._openapi: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app as ASGI (tests and embedding); `modelyard.serve.http` calls `handle`."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        body = await self._read_body(receive)
        answered: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.handle(scope, body, answered.set_result)
        route, status, content, headers = await answered
        # A content-length spares the client chunked framing, which an ASGI server adds without it.
        headers = [*headers, (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        self.answered(route, status, started)

    def handle(self, scope: Scope, body: bytes, respond: Callable[[Answer], None]) -> None:
        """Answer one request: `respond` is called once, now or when its batch has run. `body`
        may be cut one byte past `max_body` (the handlers that read it then answer 413)."""
        route, handler, needs_auth = self._route(scope)

        def reply(result: Reply | Exception) -> None:
            status, content, headers = (
                _failure(result, route) if isinstance(result, Exception) else result
            )
            respond((route, status, content, headers))

        try:
            if needs_auth and self.tokens:
                self._authorise(scope)
            now = handler(scope, body, reply)
        except Exception as exc:
            now = _failure(exc, route)
        if now is not None:
            reply(now)

    def answered(self, route: str, status: int, started: float) -> None:
        """Counted once the answer is written (`started`: perf_counter when it arrived)."""
        if route != "/metrics":
            self.metrics.observe(route, status, time.perf_counter() - started)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.ready = False
                await send({"type": "lifespan.shutdown.complete"})
                return

    def start(self) -> None:
        """Warm up, then say ready."""
        self._warm_up()
        self.ready = True

    def _warm_up(self) -> None:
        """Predictions on the bundle's input example before saying ready: the first loads
        what ONNX Runtime loads lazily, the next measure what a row costs the model."""
        example = self.runtime.schema.get("example")
        if example:
            feeds, _ = codecs.to_feeds(example, self.runtime.columns, self.max_rows)
            self.runtime.predict(feeds)
            self.runtime.check_trees(feeds)
            self.metrics.row_cost.set(row_cost(self.runtime, feeds))

    # --- routing ------------------------------------------------------------------------------

    def _route(self, scope: Scope) -> tuple[str, Handler, bool]:
        path: str = scope["path"]
        method: str = scope["method"]
        simple = _ROUTES.get((method, path))
        if simple is not None:
            name, attr, auth = simple
            return name, getattr(self, attr), auth
        if path.startswith("/v2/models/"):
            return self._route_v2(method, path)
        if any(p == path for (_, p) in _ROUTES):
            return path, _method_not_allowed, False
        return "other", _not_found, False

    def _route_v2(self, method: str, path: str) -> tuple[str, Handler, bool]:
        parts = path.split("/")[3:]  # name[, versions, v][, infer|ready]
        if parts and parts[0] != self.runtime.name:
            return "/v2/models/{name}", _unknown_model(parts[0]), False
        rest = parts[1:]
        if len(rest) >= 2 and rest[0] == "versions":
            if rest[1] != self.runtime.version:
                return "/v2/models/{name}", _unknown_model(f"{parts[0]} version {rest[1]}"), False
            rest = rest[2:]
        action = rest[0] if rest else ""
        if action == "infer" and method == "POST":
            return "/v2/models/{name}/infer", self.v2_infer, True
        if action == "ready" and method == "GET":
            return "/v2/models/{name}/ready", self.v2_model_ready, False
        if action == "" and method == "GET":
            return "/v2/models/{name}", self.v2_model_metadata, False
        return "other", _not_found, False

    def _authorise(self, scope: Scope) -> None:
        supplied = b""
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, credential = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    supplied = credential.strip()
                break
        # compare_digest against every configured token: old and new both work during rotation.
        if not supplied or not any([hmac.compare_digest(supplied, t) for t in self.tokens]):
            raise ClientError("missing or invalid bearer token", status=401)

    async def _read_body(self, receive: Receive) -> bytes:
        """An ASGI request's body, held up to one byte past `max_body` as the HTTP layer holds
        it."""
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            if size <= self.max_body:
                chunks.append(chunk[: self.max_body + 1 - size])
            size += len(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _check_size(self, body: bytes) -> None:
        if len(body) > self.max_body:
            raise ClientError(f"request body over {self.max_body} bytes", status=413)

    def _predict(
        self, columns: codecs.Columns, scope: Scope, reply: Replier,
        encode: Callable[[Prediction], bytes],
    ) -> None:  # fmt: skip
        values, rows = codecs.validate(columns, self.runtime.columns, self.max_rows)
        copy = self.comparer is not None and shadow.is_copy(scope["headers"])
        comparer = self.comparer if copy else None

        def done(outcome: Prediction | Exception) -> None:
            if comparer is not None and not isinstance(outcome, Exception):
                comparer.submit(columns, rows, outcome)  # off the loop, never in a latency
            _encoded(outcome, encode, reply)

        self.batcher.submit(values, rows, done)

    # --- handlers: (scope, body, reply) -> a reply now, or None when `reply` is called later ---

    def invocations(self, scope: Scope, body: bytes, reply: Replier) -> Reply | None:
        self._check_size(body)
        content_type = _header(scope, b"content-type").split(";")[0].strip().lower()
        # A shadow compares copies as clients sent them: those take the general path.
        if self.comparer is None and codecs.is_json(content_type):
            rows = self.split_decoder.rows(body, self.max_rows)
            if rows is not None:
                self.batcher.submit(
                    rows,
                    len(rows),
                    lambda outcome: _encoded(outcome, codecs.mlflow_response, reply),
                )
                return None
        columns = codecs.mlflow_columns(body, content_type, self.runtime.columns)
        self._predict(columns, scope, reply, codecs.mlflow_response)
        return None

    def v2_infer(self, scope: Scope, body: bytes, reply: Replier) -> Reply | None:
        self._check_size(body)
        columns, wanted, request_id = codecs.v2_columns(body)

        def encode(prediction: Prediction) -> bytes:
            response = {
                "model_name": self.runtime.name,
                "model_version": self.runtime.version,
                "id": request_id,
                "outputs": codecs.v2_outputs(prediction, wanted),
            }
            return orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)

        self._predict(columns, scope, reply, encode)
        return None

    def live(self, scope: Scope, _body: bytes, _reply: Replier) -> Reply:
        return 200, b'{"status":"alive"}', JSON

    def readiness(self, scope: Scope, _body: bytes, _reply: Replier) -> Reply:
        body = {
            "status": "ready" if self.ready else "starting",
            "model": self.runtime.name,
            "version": self.runtime.version,
            "bundle_digest": self.runtime.digest,
        }
        return (200 if self.ready else 503), orjson.dumps(body), JSON

    def v2_live(self, scope: Scope, _body: bytes, _reply: Replier) -> Reply:
        return 200, b'{"live":true}', JSON

    def v2_ready(self, scope: Scope, _body: bytes, _reply: Replier) -> Reply:
        return (200 if self.ready else 503), orjson.dumps({"ready": self.ready}), JSON

    def v2_model_ready(self, scope: Scope, _body: bytes, _reply: Replier) -> Reply:
        body = {"name": self.runtime.name, "ready": self.ready}
        return (200 if self.ready else 503), orjson.dumps(body), JSON

    def v2_server_metadata(self, scope: Scope, _body: bytes, _reply: Replier) -> Reply:
        body = {
            "name": "modelyard",
            "version": self.runtime.metadata.get("modelyard_version", ""),
            "extensions": [],
        }
        return 200, orjson.dumps(body), JSON

    def v2_model_metadata(self, scope: Scope, _body: bytes, _reply: Replier) -> Reply:
        inputs = [
            {
                "name": c.name,
                "datatype": _V2_TYPES.get(np.dtype(c.dtype).name, "BYTES"),
                "shape": [-1, 1],
            }
            for c in self.runtime.columns
        ]
        classes = self.runtime.classes
        outputs = [{"name": "predict", "datatype": self.runtime.label_datatype, "shape": [-1]}]
        if classes is not None:
            outputs.append(
                {"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(classes)]}
            )
        body = {
            "name": self.runtime.name,
            "versions": [self.runtime.version],
            "platform": "onnxruntime",
            "inputs": inputs,
            "outputs": outputs,
            # predict_proba's columns, in order (the Open Inference Protocol's free-form field)
            **({"parameters": {"classes": classes}} if classes is not None else {}),
        }
        return 200, orjson.dumps(body), JSON

    def openapi_route(self, scope: Scope, _body: bytes, _reply: Replier) -> Reply:
        if self._openapi is None:  # built once: the schema never changes while serving
            self._openapi = orjson.dumps(
                openapi.document(self.runtime, bool(self.tokens), self.max_rows, self.max_body)
            )
        return 200, self._openapi, JSON

    def metrics_route(self, scope: Scope, _body: bytes, _reply: Replier) -> Reply:
        return 200, self.metrics.render(), [(b"content-type", self.metrics.content_type.encode())]

    def version_route(self, scope: Scope, _body: bytes, _reply: Replier) -> Reply:
        body = {
            k: self.runtime.metadata.get(k) for k in ("model_name", "model_version", "git_commit")
        }
        return 200, orjson.dumps(body | {"bundle_digest": self.runtime.digest}), JSON


# (method, path) -> (metric route label, handler attribute, needs auth)
_ROUTES: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("POST", "/invocations"): ("/invocations", "invocations", True),
    ("GET", "/health/live"): ("/health/live", "live", False),
    ("GET", "/health/ready"): ("/health/ready", "readiness", False),
    ("GET", "/ping"): ("/ping", "readiness", False),
    ("GET", "/health"): ("/health", "readiness", False),
    ("GET", "/version"): ("/version", "version_route", False),
    ("GET", "/metrics"): ("/metrics", "metrics_route", False),
    ("GET", "/openapi.json"): ("/openapi.json", "openapi_route", False),
    ("GET", "/v2"): ("/v2", "v2_server_metadata", False),
    ("GET", "/v2/health/live"): ("/v2/health/live", "v2_live", False),
    ("GET", "/v2/health/ready"): ("/v2/health/ready", "v2_ready", False),
}


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def _not_found(scope: Scope, _body: bytes, _reply: Replier) -> Reply:
    raise ClientError(f"no route {scope['method']} {scope['path']}", status=404)


def _method_not_allowed(scope: Scope, _body: bytes, _reply: Replier) -> Reply:
    raise ClientError(f"{scope['method']} is not allowed on {scope['path']}", status=405)


def _unknown_model(name: str) -> Handler:
    def handler(scope: Scope, _body: bytes, _reply: Replier) -> Reply:
        raise ClientError(f"unknown model {name!r}", status=404)

    return handler


def _encoded(
    outcome: Prediction | Exception, encode: Callable[[Prediction], bytes], reply: Replier
) -> None:
    try:
        result: Reply | Exception = (
            outcome if isinstance(outcome, Exception) else (200, encode(outcome), JSON)
        )
    except Exception as exc:
        result = exc
    reply(result)


def _failure(exc: Exception, route: str) -> Reply:
    """A client's mistake in its own words; anything else is a bug of ours: logged, 500."""
    if isinstance(exc, ClientError):
        if exc.status == 401:
            return (
                exc.status,
                exc.body(),
                [*JSON, (b"www-authenticate", b'Bearer realm="modelyard"')],
            )
        return exc.status, exc.body(), JSON
    log.error("unhandled error on %s", route, exc_info=exc)
    return 500, b'{"error_code":"INTERNAL_ERROR","message":"internal error"}', JSON
