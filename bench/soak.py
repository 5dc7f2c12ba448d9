"""Soak: the serving app under sustained load, its memory and latency sampled throughout.

Registers the ad-clicks example through the real pipeline, serves its signed bundle as a
deployment does (`modelyard serve`, one worker process per core, bearer auth and metrics on),
and drives one-row `/invocations` requests with wrk over loopback, keep-alive, at a bounded
concurrency, in back-to-back windows. After each window it reads the resident memory of the
whole server (every worker process) from /proc and wrk's latency percentiles. The verdict:
no failed request, p99 of every window within the model's latency budget, and memory after
the last window within `--growth` of memory after the first (warm-up) window.

Usage: python -m bench.soak [--minutes 5] [--connections 8] [--write]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.common import replace_section, stamp
from bench.serving import BIN, ROW, TOKEN, start, train, wait_ready, wrk
from modelyard.ports import free_port
from modelyard.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
WINDOW_SECONDS = 30


@dataclass
class Window:
    index: int
    rps: float
    p50_ms: float
    p99_ms: float
    rss_mb: float


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` and all its descendants (the uvicorn workers)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines()
                      if line.startswith("VmRSS:"))  # fmt: skip
        pending += [int(c) for c in children]
    return total / 1024


def soak(minutes: float, connections: int) -> tuple[list[Window], dict[str, str]]:
    workspace = Path(tempfile.mkdtemp(prefix="modelyard-soak-"))
    _, version, bundle = train(workspace, estimator=None)
    port = free_port()
    env = {**os.environ, "MODELYARD_WORKSPACE": str(workspace), "MODELYARD_SERVE_TOKEN": TOKEN}
    server = start([str(BIN / "modelyard"), "serve", str(bundle), "--port", str(port),
                    "--workers", str(os.cpu_count() or 1)], env, workspace / "serve.log")  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    windows = []
    try:
        wait_ready(f"{url}/health/ready", server, workspace / "serve.log")
        count = max(2, round(minutes * 60 / WINDOW_SECONDS))
        for index in range(1, count + 1):
            # wrk exits the run on any failed request (bench.serving.wrk): errors end the soak.
            rps, p50, p99, _ = wrk(f"{url}/invocations", connections, WINDOW_SECONDS,
                                   {"dataframe_split": ROW}, auth=True)  # fmt: skip
            windows.append(Window(index, rps, p50, p99, rss_mb(server.pid)))
            print(f"window {index}/{count}: {rps:,.0f} req/s, p50 {p50:.2f} ms, "
                  f"p99 {p99:.2f} ms, RSS {windows[-1].rss_mb:.0f} MB", flush=True)  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    budget = load_spec(ROOT / "examples" / "ad_clicks" / "modelyard.yaml").behaviour.latency
    return windows, {"version": version, "budget_ms": f"{budget.budget_ms:g}",
                     "connections": str(connections)}  # fmt: skip


def report(windows: list[Window], facts: dict[str, str], growth: float) -> tuple[str, bool]:
    lines = ["| window | requests/s | p50 ms | p99 ms | server RSS MB |", "|---|---|---|---|---|"]
    lines += [f"| {w.index} | {w.rps:,.0f} | {w.p50_ms:.2f} | {w.p99_ms:.2f} | {w.rss_mb:.0f} |"
              for w in windows]  # fmt: skip
    first, last = windows[0].rss_mb, windows[-1].rss_mb
    grew = (last - first) / first
    worst = max(w.p99_ms for w in windows)
    budget = float(facts["budget_ms"])
    requests = sum(w.rps * WINDOW_SECONDS for w in windows)
    ok = grew <= growth and worst <= budget
    lines += [
        "",
        f"- {requests:,.0f} requests in {len(windows) * WINDOW_SECONDS / 60:.1f} min at "
        f"{facts['connections']} connections, none failed",
        f"- memory: {first:.0f} MB after the first window, {last:.0f} MB after the last "
        f"({grew:+.1%}; allowed {growth:+.0%})",
        f"- worst p99 of any window {worst:.2f} ms; the model's budget {budget:g} ms",
        f"- verdict: {'pass' if ok else 'FAIL'}",
    ]
    return "\n".join(lines), ok


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--growth", type=float, default=0.05, help="allowed RSS growth")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    windows, facts = soak(args.minutes, args.connections)
    text, ok = report(windows, facts, args.growth)
    print(text)
    if args.write:
        replace_section("soak", (
            f"{stamp()}, ad_clicks v{facts['version']}, {os.cpu_count()} worker processes, "
            f"wrk windows of {WINDOW_SECONDS} s back to back, one-row `dataframe_split` "
            f"requests with bearer auth. Command: `python -m bench.soak --minutes "
            f"{args.minutes:g} --write`.\n\n" + text
        ))  # fmt: skip
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
