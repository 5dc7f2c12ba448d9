"""Lead time: from `git push` to the ad-clicks model answering on staging, cold and warm.

Everything is the real path a team's push takes: a bare repository with modelyard's
post-receive hook, the stack's Prefect and MLflow servers, one `modelyard worker`, the
pipeline deployment, and a staging environment on this machine (container runtime, nginx
front door). The clock starts before `git push` and stops when staging's `/version` names the
new version.

- cold: the first push on a clean workspace (no wheelhouse, no image layers of this model, no
  cached stage, a worker that never ran a flow);
- warm: a second commit changing one hyper-parameter (C of the logistic regression).

Each stage's share comes from its Prefect task run. Overhead is everything that is not
training, validation, building or deploying: the hook and trigger, the worker's pickup and
the flow process's start, checkout, spec and MLflow bookkeeping, and the gaps between tasks.

Usage: python -m bench.lead_time [--write]
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
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import yaml

from bench.common import replace_section, stamp, stop_services
from modelyard.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("modelyard"))
CATEGORIES = {
    "training": ("load-data", "train", "log-training"),
    "validation": ("validate-data", "validate-model", "validate-behaviour", "validate-infra"),
    "building": ("export", "register", "package", "build-image"),
    "deploying": ("deploy",),
}
TARGETS = {"warm": 60.0, "overhead share": 0.10}


@dataclass
class Measured:
    label: str
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)  # task name → seconds
    by_category: dict[str, float] = field(default_factory=dict)
    timeline: dict[str, float] = field(default_factory=dict)  # event → seconds after the push

    @property
    def overhead(self) -> float:
        return self.seconds - sum(self.by_category.values())


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = {name: free_port() for name in ("prefect", "mlflow", "registry", "prometheus")}
        self.staging = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")},
            "MODELYARD_WORKSPACE": str(root / "workspace"),
            "MODELYARD_BUILD_IMAGE": "always",
            "MODELYARD_ACTOR": "lead-time-bench",
            **{f"MODELYARD_STACK_{n.upper()}_PORT": str(p) for n, p in self.ports.items()},
        }  # fmt: skip
        self.repo, self.origin = root / "repo", root / "origin.git"

    def cli(self, *args: str) -> str:
        done = subprocess.run([EXE, *args], env=self.env, capture_output=True, text=True,
                              cwd=self.repo if self.repo.exists() else None)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"modelyard {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def git(self, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=self.repo, check=True, capture_output=True,
                              text=True).stdout.strip()  # fmt: skip

    def set_up(self) -> None:
        (self.repo / "examples").mkdir(parents=True)
        shutil.copytree(ROOT / "examples" / "ad_clicks", self.repo / "examples" / "ad_clicks",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        shutil.copytree(ROOT / "model_tests", self.repo / "model_tests",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        spec = self.spec()
        spec["deploy"] = {"environments": {
            "staging": {"target": "local", "runtime": "container", "port": self.staging},
            "production": {"target": "local", "runtime": "container", "port": free_port()},
        }}  # fmt: skip
        self.write_spec(spec)
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.origin)], check=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.email", "bench@example.invalid")
        self.git("config", "user.name", "bench")
        self.git("remote", "add", "origin", str(self.origin))
        self.commit("ad_clicks, first commit")
        self.cli("stack", "up", "prefect", "mlflow")
        self.cli("hooks", "install", str(self.origin))
        self.cli("pipelines", "apply", "examples/ad_clicks/modelyard.yaml",
                 "--repository", str(self.origin))  # fmt: skip
        log = (self.root / "worker.log").open("w")
        self.worker = subprocess.Popen([EXE, "worker", "--limit", "1"], env=self.env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def spec_path(self) -> Path:
        return self.repo / "examples" / "ad_clicks" / "modelyard.yaml"

    def spec(self) -> dict:
        return yaml.safe_load(self.spec_path().read_text())

    def write_spec(self, spec: dict) -> None:
        self.spec_path().write_text(yaml.safe_dump(spec, sort_keys=False))

    def commit(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    def push_and_wait(self, label: str, version: str) -> Measured:
        sha = self.git("rev-parse", "HEAD")
        started = time.perf_counter()
        self.git("push", "-q", "origin", "main")  # the hook triggers the run
        deadline = started + 1800
        while time.perf_counter() < deadline:
            if self._staging_version() == version:
                break
            self._fail_if_failed(sha)
            time.sleep(0.2)
        else:
            raise SystemExit(f"{label}: staging never served v{version}")
        measured = Measured(label, time.perf_counter() - started)
        healthy_at = time.time()
        pushed_at = healthy_at - measured.seconds
        self._until_paused(sha)  # staging answers a moment before the run reaches its pause
        for name, seconds in self._stages(sha, pushed_at, healthy_at).items():
            measured.stages[name] = seconds
        for category, names in CATEGORIES.items():
            measured.by_category[category] = sum(measured.stages.get(n, 0.0) for n in names)
        measured.timeline = self._timeline(sha, pushed_at)
        self.cli("reject", "--commit", sha, "--reason", "benchmark: staging only")
        self._until_final(sha)  # the next push starts with an idle worker, as in steady state
        return measured

    def _until_final(self, sha: str) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            run = self._run(sha)
            if run and run["state"]["type"] in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
                return
            time.sleep(0.5)
        raise SystemExit("the rejected run never finished")

    def _timeline(self, sha: str, pushed_at: float) -> dict[str, float]:
        """Seconds after the push at which the run was created, started, began its first
        stage, and ended its last one before the pause."""
        run = self._run(sha)
        assert run is not None
        tasks = self._api("task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        starts = [_epoch(t["start_time"]) for t in tasks if t["start_time"]]
        ends = [_epoch(t["end_time"]) for t in tasks if t["end_time"]]
        return {
            "run created": _epoch(run["created"]) - pushed_at,
            "flow started": _epoch(run["start_time"]) - pushed_at,
            "first stage": min(starts) - pushed_at,
            "last stage ended": max(ends) - pushed_at,
        }

    def _until_paused(self, sha: str) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            run = self._run(sha)
            if run and run["state"]["type"] == "PAUSED":
                return
            self._fail_if_failed(sha)
            time.sleep(0.5)
        raise SystemExit("the run never reached its approval pause")

    def _staging_version(self) -> str | None:
        try:
            answer = httpx.get(f"http://127.0.0.1:{self.staging}/version", timeout=2)
            return answer.json().get("model_version") if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def _api(self, path: str, body: dict) -> list[dict]:
        url = f"http://127.0.0.1:{self.ports['prefect']}/api/{path}"
        return httpx.post(url, json=body, timeout=10).json()

    def _run(self, sha: str) -> dict | None:
        runs = self._api("flow_runs/filter", {"flow_runs": {"tags": {"all_": [f"commit:{sha}"]}}})
        return runs[0] if runs else None

    def _fail_if_failed(self, sha: str) -> None:
        run = self._run(sha)
        if run and run["state"]["type"] in ("FAILED", "CRASHED"):
            raise SystemExit(f"the run failed: {run['state']['message']}")

    def _stages(self, sha: str, pushed_at: float, healthy_at: float) -> dict[str, float]:
        """Seconds of each stage inside the lead time: the deploy task goes on after staging
        answers (the old slot drains, the ledger is written), and that is not lead time."""
        run = self._run(sha)
        assert run is not None
        tasks = self._api("task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        seconds: dict[str, float] = defaultdict(float)
        for task in tasks:
            if task["start_time"] and task["end_time"]:
                start = max(_epoch(task["start_time"]), pushed_at)
                end = min(_epoch(task["end_time"]), healthy_at)
                seconds[_stage(task["name"])] += max(0.0, end - start)
        return dict(seconds)

    def tear_down(self) -> None:
        if getattr(self, "worker", None):
            os.killpg(self.worker.pid, 15)
            self.worker.wait(timeout=60)
        subprocess.run([EXE, "stack", "down"], env=self.env, capture_output=True)
        stop_services(self.root, self.env)


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _stage(task_name: str) -> str:
    """Prefect names task runs `<task>-<3 hex>`."""
    return task_name.rsplit("-", 1)[0]


def table(results: list[Measured]) -> str:
    lines = ["| push | lead time s | training | validation | building | deploying | overhead |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in results:
        cells = [
            f"{m.by_category[c]:.1f} s ({m.by_category[c] / m.seconds:.0%})" for c in CATEGORIES
        ]
        cells.append(f"{m.overhead:.1f} s ({m.overhead / m.seconds:.0%})")
        lines.append(f"| {m.label} | {m.seconds:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Stages (seconds, from the Prefect task runs):", "",
              "| stage | " + " | ".join(m.label for m in results) + " |",
              "|---|" + "---|" * len(results)]  # fmt: skip
    names = sorted(
        {n for m in results for n in m.stages}, key=lambda n: -results[0].stages.get(n, 0)
    )
    for name in names:
        lines.append(
            f"| {name} | " + " | ".join(f"{m.stages.get(name, 0):.1f}" for m in results) + " |"
        )
    lines += ["", "Timeline (seconds after `git push`):", "",
              "| event | " + " | ".join(m.label for m in results) + " |",
              "|---|" + "---|" * len(results)]  # fmt: skip
    for event in results[0].timeline:
        lines.append(
            f"| {event} | " + " | ".join(f"{m.timeline[event]:.1f}" for m in results) + " |"
        )
    warm = next(m for m in results if m.label == "warm")
    lines += ["", f"- warm lead time {warm.seconds:.1f} s (target under {TARGETS['warm']:.0f} s); "
              f"orchestration overhead {warm.overhead:.1f} s, {warm.overhead / warm.seconds:.1%} of it "
              f"(target under {TARGETS['overhead share']:.0%})"]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    bench = Bench(Path(tempfile.mkdtemp(prefix="modelyard-lead-")))
    try:
        bench.set_up()
        cold = bench.push_and_wait("cold", "1")
        spec = bench.spec()
        spec["estimator"]["params"]["C"] = 0.5
        bench.write_spec(spec)
        bench.commit("ad_clicks: C 1.0 → 0.5")
        warm = bench.push_and_wait("warm", "2")
    finally:
        bench.tear_down()
    text = table([cold, warm])
    print(text)
    if args.write:
        replace_section("lead-time", f"{stamp()}. Command: `make bench`.\n\n{text}")
    print(json.dumps({"cold": cold.seconds, "warm": warm.seconds}))


if __name__ == "__main__":
    main()
