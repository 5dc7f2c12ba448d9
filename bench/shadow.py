"""A shadow's cost to clients: p99 through the front door with and without a 10 % shadow.

The ad-clicks example registered twice through the real pipeline (v2 with another C), v1
deployed to an environment on this machine (container runtime, nginx front door, the stack's
Prometheus), then wrk through the front door in three windows side by side in one run:

- off: v1 alone;
- on: `modelyard deploy` of v2 as a shadow copying 10 % of the requests (its walk running, as
  in production), measured while its slot answers and compares the copies;
- off again, after `modelyard rollout abort`: the machine's drift between windows shows in the
  gap between the two off windows.

Both slots and wrk share this machine's cores, as a shadow shares a host with its baseline.
Also reported: the share of requests the shadow got, from both versions' request counters
in Prometheus before and after the window with it.

Usage: python -m bench.shadow [--seconds 20] [--connections 8] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.common import replace_section, stamp, stop_services
from bench.serving import ROW, TOKEN, wrk
from modelyard.monitor.canary import PREDICTION_ROUTES
from modelyard.monitor.drift import Prometheus
from modelyard.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("modelyard"))
SAMPLE = 0.1
ENVIRONMENT = "bench"


@dataclass
class Window:
    label: str
    rps: float
    p50_ms: float
    p99_ms: float


class ShadowBench:
    def __init__(self, root: Path, connections: int, seconds: int) -> None:
        self.root, self.connections, self.seconds = root, connections, seconds
        self.port, self.prometheus = free_port(), free_port()
        self.env = {
            **{k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")},
            "MODELYARD_WORKSPACE": str(root / "workspace"),
            "MODELYARD_BUILD_IMAGE": "always",
            "MODELYARD_SERVE_TOKEN": TOKEN,
            "MODELYARD_ACTOR": "shadow-bench",
            "MODELYARD_STACK_PROMETHEUS_PORT": str(self.prometheus),
            # Counts read before and after a 20 s window must be fresh: a scrape a second.
            "MODELYARD_PROMETHEUS_INTERVAL": "1",
        }  # fmt: skip
        self.repo = root / "repo"
        self.shadow: subprocess.Popen | None = None

    @property
    def spec_path(self) -> Path:
        return self.repo / "examples" / "ad_clicks" / "modelyard.yaml"

    def cli(self, *args: str) -> str:
        done = subprocess.run([EXE, *args], env=self.env, capture_output=True, text=True,
                              cwd=self.repo)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"modelyard {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def git(self, *args: str) -> None:
        subprocess.run(["git", *args], cwd=self.repo, check=True, capture_output=True)

    def set_up(self) -> None:
        """v1 and v2 registered, v1 serving the environment, Prometheus scraping it."""
        (self.repo / "examples").mkdir(parents=True)
        for folder in ("examples/ad_clicks", "model_tests"):
            shutil.copytree(ROOT / folder, self.repo / folder,
                            ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        spec = yaml.safe_load(self.spec_path.read_text())
        strategy = {"kind": "shadow", "sample": SAMPLE, "duration": 3600, "timeout": 3600}
        spec["deploy"] = {"environments": {ENVIRONMENT: {
            "target": "local", "runtime": "container", "port": self.port, "strategy": strategy,
        }}}  # fmt: skip
        self.spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        self.git("init", "-q", "-b", "main")
        self.git("-c", "user.email=bench@example.invalid", "-c", "user.name=bench", "add", "-A")
        self._commit("ad_clicks")
        self.cli("stack", "up", "prometheus")
        self.cli("run", "--no-deploy", "--spec", str(self.spec_path))
        spec["estimator"]["params"]["C"] = 0.5
        self.spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        self._commit("ad_clicks: C 1.0 → 0.5")
        self.cli("run", "--no-deploy", "--spec", str(self.spec_path))
        self.cli("deploy", ENVIRONMENT, "--version", "1", "--spec", str(self.spec_path))

    def _commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("-c", "user.email=bench@example.invalid", "-c", "user.name=bench",
                 "commit", "-q", "-m", message)  # fmt: skip

    def measure(self, label: str) -> Window:
        url = f"http://127.0.0.1:{self.port}/invocations"
        rps, p50, p99, _ = wrk(url, self.connections, self.seconds, {"dataframe_split": ROW},
                               auth=True)  # fmt: skip
        return Window(label, rps, p50, p99)

    def start_shadow(self) -> None:
        """`modelyard deploy` of v2 as a shadow; returns once its copies flow."""
        log = (self.root / "shadow-deploy.log").open("w")
        self.shadow = subprocess.Popen(
            [EXE, "deploy", ENVIRONMENT, "--version", "2", "--spec", str(self.spec_path)],
            env=self.env, cwd=self.repo, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = subprocess.run([EXE, "rollout", "status", ENVIRONMENT, "--json", "--spec",
                                     str(self.spec_path)], env=self.env, capture_output=True,
                                    text=True, cwd=self.repo)  # fmt: skip
            if status.returncode == 0 and status.stdout.lstrip().startswith("{"):
                return
            if self.shadow.poll() is not None:
                raise SystemExit(f"the shadow's deploy ended early; see {log.name}")
            time.sleep(1)
        raise SystemExit("the shadow never started")

    def answered(self) -> dict[str, float]:
        """Prediction requests each version's slots answered so far, as Prometheus scraped
        them (a scrape a second); waits until both versions' series are there."""
        prometheus = Prometheus(f"http://127.0.0.1:{self.prometheus}")
        query = (f'sum by (version) (modelyard_requests_total{{model="ad_clicks",'
                 f'environment="{ENVIRONMENT}",route=~"{PREDICTION_ROUTES}"}})')  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(3)  # past the next scrape
            counts = {version: n for (version,), n in prometheus.values(query, "version").items()}
            if {"1", "2"} <= set(counts):
                return counts
        raise SystemExit("Prometheus never scraped both versions' slots")

    def stop_shadow(self) -> None:
        self.cli("rollout", "abort", ENVIRONMENT, "--spec", str(self.spec_path))
        if self.shadow is not None:
            self.shadow.wait(timeout=300)

    def tear_down(self) -> None:
        if self.shadow is not None and self.shadow.poll() is None:
            self.shadow.kill()
        subprocess.run([EXE, "stack", "down"], env=self.env, capture_output=True, cwd=self.repo)
        stop_services(self.root, self.env)


def table(windows: list[Window], share: float) -> str:
    rows = [f"| {w.label} | {w.rps:,.0f} | {w.p50_ms:.2f} | {w.p99_ms:.2f} |" for w in windows]
    off = max(windows[0].p99_ms, windows[2].p99_ms)
    return "\n".join([
        "| front door | requests/s | p50 ms | p99 ms |", "|---|---|---|---|", *rows, "",
        f"The shadow got {share:.1%} of the requests (sample {SAMPLE:.0%}). Client p99 with "
        f"the shadow: {windows[1].p99_ms / off:.2f}× the worse of the two windows without it.",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--seconds", type=int, default=20, help="wrk seconds per window")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    bench = ShadowBench(Path(tempfile.mkdtemp(prefix="modelyard-shadow-")), args.connections,
                        args.seconds)  # fmt: skip
    try:
        bench.set_up()
        off = bench.measure("without a shadow")
        bench.start_shadow()
        before = bench.answered()
        on = bench.measure(f"with a {SAMPLE:.0%} shadow")
        after_on = bench.answered()
        share = (after_on["2"] - before["2"]) / (after_on["1"] - before["1"])
        bench.stop_shadow()
        after = bench.measure("without, after `rollout abort`")
    finally:
        bench.tear_down()
    text = table([off, on, after], share)
    print(text)
    if args.write:
        replace_section("shadow", f"{stamp()}, ad_clicks v1 serving and v2 as its shadow, one "
                        f"worker process per slot, wrk {args.seconds} s per window at "
                        f"{args.connections} connections, one-row `dataframe_split` requests with "
                        f"bearer auth. Command: `make bench`.\n\n{text}")  # fmt: skip
    print(json.dumps({"p99_ms": [w.p99_ms for w in (off, on, after)], "copied": share}))


if __name__ == "__main__":
    main()
