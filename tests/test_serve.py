"""The serving app over real HTTP on loopback: both protocols, auth, metrics, every bad input."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelyard.bundle import public_key_text
from modelyard.package.build import frame_columns
from tests.serving import TOKEN, Built, Server, build_example, children_of

AUTH = {"Authorization": f"Bearer {TOKEN}"}
# With test_package: both read the house example that `built_house` builds once per worker.
pytestmark = pytest.mark.xdist_group("built-house")


@pytest.fixture(scope="module")
def ads(tmp_path_factory) -> Built:
    return build_example("ad_clicks", tmp_path_factory.mktemp("ads"))


@pytest.fixture(scope="module")
def house(built_house: Built) -> Built:
    return built_house


@pytest.fixture(scope="module")
def ads_server(ads: Built):
    server = Server(ads.bundle.path, ads.public_key, MODELYARD_SERVE_MAX_BODY_BYTES="65536",
                    MODELYARD_SERVE_MAX_ROWS="500").start()  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def house_server(house: Built):
    server = Server(house.bundle.path, house.public_key, workers=1).start()
    yield server
    server.stop()


def sample(built: Built, rows: int = 40):
    frame = built.prepared.splits.eval.head(rows)
    return frame.loc[:, built.spec.feature_names], built.trained.model


def expected_values(built: Built, features) -> np.ndarray:
    from modelyard.data import model_input

    return np.asarray(built.trained.model.predict(model_input(features)), dtype=float)


def v2_request(features) -> dict:
    columns = frame_columns(features)
    return {"id": "req-1", "inputs": [
        {"name": name, "shape": [len(values)],
         "datatype": "BYTES" if features[name].dtype == object else "FP32", "data": values}
        for name, values in columns.items()
    ]}  # fmt: skip


@pytest.mark.parametrize("example", ["ads", "house"])
def test_every_mlflow_shape_and_v2_agree_with_scikit_learn(example, request):
    built: Built = request.getfixturevalue(example)
    server: Server = request.getfixturevalue(f"{example}_server")
    features, _ = sample(built)
    expected = expected_values(built, features)
    columns = frame_columns(features)
    records = [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
    bodies = {
        "dataframe_split": {"dataframe_split": {"columns": list(columns), "data": [list(r.values()) for r in records]}},
        "dataframe_records": {"dataframe_records": records},
        "instances": {"instances": records},
        "inputs": {"inputs": columns},
    }  # fmt: skip
    for shape, body in bodies.items():
        response = httpx.post(f"{server.url}/invocations", json=body, headers=AUTH)
        assert response.status_code == 200, (shape, response.text)
        np.testing.assert_allclose(
            response.json()["predictions"], expected, rtol=1e-5, err_msg=shape
        )

    csv_text = features.to_csv(index=False)
    response = httpx.post(f"{server.url}/invocations", content=csv_text,
                          headers=AUTH | {"Content-Type": "text/csv"})  # fmt: skip
    np.testing.assert_allclose(response.json()["predictions"], expected, rtol=1e-5)

    response = httpx.post(
        f"{server.url}/v2/models/{built.spec.name}/infer", json=v2_request(features), headers=AUTH
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "req-1" and body["model_version"] == "7"
    outputs = {o["name"]: o for o in body["outputs"]}
    np.testing.assert_allclose(outputs["predict"]["data"], expected, rtol=1e-5)
    if built.spec.task == "binary_classification":
        proba = built.trained.model.predict_proba(features.fillna({"gender": "", "device": ""}))[
            :, 1
        ]
        np.testing.assert_allclose(
            np.reshape(outputs["predict_proba"]["data"], (-1, 2))[:, 1], proba, atol=1e-5
        )


def _mapped_files(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_modelyard_serve_runs_as_deployments_do_without_the_clis_imports(ads_server: Server):
    """`modelyard serve` becomes `python -m modelyard.serve` (the image's and the process
    runtime's command): its workers hold ONNX Runtime, not what the CLI imported (scikit-learn,
    pandas), which tripled their memory and took seconds to start."""
    parent = ads_server.process.pid
    command = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    assert command[1:4] == [b"-P", b"-m", b"modelyard.serve"], command
    workers = children_of(parent)
    assert len(workers) == 2
    for pid in [parent, *workers]:
        mapped = _mapped_files(pid)
        assert "/sklearn/" not in mapped and "/pandas/" not in mapped, pid
    assert all("onnxruntime" in _mapped_files(pid) for pid in workers)


def test_tritonclient_gets_correct_predictions(ads: Built, ads_server: Server):
    import tritonclient.http as triton

    features, _ = sample(ads, 10)
    client = triton.InferenceServerClient(url=ads_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_model_ready(ads.spec.name)
    metadata = client.get_model_metadata(ads.spec.name)
    assert [i["name"] for i in metadata["inputs"]] == ads.spec.feature_names
    inputs = []
    for name in ads.spec.feature_names:
        column = features[name]
        if column.dtype == object:
            tensor = triton.InferInput(name, [len(column), 1], "BYTES")
            tensor.set_data_from_numpy(
                column.fillna("").to_numpy(dtype=object).reshape(-1, 1), binary_data=False
            )
        else:
            tensor = triton.InferInput(name, [len(column), 1], "FP32")
            tensor.set_data_from_numpy(
                column.to_numpy(dtype=np.float32).reshape(-1, 1), binary_data=False
            )
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput("predict_proba", binary_data=False)]
    result = client.infer(ads.spec.name, inputs, outputs=outputs, headers=AUTH)
    proba = result.as_numpy("predict_proba")[:, 1]
    expected = ads.trained.model.predict_proba(features.fillna({"gender": "", "device": ""}))[:, 1]
    np.testing.assert_allclose(proba, expected, atol=1e-5)


def _record(**changes):
    row = {"age": 30.0, "gender": "male", "pages_viewed": 40.0, "previous_clicks": 3.0,
           "time_on_site": 10.0, "device": "mobile"}  # fmt: skip
    row.update(changes)
    return {"dataframe_records": [row]}


BAD = [
    ("malformed JSON", "POST", "/invocations", b'{"dataframe_records": [', {}, 400, None, "malformed JSON"),
    ("empty body", "POST", "/invocations", b"", {}, 400, None, "empty request body"),
    ("no known key", "POST", "/invocations", {"rows": []}, {}, 400, None, "exactly one of"),
    ("missing column", "POST", "/invocations", {"dataframe_records": [{"age": 3}]}, {}, 400, "gender", "missing input column"),
    ("string for number", "POST", "/invocations", _record(age="thirty"), {}, 400, "age", "must be a number"),
    ("bool for number", "POST", "/invocations", _record(previous_clicks=True), {}, 400, "previous_clicks", "must be a number"),
    ("beyond float32", "POST", "/invocations", _record(pages_viewed=1e300), {}, 400, "pages_viewed", "float32 range"),
    ("CSV overflow", "POST", "/invocations", b"age,gender,pages_viewed,previous_clicks,time_on_site,device\n1e400,male,1,1,1,mobile\n", {"Content-Type": "text/csv"}, 400, "age", "float32 range"),
    ("null where forbidden", "POST", "/invocations", _record(pages_viewed=None), {}, 400, "pages_viewed", "forbids missing"),
    ("number for category", "POST", "/invocations", _record(device=3), {}, 400, "device", "'3' at row 0 is not one of"),
    ("list for category", "POST", "/invocations", _record(device=["mobile"]), {}, 400, "device", "must be a category"),
    ("unknown category", "POST", "/invocations", _record(device="fridge"), {}, 400, "device", "not one of"),
    ("bad split rows", "POST", "/invocations", {"dataframe_split": {"columns": ["age"], "data": [[1, 2]]}}, {}, 400, "dataframe_split.data", "must be a list of 1"),
    ("too many rows", "POST", "/invocations", {"dataframe_records": _record()["dataframe_records"] * 501}, {}, 413, None, "more than the 500"),
    ("oversized body", "POST", "/invocations", b"[" + b" " * 70000 + b"]", {}, 413, None, "over 65536 bytes"),
    ("wrong content type", "POST", "/invocations", b"age=3", {"Content-Type": "application/x-www-form-urlencoded"}, 415, None, "Content-Type"),
    ("bad CSV number", "POST", "/invocations", b"age,gender\nold,male\n", {"Content-Type": "text/csv"}, 400, "age", "not a number"),
    ("v2 shape mismatch", "POST", "/v2/models/ad_clicks/infer", {"inputs": [{"name": "age", "shape": [2], "datatype": "FP32", "data": [1]}]}, {}, 400, "age", "does not match"),
    ("v2 no inputs", "POST", "/v2/models/ad_clicks/infer", {"outputs": []}, {}, 400, "inputs", "needs 'inputs'"),
    ("v2 unknown output", "POST", "/v2/models/ad_clicks/infer", {**{"inputs": []}, "outputs": [{"name": "x"}]}, {}, 400, None, None),
    ("v2 unknown model", "POST", "/v2/models/nope/infer", {"inputs": []}, {}, 404, None, "unknown model"),
    ("v2 unknown version", "POST", "/v2/models/ad_clicks/versions/99/infer", {"inputs": []}, {}, 404, None, "unknown model"),
    ("wrong method", "GET", "/invocations", None, {}, 405, None, "not allowed"),
    ("unknown route", "GET", "/nope", None, {}, 404, None, "no route"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "method", "path", "body", "headers", "status", "field", "text"), BAD,
                         ids=[b[0] for b in BAD])  # fmt: skip
def test_bad_input_gets_4xx_naming_the_field(
    ads_server, case, method, path, body, headers, status, field, text
):
    kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
    response = httpx.request(method, ads_server.url + path, headers=AUTH | headers, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["error_code"] and error["message"]
    if field:
        assert error["field"] == field
    if text:
        assert text in error["message"]


def test_auth_on_prediction_routes_only(ads_server):
    body = _record()
    assert httpx.post(f"{ads_server.url}/invocations", json=body).status_code == 401
    wrong = httpx.post(
        f"{ads_server.url}/invocations", json=body, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
    assert (
        httpx.post(f"{ads_server.url}/v2/models/ad_clicks/infer", json={"inputs": []}).status_code
        == 401
    )
    for open_route in (
        "/health/live",
        "/health/ready",
        "/v2/health/ready",
        "/metrics",
        "/v2/models/ad_clicks",
    ):
        assert httpx.get(ads_server.url + open_route).status_code == 200, open_route


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


COUNTED = ('modelyard_requests_total{route="/invocations",status="200"}',
           "modelyard_prediction_count", "modelyard_predicted_rows_total",
           'modelyard_request_duration_seconds_count{route="/invocations"}')  # fmt: skip


def metrics_when(url: str, done: object, timeout: float = 60) -> str:
    """/metrics once `done(text)` holds. A worker folds its tallies in `FLUSH_SECONDS` after its
    first unflushed request; a fixed sleep would bet that a busy machine runs that timer on time."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics").text
        if done(text):  # type: ignore[operator]
            return text
        time.sleep(0.2)
    raise TimeoutError(f"/metrics never showed what was expected within {timeout} s")


def settled_metrics(url: str) -> str:
    """/metrics once the request counters stand still over two flush periods."""
    import time

    from modelyard.serve.metrics import FLUSH_SECONDS

    previous: list[float] = []

    def still(text: str) -> bool:
        counts = [_metric(text, name) for name in COUNTED]
        if counts == previous:
            return True
        previous[:] = counts
        time.sleep(2 * FLUSH_SECONDS)
        return False

    return metrics_when(url, still)


def test_metrics_count_requests_predictions_and_never_a_500(ads_server):
    ok = COUNTED[0]
    before = settled_metrics(ads_server.url)  # earlier tests' tallies are in the baseline
    for _ in range(7):
        httpx.post(f"{ads_server.url}/invocations", json=_record(), headers=AUTH)
    metrics_when(ads_server.url, lambda text: _metric(text, ok) - _metric(before, ok) >= 7)
    text = settled_metrics(ads_server.url)  # both workers have folded this test's tallies in
    assert _metric(text, ok) - _metric(before, ok) == 7
    assert (
        _metric(text, "modelyard_prediction_count") - _metric(before, "modelyard_prediction_count")
        == 7
    )
    assert (
        _metric(text, "modelyard_predicted_rows_total")
        - _metric(before, "modelyard_predicted_rows_total")
        == 7
    )
    latency = COUNTED[3]
    assert _metric(text, latency) - _metric(before, latency) >= 7
    assert (
        'modelyard_model_info{bundle_digest="' in text and 'model="ad_clicks",version="7"' in text
    )
    assert 'modelyard_requests_total{route="/invocations",status="200"}' in text
    assert "modelyard_request_duration_seconds_bucket" in text
    assert "modelyard_prediction_bucket" in text
    assert 0 < _metric(text, "modelyard_model_row_cpu_seconds") < 0.01  # measured at start
    assert 'status="500"' not in text
    assert httpx.get(f"{ads_server.url}/health/live").status_code == 200  # still up after it all


def test_the_supervisor_holds_no_model_or_bundle_code(ads_server):
    """Every page the supervisor maps is counted again in each worker it forks: it checks the
    bundle in a child of its own and never loads ONNX Runtime, numpy or cryptography. The
    workers load the first two; the bundle they check against the manifest digest the
    supervisor's child verified, with hashlib, so cryptography (8 MB each) stays out of them."""
    supervisor = ads_server.process.pid  # `modelyard serve` execs the server in its process
    workers = children_of(supervisor)
    assert len(workers) == 2

    def libraries(pid: int) -> str:
        return Path(f"/proc/{pid}/maps").read_text()

    for library in ("onnxruntime", "_multiarray_umath"):
        assert library not in libraries(supervisor), library
        assert all(library in libraries(worker) for worker in workers), library
    assert all("cryptography" not in libraries(pid) for pid in [supervisor, *workers])


def test_a_shadow_compares_the_copies_it_gets_with_the_serving_version(ads: Built, tmp_path):
    """A slot started with the serving version's bundle as its reference predicts each request
    the front door copies to it (X-Modelyard-Shadow) with both, and counts the rows whose class
    agrees: exactly as many as the two scikit-learn models agree on. Requests that are not
    copies are not compared, nor are copies the shadow itself refuses."""
    serving = build_example("ad_clicks", tmp_path / "serving", key_file=ads.key_file,
                            estimator={"class": "sklearn.linear_model.LogisticRegression",
                                       "params": {"C": 0.0005, "max_iter": 1000}})  # fmt: skip
    server = Server(ads.bundle.path, ads.public_key, workers=1,
                    MODELYARD_SHADOW_REFERENCE=str(serving.bundle.path)).start()  # fmt: skip
    features, _ = sample(ads, rows=200)
    agreeing = int((expected_values(ads, features) == expected_values(serving, features)).sum())
    assert 0 < agreeing < 200  # the two models differ, and the counts below must tell
    body = {"inputs": frame_columns(features)}
    copy = AUTH | {"X-Modelyard-Shadow": "1"}
    try:
        assert httpx.post(f"{server.url}/invocations", json=body, headers=AUTH).status_code == 200
        response = httpx.post(f"{server.url}/invocations", json=body, headers=copy)
        assert response.status_code == 200  # the shadow's own answer, which nginx drops
        assert response.json()["predictions"] == expected_values(ads, features).tolist()
        bad = {"inputs": frame_columns(features.drop(columns=["device"]))}
        assert httpx.post(f"{server.url}/invocations", json=bad, headers=copy).status_code == 400
        # The comparison runs off the event loop, after the answer: wait for its count.
        text = metrics_when(server.url, lambda text: _metric(
            text, "modelyard_shadow_compared_rows_total") > 0)  # fmt: skip
    finally:
        server.stop()
    assert _metric(text, "modelyard_shadow_compared_rows_total") == 200  # the copy alone
    assert _metric(text, "modelyard_shadow_agreed_rows_total") == agreeing
    assert _metric(text, "modelyard_shadow_abs_diff_total") == 0
    assert _metric(text, "modelyard_shadow_unpaired_rows_total") == 0  # the 400 was not compared


def test_a_regressors_shadow_sums_differences_and_counts_what_its_reference_cannot_read(
    ads: Built, house: Built
):
    from modelyard.bundle import parse_public_keys, verify
    from modelyard.serve import codecs
    from modelyard.serve.runtime import Runtime
    from modelyard.serve.shadow import Reference, compare

    house_model = Runtime(verify(house.bundle.path, parse_public_keys(house.public_key)))
    features, _ = sample(house, rows=30)
    columns = frame_columns(features)
    predicted = house_model.predict(codecs.to_feeds(columns, house_model.columns, 100)[0])
    same = Reference(house_model, 100).compare(columns, 30, predicted)
    assert (same.rows, same.agreed, same.abs_diff, same.unpaired) == (30, 0, 0.0, 0)
    shifted = predicted._replace(values=predicted.values + 2.5)
    assert compare(shifted, predicted, regression=True).abs_diff == pytest.approx(75.0)
    # A reference whose schema refuses the copy (here: another model's columns): unpaired.
    ads_columns = frame_columns(sample(ads, rows=5)[0])
    assert Reference(house_model, 100).compare(ads_columns, 5, predicted).unpaired == 5

    # Off the loop, one at a time, at most `backlog` waiting: a copy beyond it is not queued.
    import asyncio

    from modelyard.serve.shadow import Comparer

    async def two_copies_at_once() -> list:
        recorded: list = []
        comparer = Comparer(Reference(house_model, 100), recorded.append, backlog=1)
        comparer.submit(columns, 30, shifted)
        comparer.submit(columns, 30, shifted)  # the first still waits: counted unpaired
        while len(recorded) < 2:
            await asyncio.sleep(0.01)
        return recorded

    unpaired, compared = asyncio.run(two_copies_at_once())
    assert (unpaired.rows, unpaired.unpaired) == (0, 30)
    assert (compared.rows, compared.abs_diff) == (30, pytest.approx(75.0))


def test_tampered_or_untrusted_bundle_is_refused(ads: Built, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(ads.bundle.path, tampered)
    schema = tampered / "schema.json"
    schema.write_text(schema.read_text().replace('"nullable": false', '"nullable": true'))
    server = Server(tampered, ads.public_key)
    output = server.process.communicate(timeout=60)[0]
    assert server.process.returncode == 3
    assert "refusing to serve" in output and "altered: ['schema.json']" in output

    # The same refusal for a key the bundle was not signed with, checked in this process: the
    # console script's path to it is the one above.
    from modelyard.serve.server import ServeConfig, serve

    other_key = public_key_text(Ed25519PrivateKey.generate().public_key())
    assert serve(ServeConfig(bundle=ads.bundle.path, trusted_keys=other_key)) == 3
    assert "does not verify with any trusted key" in capsys.readouterr().err


def test_a_port_something_listens_on_is_refused(ads: Built, ads_server: Server, capsys):
    """The workers bind with SO_REUSEPORT, which would let a second server bind a port the first
    holds and take a share of its connections: `modelyard serve` refuses the port instead (exit
    3), and the first keeps answering."""
    from modelyard.serve.server import ServeConfig, serve

    second = Server(ads.bundle.path, ads.public_key, port=ads_server.port)
    try:
        output = second.process.communicate(timeout=60)[0]
    finally:
        second.process.kill()  # one that started after all (the old behaviour) must not stay
    assert second.process.returncode == 3
    assert f"refusing to serve: 127.0.0.1:{ads_server.port} is taken" in output
    assert httpx.get(f"{ads_server.url}/health/ready").status_code == 200

    # Any listener, checked in this process with one worker (no fork): the same refusal.
    with socket.create_server(("127.0.0.1", 0)) as other:
        taken = other.getsockname()[1]
        config = ServeConfig(bundle=ads.bundle.path, trusted_keys=ads.public_key, port=taken)
        assert serve(config) == 3
    assert f"127.0.0.1:{taken} is taken" in capsys.readouterr().err


def test_workers_stop_when_their_supervisor_is_killed(ads: Built):
    """A supervisor killed outright (SIGKILL, the OOM killer) takes its workers with it: left
    running they would keep the port, and the server's restart would be refused it."""
    server = Server(ads.bundle.path, ads.public_key).start()
    supervisor = server.process.pid
    workers = children_of(supervisor)
    assert len(workers) == 2
    try:
        os.kill(supervisor, signal.SIGKILL)
        server.process.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if Path(f"/proc/{w}").exists()], "workers outlived it"
        restarted = Server(ads.bundle.path, ads.public_key, port=server.port)
        try:
            restarted.start()
        finally:
            restarted.stop()
    finally:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def test_concurrent_requests_each_get_their_own_answer(house: Built, house_server: Server):
    """Requests batched into one ONNX Runtime call must still get their own rows back."""
    import asyncio

    features, _ = sample(house, 400)
    expected = expected_values(house, features)
    columns = frame_columns(features)
    # Mixed request sizes, 319 rows in all: long ones (their numeric columns validated into
    # arrays) joined in one batch with short ones (lists).
    sizes = [70, 1, 2, 96, 3] + [1 + i % 4 for i in range(60)]
    starts = np.cumsum([0, *sizes[:-1]])

    async def one(client: httpx.AsyncClient, start: int, size: int) -> list[float]:
        chunk = {k: v[start : start + size] for k, v in columns.items()}
        response = await client.post("/invocations", json={"inputs": chunk}, headers=AUTH)
        assert response.status_code == 200, response.text
        return response.json()["predictions"]

    async def all_at_once() -> list[list[float]]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=house_server.url, limits=limits) as client:
            return await asyncio.gather(
                *(one(client, s, n) for s, n in zip(starts, sizes, strict=True))
            )

    answers = asyncio.run(all_at_once())
    for start, size, answer in zip(starts, sizes, answers, strict=True):
        np.testing.assert_allclose(answer, expected[start : start + size], rtol=1e-5)
