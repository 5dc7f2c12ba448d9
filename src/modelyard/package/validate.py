"""Infra validation: before a version can be deployed, run its image and check its answers.

Like TFX's InfraValidator, but it checks more than "it starts": the container must become ready
and healthy, run as non-root, refuse an unauthenticated request and a malformed one, and answer
the bundle's input example and a sample of the evaluation split through both protocols exactly
as the bundle computes them on the host.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from modelyard.bundle import MANIFEST, parse_public_keys, verify
from modelyard.checks.report import Check, GateReport
from modelyard.config import Settings
from modelyard.package import sealing
from modelyard.package.image import Progress, docker_client
from modelyard.ports import free_port
from modelyard.serve import codecs
from modelyard.serve.runtime import Runtime

READY_SECONDS = 60
_RTOL = 1e-6  # same ONNX Runtime build on both sides: only float formatting may differ


def infra_validate(
    settings: Settings,
    image: str,
    bundle: Path,
    trusted_keys: str,
    sample: dict[str, list[Any]],
    progress: Progress,
) -> GateReport:
    opening = sealing.opening_keys(settings, json.loads((bundle / MANIFEST).read_text()))
    runtime = Runtime(verify(bundle, parse_public_keys(trusted_keys), opening))
    report = GateReport(gate="infra")
    client = docker_client(settings)
    port, token = free_port(), secrets.token_urlsafe(24)
    # An encrypted bundle's key reaches the container as the token does: in its environment.
    key = {"MODELYARD_BUNDLE_KEY": sealing.key_text(opening)} if opening else {}
    name = f"modelyard-infraval-{uuid.uuid4().hex[:8]}"
    container = client.containers.run(
        image, detach=True, network_mode="host", name=name,
        environment={"MODELYARD_SERVE_HOST": "127.0.0.1", "MODELYARD_SERVE_PORT": str(port),
                     "MODELYARD_SERVE_WORKERS": "1", "MODELYARD_SERVE_TOKEN": token, **key},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    progress(f"infra validation: started {image} on {url}")
    try:
        ready = _wait_ready(container, url)
        report.checks.append(ready)
        if ready.passed:
            with httpx.Client(
                base_url=url, timeout=10, headers={"Authorization": f"Bearer {token}"}
            ) as http:
                report.checks.extend(_replay(http, runtime, sample))
                report.checks.extend(_refusals(http, url))
            report.checks.append(_healthy(container))
        container.reload()
        user = container.attrs["Config"].get("User", "")
        report.checks.append(
            Check("runs as non-root", user not in ("", "0", "root"), f"user {user!r}")
        )
    finally:
        report.data["logs"] = container.logs(tail=50).decode(errors="replace")
        container.remove(force=True)
        client.close()
    report.data.update(
        {"image": image, "container": name, "rows_replayed": len(next(iter(sample.values()), []))}
    )
    return report


def _wait_ready(container: Any, url: str) -> Check:
    started = time.monotonic()
    while time.monotonic() - started < READY_SECONDS:
        container.reload()
        if container.status in ("exited", "dead"):
            logs = container.logs(tail=20).decode(errors="replace")
            return Check("ready", False, f"container exited ({container.status}): {logs[-800:]}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return Check("ready", True, f"ready after {time.monotonic() - started:.1f} s")
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return Check("ready", False, f"not ready within {READY_SECONDS} s")


def _expected(runtime: Runtime, columns: dict[str, list[Any]]) -> np.ndarray:
    feeds, _ = codecs.to_feeds(
        columns, runtime.columns, max_rows=len(next(iter(columns.values()))) + 1
    )
    return runtime.predict(feeds).values


def _compare(name: str, got: Any, expected: np.ndarray) -> Check:
    got = np.asarray(got, dtype=float)
    if got.shape != expected.shape:
        return Check(
            name, False, f"{got.shape[0] if got.ndim else 0} answers for {len(expected)} rows"
        )
    worst = float(np.max(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-12)))
    return Check(name, bool(np.allclose(got, expected, rtol=_RTOL, atol=1e-9)),
                 f"{len(expected)} rows, max relative difference {worst:.2g}")  # fmt: skip


def _replay(http: httpx.Client, runtime: Runtime, sample: dict[str, list[Any]]) -> list[Check]:
    checks = []
    example = runtime.schema["example"]
    response = http.post("/invocations", json={"inputs": example})
    checks.append(
        _compare(
            "input example via /invocations", _predictions(response), _expected(runtime, example)
        )
    )
    names = list(sample)
    split = {"columns": names, "data": [list(row) for row in zip(*sample.values(), strict=True)]}
    response = http.post("/invocations", json={"dataframe_split": split})
    expected = _expected(runtime, sample)
    checks.append(_compare("evaluation sample via /invocations", _predictions(response), expected))
    tensors = [{"name": n, "shape": [len(v)], "data": v,
                "datatype": "FP32" if c.kind == "numeric" else "BYTES"}
               for n, v, c in ((c.name, sample[c.name], c) for c in runtime.columns)]  # fmt: skip
    response = http.post(f"/v2/models/{runtime.name}/infer", json={"inputs": tensors})
    v2 = (
        {o["name"]: o["data"] for o in response.json().get("outputs", [])}
        if response.is_success
        else {}
    )
    checks.append(_compare("evaluation sample via V2 infer", v2.get("predict", []), expected))
    return checks


def _predictions(response: httpx.Response) -> list[Any]:
    return response.json().get("predictions", []) if response.is_success else []


def _refusals(http: httpx.Client, url: str) -> list[Check]:
    anonymous = httpx.post(f"{url}/invocations", json={"inputs": {}}, timeout=5).status_code
    malformed = http.post(
        "/invocations", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    return [
        Check("unauthenticated request refused", anonymous == 401, f"HTTP {anonymous}"),
        Check(
            "malformed request answered 400",
            malformed.status_code == 400,
            f"HTTP {malformed.status_code}",
        ),
    ]


def _healthy(container: Any) -> Check:
    deadline = time.monotonic() + 30
    status = "unknown"
    while time.monotonic() < deadline:
        container.reload()
        status = container.attrs["State"].get("Health", {}).get("Status", "none")
        if status in ("healthy", "unhealthy", "none"):
            break
        time.sleep(0.5)
    return Check("Docker HEALTHCHECK healthy", status == "healthy", f"health {status}")
