"""Serving benchmark: modelyard's server vs `mlflow models serve` and MLServer on the same MLflow
version, against the machine's own limit.

Three models on the ad-clicks data: the example's logistic regression, a random forest and
LightGBM. For each, the three servers run side by side on this machine with one process per
core (started one after another, measured in turn), answering one-row requests from wrk over
loopback with keep-alive at several concurrencies. modelyard runs with bearer auth and
Prometheus metrics on. The yardstick is what the machine answers with no application at all:
nginx's `return 200` with as many workers, measured in the same run; modelyard's no-op route
(GET /health/live) is printed beside it; where the targets are (8 and 32 connections) those
three are measured in alternated rounds and each cell is the median round. Each server's
memory (RSS and PSS of its parent and workers, from /proc), its time from start to ready and
one 10,000-row request's time are printed too, and the image's and a process-runtime host's
environment's sizes. Prints a Markdown table; `--write` replaces the serving section of
docs/benchmarks.md.

Usage: python -m bench.serving [--seconds 10] [--write] [--without-mlserver]
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
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from bench import mlserver as bench_mlserver
from bench.common import replace_section, stamp
from modelyard.ports import free_port

if TYPE_CHECKING:
    import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKEN = "bench-token-0123456789abcdef"
ROW = {"columns": ["age", "gender", "pages_viewed", "previous_clicks", "time_on_site", "device"],
       "data": [[29, "female", 41, 4, 17.5, "desktop"]]}  # fmt: skip
CONCURRENCY = (1, 8, 32)
ROUNDS, ROUNDS_AT = 3, (8, 32)  # measure_cells: alternated rounds where the targets are
# The example as shipped, then a tree ensemble and a boosted model trained on the same data.
MODELS: dict[str, dict | None] = {
    "logistic regression": None,
    "random forest": {"class": "sklearn.ensemble.RandomForestClassifier",
                      "params": {"n_estimators": 100, "max_depth": 12}},
    "LightGBM": {"class": "lightgbm.LGBMClassifier",
                 "params": {"n_estimators": 200, "verbose": -1}},
}  # fmt: skip
MODELYARD, MLFLOW, MLSERVER = "modelyard", "mlflow models serve", "MLServer 1.7.1"
NOOP = "modelyard no-op"
NGINX = "nginx `return 200` (the machine's limit)"
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


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> float:
    """Seconds from now until `url` answers (call it right after starting `process`)."""
    started = time.monotonic()
    while time.monotonic() < started + timeout:
        if process.poll() is not None:
            sys.exit(f"{url} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return time.monotonic() - started
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(url)


def tree_memory(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MB of `pid` and its descendants: RSS counts shared pages once per process,
    PSS divides them among the processes sharing them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    rss = pss = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        pending += children.get(current, [])
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
        except OSError:
            continue
        rss += int(re.search(r"^Rss:\s+(\d+)", rollup, re.M).group(1))
        pss += int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1))
    return rss / 1024, pss / 1024


LARGE_ROWS = 10_000  # modelyard's default MODELYARD_SERVE_MAX_ROWS


def ad_clicks_rows(rows: int, seed: int) -> pd.DataFrame:
    """Rows of the ad-clicks example's own generator, without the target."""
    sys.path.insert(0, str(ROOT / "examples" / "ad_clicks"))
    from data import generate

    return generate(rows, seed).drop(columns=["clicked"])


def large_split() -> dict:
    """`LARGE_ROWS` generated rows, `dataframe_split`'s value."""
    frame = ad_clicks_rows(LARGE_ROWS, 11)
    split: dict = json.loads(frame.to_json(orient="split", index=False))
    return split


def timed_requests(asks: list[tuple[str, dict, bool]], rounds: int = 5) -> list[float]:
    """The median seconds each server takes to answer one request (url, body, auth), after one
    untimed each; the servers asked in turn, `rounds` times, so each one's figure comes from the
    same minutes as the others' (this VM's speed moves from one minute to the next). Each body
    is encoded once beforehand and each answer read but not decoded, so the client's JSON work
    is in no server's figure."""
    requests = []
    for url, body, auth in asks:
        ask(url, body, auth)
        requests.append(
            urllib.request.Request(url, data=json.dumps(body).encode(), headers=_headers(auth))
        )
    times: list[list[float]] = [[] for _ in requests]
    for _ in range(rounds):
        for request, taken in zip(requests, times, strict=True):
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
            taken.append(time.perf_counter() - started)
    return [sorted(taken)[len(taken) // 2] for taken in times]


def wait_idle(share: float = 0.9, timeout: float = 15) -> None:
    """Until the cores are at least `share` idle over a quarter second (from /proc/stat)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = _cpu_times()
        time.sleep(0.25)
        after = _cpu_times()
        spent = [b - a for a, b in zip(before, after, strict=True)]
        if sum(spent) and (spent[3] + spent[4]) / sum(spent) >= share:  # idle, iowait
            return


def _cpu_times() -> list[int]:
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def _headers(auth: bool) -> dict[str, str]:
    return {"Content-Type": "application/json"} | (
        {"Authorization": f"Bearer {TOKEN}"} if auth else {}
    )


@dataclass
class LargeRequest:
    model: str
    server: str
    ms: float  # the median of `timed_requests`


@dataclass
class Footprint:
    server: str
    ready_s: float
    rss_mb: float
    pss_mb: float


def nginx(workspace: Path, cores: str) -> tuple[subprocess.Popen, int]:
    """nginx answering `return 200` with one worker per core: the HTTP ceiling of this machine."""
    port, folder = free_port(), workspace / "nginx"
    folder.mkdir()
    (folder / "nginx.conf").write_text(
        f"worker_processes {cores};\npid {folder}/nginx.pid;\nerror_log {folder}/error.log;\n"
        "daemon off;\nevents { worker_connections 1024; }\nhttp {\n  access_log off;\n"
        f'  server {{ listen 127.0.0.1:{port} reuseport; location / {{ return 200 "ok"; }} }}\n}}\n'
    )
    process = start(["nginx", "-c", str(folder / "nginx.conf"), "-p", str(folder)], dict(os.environ),
                    folder / "stdout.log")  # fmt: skip
    wait_ready(f"http://127.0.0.1:{port}/", process, folder / "error.log")
    return process, port


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
    """One request before measuring: the server must answer 200 (the caller compares the answers)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=_headers(auth))
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


def run(
    seconds: int, with_mlserver: bool
) -> tuple[list[Result], list[LargeRequest], list[Footprint], dict[str, str]]:
    workspace = Path(tempfile.mkdtemp(prefix="modelyard-bench-"))
    cache = Path(os.environ.get("MODELYARD_WORKSPACE", ROOT / ".modelyard")) / "bench"
    mlserver = bench_mlserver.environment(cache, BIN / "uv") if with_mlserver else None
    results: list[Result] = []
    large: list[LargeRequest] = []
    footprints: list[Footprint] = []
    versions: dict[str, tuple[str, str]] = {}  # label -> (model name, version)
    trained = {label: train(workspace, estimator) for label, estimator in MODELS.items()}
    limit, limit_port = nginx(workspace, str(os.cpu_count() or 1))
    try:
        for label, (name, version, bundle) in trained.items():
            versions[label] = name, version
            # nginx beside every model, so each model's ratio to it comes from the same minutes;
            # the no-op route does no model work: once, beside the first model.
            more, timed, used = serve_all(workspace, name, version, bundle, label, seconds,
                                          limit_port, not results, mlserver)  # fmt: skip
            results += more
            large += timed
            footprints = footprints or used  # each server's, beside the first model
    finally:
        limit.terminate()
        limit.wait(timeout=30)
    facts = {
        "versions": ", ".join(f"{label}: {n} v{v}" for label, (n, v) in versions.items()),
        "workers": str(os.cpu_count() or 1),
        "seconds": str(seconds),
        "image": image_size(versions["logistic regression"][1]),
        "process runtime": process_runtime_size(workspace),
    }
    return results, large, footprints, facts


@dataclass
class Peer:
    """A server under test: how it started, where it answers and how it is spoken to."""

    name: str
    process: subprocess.Popen
    url: str  # its inference route
    auth: bool
    request: Callable[[dict], dict]  # a `dataframe_split` -> its request body
    predictions: Callable[[dict], list]  # its answer -> one prediction per row
    ready_s: float = 0.0


def _number(value: object) -> object:
    return float(value) if isinstance(value, int | float) else value


def _mlflow_shape(split: dict) -> dict:
    return {"dataframe_split": split}


def _mlflow_predictions(answer: dict) -> list:
    predictions: list = answer["predictions"]
    return predictions


def start_peers(
    workspace: Path, name: str, version: str, bundle: Path, mlserver: Path | None
) -> list[Peer]:
    """modelyard on the bundle, `mlflow models serve` and MLServer on the registered model,
    each with one worker per core, started one after another so each one's time to ready is
    its own."""
    cores = str(os.cpu_count() or 1)
    tracking = f"sqlite:///{workspace / 'mlflow.db'}"
    peers = []
    my_port, ml_port = free_port(), free_port()
    env = {**os.environ, "MODELYARD_WORKSPACE": str(workspace), "MODELYARD_SERVE_TOKEN": TOKEN}
    ml_env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "MLFLOW_DISABLE_TELEMETRY": "true",
              # mlflow execs `uvicorn` by name: it must find the venv's.
              "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    launches = [
        (MODELYARD, [str(BIN / "modelyard"), "serve", str(bundle), "--port", str(my_port), "--workers", cores],
         env, my_port, "/health/ready", "/invocations", True, _mlflow_shape, _mlflow_predictions),
        (MLFLOW, [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}/{version}", "-p", str(ml_port),
                  "-h", "127.0.0.1", "--env-manager", "local", "-w", cores],
         ml_env, ml_port, "/ping", "/invocations", False, _mlflow_shape, _mlflow_predictions),
    ]  # fmt: skip
    if mlserver is not None:
        folder = bench_mlserver.model_folder(workspace, tracking, name, version)
        launches.append((MLSERVER, [str(mlserver), "start", str(folder)], dict(os.environ),
                         bench_mlserver.port(folder), "/v2/health/ready", f"/v2/models/{name}/infer",
                         False, bench_mlserver.v2_request, bench_mlserver.predictions))  # fmt: skip
    try:
        for server, command, server_env, port, ready, route, auth, shape, read in launches:
            log = workspace / f"{name}-{server.split()[0].lower()}.log"
            process = start(command, server_env, log)
            peer = Peer(server, process, f"http://127.0.0.1:{port}{route}", auth, shape, read)
            peers.append(peer)
            peer.ready_s = wait_ready(f"http://127.0.0.1:{port}{ready}", process, log)
    except BaseException:  # one that never got ready (sys.exit): stop those already up
        stop_peers(peers)
        raise
    return peers


def stop_peers(peers: list[Peer]) -> None:
    for peer in peers:
        peer.process.terminate()
        peer.process.wait(timeout=30)


def serve_all(
    workspace: Path, name: str, version: str, bundle: Path, label: str, seconds: int,
    limit_port: int, noop: bool, mlserver: Path | None,
) -> tuple[list[Result], list[LargeRequest], list[Footprint]]:  # fmt: skip
    """One version served by every peer, each measured at every concurrency, nginx's `return
    200` on `limit_port` beside them (and, with `noop`, modelyard's no-op route). Also each
    server's start-to-ready time and memory, and one large request's time."""
    peers = start_peers(workspace, name, version, bundle, mlserver)
    results = []
    try:
        row = {peer.name: peer.predictions(ask(peer.url, peer.request(ROW), peer.auth))
               for peer in peers}  # fmt: skip
        # As numbers: MLServer gives a label 1 as 1.0.
        if len({json.dumps([_number(v) for v in answer]) for answer in row.values()}) != 1:
            sys.exit(f"the servers disagree on the benchmark row ({label}): {row}")
        for c in CONCURRENCY:
            results += measure_cells(label, peers, limit_port, noop, c, seconds)
        split = large_split()
        wait_idle()  # a peer may still be answering what the last load left queued
        seconds_each = timed_requests([(p.url, p.request(split), p.auth) for p in peers])
        large = [LargeRequest(label, peer.name, 1000 * taken)
                 for peer, taken in zip(peers, seconds_each, strict=True)]  # fmt: skip
        # After the load: what each server holds once it has served.
        footprints = [Footprint(peer.name, peer.ready_s, *tree_memory(peer.process.pid))
                      for peer in peers]  # fmt: skip
    finally:
        stop_peers(peers)
    return results, large, footprints


def measure_cells(
    label: str, peers: list[Peer], limit_port: int, noop: bool, c: int, seconds: int
) -> list[Result]:
    """One concurrency's cells: the Python peers once; modelyard, nginx's `return 200` and (with
    `noop`) the no-op route alternated for `ROUNDS` rounds at the targets' concurrencies, each
    cell the round with the median requests/s. On this VM a 5-second cell
    moves by several percent from one minute to the next: alternating, modelyard's ratio to
    nginx is taken from neighbouring minutes, and the median leaves out a disturbed one."""
    ours: list[tuple[str, str, str, str, dict | None, bool]] = [
        (label, peers[0].name, "/invocations", peers[0].url, peers[0].request(ROW), peers[0].auth)
    ]
    ours.append((label, NGINX, "GET /", f"http://127.0.0.1:{limit_port}/", None, False))
    if noop:
        my_port = urllib.parse.urlsplit(peers[0].url).port
        ours.append(("—", NOOP, "GET /health/live", f"http://127.0.0.1:{my_port}/health/live",
                     None, False))  # fmt: skip
    rounds = ROUNDS if c in ROUNDS_AT else 1
    cells: dict[str, list[tuple[float, float, float, int]]] = {}
    for _ in range(rounds):
        for _model, server, _route, url, body, auth in ours:
            cells.setdefault(server, []).append(wrk(url, c, seconds, body, auth))
    others = [Result(label, peer.name, "/invocations", c,
                     *wrk(peer.url, c, seconds, peer.request(ROW), peer.auth))
              for peer in peers[1:]]  # fmt: skip
    mine = {server: Result(model, server, route, c, *_median_cell(cells[server]))
            for model, server, route, *_ in ours}  # fmt: skip
    return [mine[peers[0].name], *others, *(mine[server] for _, server, *_ in ours[1:])]


def _median_cell(cells: list[tuple[float, float, float, int]]) -> tuple[float, float, float, int]:
    """The round with the median requests/s (its latencies with it), and every round's errors."""
    chosen = sorted(cells)[len(cells) // 2]
    return (*chosen[:3], sum(cell[3] for cell in cells))


def process_runtime_size(workspace: Path) -> str:
    """The size on disk of what a process-runtime host installs: the serving wheelhouse put
    into a virtualenv by the same script the hosts run."""
    from modelyard.config import Settings
    from modelyard.package.image import INSTALLER, flat_wheels, prepare_wheelhouse

    house = prepare_wheelhouse(Settings(workspace=workspace), lambda _: None)
    flat = flat_wheels(house, workspace / "process-runtime-wheels")
    venv = workspace / "process-runtime"
    # The interpreter this virtualenv was made from: the wheels are for its Python version.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run(["sh", str(flat / INSTALLER), str(venv), base], check=True)
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    return f"{size / 1e6:.0f} MB"


def image_size(version: str) -> str:
    try:
        # Tagged by version and bundle digest: found by its labels, the newest first.
        newest = subprocess.run(["docker", "image", "ls", "-q", "--filter", "label=io.modelyard.model.name=ad_clicks",
                                 "--filter", f"label=io.modelyard.model.version={version}"],
                                capture_output=True, text=True, check=True).stdout.split()[0]  # fmt: skip
        out = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", newest],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return f"{int(out) / 1e6:.0f} MB"
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return "not built here (see tests/test_image.py, which asserts < 300 MB)"


def table(
    results: list[Result], large: list[LargeRequest], footprints: list[Footprint],
    facts: dict[str, str],
) -> str:  # fmt: skip
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
        timed = {t.server: t.ms for t in large if t.model == model}
        ours = timed.pop(MODELYARD)
        lines.append(f"- {model}, one {LARGE_ROWS:,}-row request: modelyard {ours:.0f} ms; "
                     + "; ".join(f"{peer} {ms:.0f} ms (**{ms / ours:.1f}×** modelyard's)"
                                 for peer, ms in timed.items()))  # fmt: skip
        for c in CONCURRENCY:
            mine, limit = by[(model, MODELYARD, c)], by[(model, NGINX, c)]
            over = [f"**{mine.rps / r.rps:,.0f}×** {r.server}'s" for r in results
                    if (r.model, r.connections) == (model, c)
                    and r.server not in (MODELYARD, NGINX)]  # fmt: skip
            lines.append(f"- {model}, {c} connections: modelyard {mine.rps / limit.rps:.0%} of "
                         f"nginx; " + ", ".join(over))  # fmt: skip
    for f in footprints:
        lines.append(f"- {f.server}: ready {f.ready_s:.2f} s after start; parent and workers "
                     f"{f.rss_mb:.0f} MB RSS, {f.pss_mb:.0f} MB PSS after the load")  # fmt: skip
    lines.append(
        f"- image: modelyard {facts['image']}; `mlflow models build-docker`: {MLFLOW_IMAGE_DOCS}"
    )
    lines.append(f"- a process-runtime host's serving environment: {facts['process runtime']} on "
                 "disk, only what serving imports (tests/test_deploy.py checks the list)")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--without-mlserver", action="store_true",
                        help="leave MLServer out (it is installed from PyPI on first use)")  # fmt: skip
    args = parser.parse_args()
    results, large, footprints, facts = run(args.seconds, not args.without_mlserver)
    text = table(results, large, footprints, facts)
    print(text)
    if args.write:
        write_doc(text, facts, args.seconds)


def write_doc(text: str, facts: dict[str, str], seconds: int) -> None:
    replace_section("serving", (
        f"{stamp()}; {facts['versions']}; {facts['workers']} worker processes per server, "
        f"wrk {seconds} s per cell, one-row requests with keep-alive, the servers "
        "running side by side and measured in turn; nginx beside each model, at 8 and 32 "
        f"connections alternated with modelyard (and the no-op route) for {ROUNDS} rounds, each "
        "cell the median round. "
        "Command: `make bench`.\n\n" + text
    ))  # fmt: skip


if __name__ == "__main__":
    main()
