"""Prefect deployments of the pipeline, the work pool its workers serve, and runs for commits.

One deployment per model (named after it) of the flow `modelyard-pipeline`, on a `process` work
pool. Its parameters say where the code lives (`repository`, a URL or path every worker can
reach, and `spec_path` inside it); a trigger adds the commit, the branch and where the push came
from. Workers on any number of machines take the runs: each checks out the commit itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.workers.process import ProcessWorker

from modelyard.config import Settings
from modelyard.errors import ModelyardError
from modelyard.lineage import git, model_from_tags
from modelyard.spec import load_spec
from modelyard.trigger import PipelineDeployment, require_server

T = TypeVar("T")


def _now(coro: Coroutine[Any, Any, T]) -> T:
    """A coroutine run to its end from sync code (Prefect's helper is annotated `T | None`)."""
    return cast(T, run_coro_as_sync(coro))


POOL = "modelyard"
RUN_COMMAND = "python -m flows.fork_client"
Progress = Callable[[str], None]


# --- the work pool and the deployments -----------------------------------------------------------


def ensure_pool(name: str = POOL) -> None:
    async def ensure() -> None:
        async with get_client() as client:
            try:
                await client.read_work_pool(name)
            except ObjectNotFound:
                template = ProcessWorker.get_default_base_job_template()
                await client.create_work_pool(
                    WorkPoolCreate(name=name, type="process", base_job_template=template)
                )

    run_coro_as_sync(ensure())


def apply(specs: list[Path], repository: str | None, pool: str = POOL) -> list[PipelineDeployment]:
    """Create or update one deployment per spec; re-applying changes nothing but what changed."""
    from flows.pipeline import pipeline  # the whole training stack: only needed here

    ensure_pool(pool)
    applied = []
    for spec_file in specs:
        spec = load_spec(spec_file)  # a bad spec fails here, not in every later run
        root = _git_root(spec_file)
        repo = repository or _default_repository(root)
        relative = str(spec_file.resolve().relative_to(root))
        # From sync code, Prefect's sync_compatible method returns the deployment itself.
        deployment = cast(
            RunnerDeployment,
            pipeline.to_deployment(
                name=spec.name,
                parameters={"spec_path": relative, "repository": repo},
                description=f"{spec.name}: {spec.description or spec.task} — from {repo}",
                tags=["modelyard", f"model:{spec.name}"],
                work_pool_name=pool,
                # Under `modelyard worker` the run starts from its pre-imported fork server; under
                # a plain Prefect worker this command falls back to `python -m prefect.engine`.
                job_variables={"command": RUN_COMMAND},
                # The flow ships inside the modelyard package, so workers import it by module;
                # only the user's repository is checked out per run.
                entrypoint_type=EntrypointType.MODULE_PATH,
            ),
        )
        deployment_id = deployment.apply(work_pool_name=pool)
        applied.append(PipelineDeployment(str(deployment_id), spec.name, repo, relative, pool))
    return applied


def apply_monitors(specs: list[Path], pool: str = POOL) -> list[str]:
    """A scheduled drift check per spec and monitored environment (`monitoring.interval`);
    returns the deployments' names."""
    from flows.monitor import monitor

    ensure_pool(pool)
    applied = []
    for spec_file in specs:
        spec = load_spec(spec_file)
        for environment in spec.monitored_environments:
            name = f"{spec.name}-{environment}"
            deployment = cast(
                RunnerDeployment,
                monitor.to_deployment(
                    name=name,
                    interval=spec.monitoring.interval,
                    parameters={
                        "model": spec.name,
                        "environment": environment,
                        "monitoring": spec.monitoring.model_dump(mode="json"),
                    },
                    description=f"Drift of {spec.name} in {environment}, every "
                    f"{spec.monitoring.interval} s",
                    tags=["modelyard", f"model:{spec.name}", "monitor"],
                    work_pool_name=pool,
                    job_variables={"command": RUN_COMMAND},
                    entrypoint_type=EntrypointType.MODULE_PATH,
                ),
            )
            deployment.apply(work_pool_name=pool)
            applied.append(f"{deployment.flow_name}/{name}")
    return applied


def _git_root(spec_file: Path) -> Path:
    root = git(spec_file.resolve().parent, "rev-parse", "--show-toplevel")
    if root is None:
        raise ModelyardError(
            f"{spec_file} is not in a git repository; a pipeline deployment trains commits, so "
            "the spec must be committed to one"
        )
    return Path(root)


def _default_repository(root: Path) -> str:
    """The checkout's `origin` when it has one (what other machines can reach), else its path."""
    return git(root, "remote", "get-url", "origin") or str(root)


# --- runs waiting for a person ---------------------------------------------------------------


def paused_runs(commit: str, models: list[str] | None = None) -> list[FlowRun]:
    """Runs of `commit` waiting for approval: what a tag push or a Jenkins input step answers."""

    async def read() -> list[FlowRun]:
        async with get_client() as client:
            return await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[f"commit:{commit}"]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
                )
            )

    runs = _now(read())
    return [r for r in runs if not models or model_from_tags(r.tags) in models]


# --- following a run ----------------------------------------------------------------------------

FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


def follow(flow_run_id: str, progress: Progress, poll: float = 2.0) -> FlowRun:
    """Print each stage as it starts and ends; return once the run is final or waits for a
    person (paused for approval)."""
    seen: dict[str, str] = {}
    last_state = ""
    while True:
        run, tasks = _now(_read(UUID(flow_run_id)))
        for task_run in sorted(tasks, key=lambda t: t.expected_start_time or t.created):
            shown = task_run.state.name if task_run.state else "Pending"
            if seen.get(str(task_run.id)) != shown:
                seen[str(task_run.id)] = shown
                final = task_run.state is not None and task_run.state.is_final()
                took = f" ({task_run.total_run_time.total_seconds():.1f} s)" if final else ""
                progress(f"{task_run.name.rsplit('-', 1)[0]}: {shown}{took}")
        state = run.state
        if state and state.name != last_state:
            last_state = state.name or ""
            progress(
                f"run {run.name}: {state.name}{' — ' + state.message if state.message else ''}"
            )
        if state and (state.type in FINAL or state.is_paused()):
            return run
        time.sleep(poll)


async def _read(flow_run_id: UUID) -> tuple[FlowRun, list[Any]]:
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        tasks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return run, tasks


# --- workers ------------------------------------------------------------------------------------


def worker_command(pool: str, name: str | None, limit: int | None) -> list[str]:
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
               "--type", "process"]  # fmt: skip
    if name:
        command += ["--name", name]
    if limit:
        command += ["--limit", str(limit)]
    return command


def run_worker(
    settings: Settings, pool: str, name: str | None, limit: int | None, poll: float = 1.0
) -> int:
    """Serve the pool until stopped, with a fork server that starts each run pre-imported.

    Polls every `poll` seconds rather than Prefect's 10: a push's run should start at once, and
    a look is one cheap query. Runs inherit this environment.
    """
    require_server(settings)
    ensure_pool(pool)
    folder = Path(tempfile.mkdtemp(prefix="modelyard-worker-"))  # 0700; short for a socket path
    socket_path = folder / "fork.sock"
    env = {
        **os.environ,
        **settings.orchestrator_env(),
        "PREFECT_WORKER_QUERY_SECONDS": str(poll),
        "MODELYARD_FORKSERVER": str(socket_path),
        # Runs' command is `python -m flows.fork_client`: this installation's python.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    # SIGTERM (systemd, kill) must run the clean-up below, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    server = subprocess.Popen([sys.executable, "-m", "flows.forkserver", str(socket_path)], env=env)
    worker: subprocess.Popen | None = None
    try:
        _wait_for_socket(socket_path, server)
        worker = subprocess.Popen(worker_command(pool, name, limit), env=env)
        return worker.wait()
    finally:
        for process in (worker, server):
            if process is not None and process.poll() is None:
                process.terminate()  # the worker lets its running flow runs finish first
                process.wait(timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_socket(path: Path, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise ModelyardError("the worker's fork server did not start; see the lines above")
        time.sleep(0.1)
