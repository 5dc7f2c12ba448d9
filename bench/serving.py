"""Serving benchmark: modelyard's server vs `mlflow models serve` on the same ad-clicks version.

Both run side by side on this machine with one process per core, answering one-row requests
from wrk over loopback with keep-alive at several concurrencies. modelyard runs with bearer auth
and Prometheus metrics on. A no-op route (GET /health/live) on modelyard's own HTTP stack is the
ceiling. Prints a Markdown table; `--write` replaces the serving section of docs/benchmarks.md.

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

from bench.common import replace_section, stamp
from modelyard.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKEN = "bench-token-0123456789abcdef"
ROW = {"columns": ["age", "gender", "pages_viewed", "previous_clicks", "time_on_site", "device"],
       "data": [[29, "female", 41, 4, 17.5, "desktop"]]}  # fmt: skip
CONCURRENCY = (1, 8, 32)
CEILING = "modelyard no-op (ceiling)"
MLFLOW_IMAGE_DOCS = "1–3.7 GB (as MLflow users report for `mlflow models build-docker`)"


@dataclass
class Result:
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


def train(workspace: Path) -> tuple[str, Path]:
    """Register the ad-clicks model through the real pipeline; returns (version, bundle)."""
    # The image is built when a Docker engine is there (make bench starts one), for its size.
    env = {**os.environ, "MODELYARD_WORKSPACE": str(workspace), "MODELYARD_BUILD_IMAGE": "auto"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    # --no-deploy: the benchmarks serve the bundle themselves, on ports of their own.
    done = subprocess.run([str(BIN / "modelyard"), "run", "--no-deploy", "--spec", str(ROOT / "examples/ad_clicks/modelyard.yaml")],
                          env=env, capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
    version = re.search(r"ad_clicks version (\d+)", done.stdout).group(1)
    return version, workspace / "bundles" / "ad_clicks" / version / "bundle"


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
    version, bundle = train(workspace)
    cores = str(os.cpu_count() or 1)
    my_port, ml_port = free_port(), free_port()
    env = {**os.environ, "MODELYARD_WORKSPACE": str(workspace), "MODELYARD_SERVE_TOKEN": TOKEN}
    mine = start([str(BIN / "modelyard"), "serve", str(bundle), "--port", str(my_port), "--workers", cores],
                 env, workspace / "modelyard.log")  # fmt: skip
    ml_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
              "MLFLOW_DISABLE_TELEMETRY": "true",
              # mlflow execs `uvicorn` by name: it must find the venv's.
              "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    theirs = start([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/ad_clicks/{version}", "-p", str(ml_port),
                    "-h", "127.0.0.1", "--env-manager", "local", "-w", cores],
                   ml_env, workspace / "mlflow.log")  # fmt: skip
    results = []
    try:
        wait_ready(f"http://127.0.0.1:{my_port}/health/ready", mine, workspace / "modelyard.log")
        wait_ready(f"http://127.0.0.1:{ml_port}/ping", theirs, workspace / "mlflow.log")
        body = {"dataframe_split": ROW}
        answers = {name: ask(f"http://127.0.0.1:{port}/invocations", body, auth)
                   for name, port, auth in (("mlflow", ml_port, False), ("modelyard", my_port, True))}  # fmt: skip
        if answers["mlflow"] != answers["modelyard"]:
            sys.exit(f"the servers disagree on the benchmark row: {answers}")
        for c in CONCURRENCY:
            for name, port, auth in (
                ("mlflow models serve", ml_port, False),
                ("modelyard", my_port, True),
            ):
                url = f"http://127.0.0.1:{port}/invocations"
                results.append(Result(name, "/invocations", c, *wrk(url, c, seconds, body, auth)))
            url = f"http://127.0.0.1:{my_port}/health/live"
            results.append(
                Result(CEILING, "GET /health/live", c, *wrk(url, c, seconds, None, False))
            )
    finally:
        for process in (mine, theirs):
            process.terminate()
            process.wait(timeout=30)
    facts = {
        "version": version,
        "workers": cores,
        "seconds": str(seconds),
        "image": image_size(version),
    }
    return results, facts


def image_size(version: str) -> str:
    try:
        out = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", f"modelyard/ad_clicks:{version}"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return f"{int(out) / 1e6:.0f} MB"
    except (OSError, subprocess.CalledProcessError, ValueError):
        return "not built here (see tests/test_image.py, which asserts < 300 MB)"


def table(results: list[Result], facts: dict[str, str]) -> str:
    by = {(r.server, r.connections): r for r in results}
    lines = [
        "| server | connections | requests/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.server} | {r.connections} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} |"
        )
    lines.append("")
    for c in CONCURRENCY:
        mine, theirs, ceiling = (
            by[("modelyard", c)],
            by[("mlflow models serve", c)],
            by[(CEILING, c)],
        )
        lines.append(f"- concurrency {c}: modelyard **{mine.rps / theirs.rps:.1f}×** mlflow's throughput; "
                     f"{mine.rps / ceiling.rps:.0%} of the no-op ceiling")  # fmt: skip
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
        f"{stamp()}, ad_clicks v{facts['version']}, {facts['workers']} worker processes per server, "
        f"wrk {seconds} s per cell, one-row `dataframe_split` requests with keep-alive, both servers "
        "running side by side. Command: `make bench`.\n\n" + text
    ))  # fmt: skip


if __name__ == "__main__":
    main()
