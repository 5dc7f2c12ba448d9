"""Serving benchmark: modelyard's server vs `mlflow models serve` on the same MLflow version.

Three models on the ad-clicks data: the example's logistic regression, a random forest and
LightGBM. For each, both servers run side by side on this machine with one process per core,
answering one-row requests from wrk over loopback with keep-alive at several concurrencies.
modelyard runs with bearer auth and Prometheus metrics on. A no-op route (GET /health/live) on
modelyard's own HTTP stack is the ceiling. Prints a Markdown table; `--write` replaces the
serving section of docs/benchmarks.md.

Usage: python -m bench.serving [--seconds 10] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.common import replace_section, stamp
from modelyard.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKEN = "bench-token-0123456789abcdef"
ROW = {"columns": ["age", "gender", "pages_viewed", "previous_clicks", "time_on_site", "device"],
       "data": [[29, "female", 41, 4, 17.5, "desktop"]]}  # fmt: skip
CONCURRENCY = (1, 8, 32)
# The example as shipped, then a tree ensemble and a boosted model trained on the same data.
MODELS: dict[str, dict | None] = {
    "logistic regression": None,
    "random forest": {"class": "sklearn.ensemble.RandomForestClassifier",
                      "params": {"n_estimators": 100, "max_depth": 12}},
    "LightGBM": {"class": "lightgbm.LGBMClassifier",
                 "params": {"n_estimators": 200, "verbose": -1}},
}  # fmt: skip
CEILING = "modelyard no-op (ceiling)"
MLFLOW_IMAGE_DOCS = "1–3.7 GB (as MLflow users report for `mlflow models build-docker`)"


@dataclass
class Result:
    model: str
    server: str
    route: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{url} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def train(workspace: Path, estimator: dict | None) -> tuple[str, str, Path]:
    """Register a model on the ad-clicks data through the real pipeline; returns (name,
    version, bundle). `estimator` replaces the example's, whose behaviour rules, gates and
    champion are then left out or eased: they were written for the logistic regression."""
    spec = ROOT / "examples/ad_clicks/modelyard.yaml"
    if estimator is not None:
        spec = _variant(workspace, spec, estimator)
    # The image is built when a Docker engine is there (make bench starts one), for its size.
    env = {**os.environ, "MODELYARD_WORKSPACE": str(workspace), "MODELYARD_BUILD_IMAGE": "auto"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    # --no-deploy: the benchmarks serve the bundle themselves, on ports of their own.
    done = subprocess.run([str(BIN / "modelyard"), "run", "--no-deploy", "--spec", str(spec)],
                          env=env, capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
    name = yaml.safe_load(spec.read_text())["name"]
    version = re.search(rf"{name} version (\d+)", done.stdout).group(1)
    return name, version, workspace / "bundles" / name / version / "bundle"


def _variant(workspace: Path, example: Path, estimator: dict) -> Path:
    folder = workspace / "variants" / estimator["class"].rpartition(".")[2].lower()
    folder.mkdir(parents=True)
    (folder / "data.py").write_text((example.parent / "data.py").read_text())
    spec = yaml.safe_load(example.read_text())
    spec |= {"name": f"ad_clicks_{folder.name}", "estimator": estimator, "behaviour": {}}
    # Served, not judged: the example's log-loss bound was set for its logistic regression.
    spec["gates"] = {"metrics": {"roc_auc": {"min": 0.7}}, "champion": {"enabled": False}}
    spec.pop("deploy")
    (folder / "modelyard.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder / "modelyard.yaml"


def wrk(
    url: str, connections: int, seconds: int, body: dict | None, auth: bool
) -> tuple[float, float, float, int]:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    lines = []
    if body is not None:
        lines += ['wrk.method = "POST"', f"wrk.body = [==[{json.dumps(body)}]==]",
                  'wrk.headers["Content-Type"] = "application/json"']  # fmt: skip
    if auth:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {TOKEN}"')
    script.write_text("\n".join(lines) + "\n")
    # One wrk thread: on two cores a second load thread only takes CPU from the server under test.
    threads = 1
    time.sleep(2)  # let the previous cell's stragglers finish before measuring
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    script.unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1))
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += (
        sum(
            int(n)
            for n in re.findall(
                r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
            )[0]
        )
        if "Socket errors" in out
        else 0
    )
    if errors:
        sys.exit(
            f"wrk saw {errors} failed requests against {url}; the numbers would be meaningless:\n{out}"
        )
    return rps, p50, p99, errors


def ask(url: str, body: dict, auth: bool) -> dict:
    """One request before measuring: both servers must answer 200 and agree."""
    headers = {"Content-Type": "application/json"} | (
        {"Authorization": f"Bearer {TOKEN}"} if auth else {}
    )
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        sys.exit(f"{url} answered {exc.code}: {exc.read().decode()[:500]}")


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def run(seconds: int) -> tuple[list[Result], dict[str, str]]:
    workspace = Path(tempfile.mkdtemp(prefix="modelyard-bench-"))
    results: list[Result] = []
    versions: dict[str, tuple[str, str]] = {}  # label -> (model name, version)
    for label, estimator in MODELS.items():
        name, version, bundle = train(workspace, estimator)
        versions[label] = name, version
        # The no-op ceiling does no model work: measured once, beside the first model.
        results += serve_both(workspace, name, version, bundle, label, seconds,
                              ceiling=not results)  # fmt: skip
    facts = {
        "versions": ", ".join(f"{label}: {n} v{v}" for label, (n, v) in versions.items()),
        "workers": str(os.cpu_count() or 1),
        "seconds": str(seconds),
        "image": image_size(versions["logistic regression"][1]),
    }
    return results, facts


def serve_both(
    workspace: Path, name: str, version: str, bundle: Path, label: str, seconds: int,
    ceiling: bool,
) -> list[Result]:  # fmt: skip
    """One version served by modelyard (its bundle) and by `mlflow models serve` (the MLflow
    model), both measured at every concurrency."""
    cores = str(os.cpu_count() or 1)
    my_port, ml_port = free_port(), free_port()
    env = {**os.environ, "MODELYARD_WORKSPACE": str(workspace), "MODELYARD_SERVE_TOKEN": TOKEN}
    mine = start([str(BIN / "modelyard"), "serve", str(bundle), "--port", str(my_port), "--workers", cores],
                 env, workspace / f"{name}-modelyard.log")  # fmt: skip
    ml_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
              "MLFLOW_DISABLE_TELEMETRY": "true",
              # mlflow execs `uvicorn` by name: it must find the venv's.
              "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    theirs = start([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}/{version}", "-p", str(ml_port),
                    "-h", "127.0.0.1", "--env-manager", "local", "-w", cores],
                   ml_env, workspace / f"{name}-mlflow.log")  # fmt: skip
    results = []
    try:
        wait_ready(
            f"http://127.0.0.1:{my_port}/health/ready", mine, workspace / f"{name}-modelyard.log"
        )
        wait_ready(f"http://127.0.0.1:{ml_port}/ping", theirs, workspace / f"{name}-mlflow.log")
        body = {"dataframe_split": ROW}
        answers = {server: ask(f"http://127.0.0.1:{port}/invocations", body, auth)
                   for server, port, auth in (("mlflow", ml_port, False), ("modelyard", my_port, True))}  # fmt: skip
        if answers["mlflow"] != answers["modelyard"]:
            sys.exit(f"the servers disagree on the benchmark row ({label}): {answers}")
        for c in CONCURRENCY:
            for server, port, auth in (
                ("mlflow models serve", ml_port, False),
                ("modelyard", my_port, True),
            ):
                url = f"http://127.0.0.1:{port}/invocations"
                results.append(
                    Result(label, server, "/invocations", c, *wrk(url, c, seconds, body, auth))
                )
            if ceiling:
                url = f"http://127.0.0.1:{my_port}/health/live"
                results.append(
                    Result("—", CEILING, "GET /health/live", c, *wrk(url, c, seconds, None, False))
                )
    finally:
        for process in (mine, theirs):
            process.terminate()
            process.wait(timeout=30)
    return results


def image_size(version: str) -> str:
    try:
        out = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", f"modelyard/ad_clicks:{version}"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return f"{int(out) / 1e6:.0f} MB"
    except (OSError, subprocess.CalledProcessError, ValueError):
        return "not built here (see tests/test_image.py, which asserts < 300 MB)"


def table(results: list[Result], facts: dict[str, str]) -> str:
    by = {(r.model, r.server, r.connections): r for r in results}
    lines = [
        "| model | server | connections | requests/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.server} | {r.connections} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} |"
        )
    lines.append("")
    for model in MODELS:
        ratios = []
        for c in CONCURRENCY:
            mine, theirs = by[(model, "modelyard", c)], by[(model, "mlflow models serve", c)]
            ceiling = by[("—", CEILING, c)]
            ratios.append(
                f"{c}: **{mine.rps / theirs.rps:.1f}×** ({mine.rps / ceiling.rps:.0%} of the ceiling)"
            )
        lines.append(
            f"- {model}, modelyard's throughput over mlflow's at concurrency " + "; ".join(ratios)
        )
    lines.append(
        f"- image: modelyard {facts['image']}; `mlflow models build-docker`: {MLFLOW_IMAGE_DOCS}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    results, facts = run(args.seconds)
    text = table(results, facts)
    print(text)
    if args.write:
        write_doc(text, facts, args.seconds)


def write_doc(text: str, facts: dict[str, str], seconds: int) -> None:
    replace_section("serving", (
        f"{stamp()}; {facts['versions']}; {facts['workers']} worker processes per server, "
        f"wrk {seconds} s per cell, one-row `dataframe_split` requests with keep-alive, both servers "
        "running side by side. Command: `make bench`.\n\n" + text
    ))  # fmt: skip


if __name__ == "__main__":
    main()
