"""The release lock: one release per model and environment at a time, refused not queued.

The workspace's file lock is held by a real second process and then SIGKILLed (nothing stale
remains); the Prefect lock is a global concurrency limit on a real Prefect server. The
deploys that take these locks for real are in test_deploy.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from modelyard.config import Settings
from modelyard.deploy.locks import ReleaseConflict, workspace_lock

_HOLDER = """
import sys, time
from modelyard.config import Settings
from modelyard.deploy.locks import workspace_lock
with workspace_lock(Settings(workspace=sys.argv[1]))("ads/staging", "deploy v7 by carol"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_workspace_lock_refuses_a_second_holder_and_dies_with_its_holder(tmp_path: Path) -> None:
    settings = Settings(workspace=tmp_path / "ws")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(settings.workspace)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock = workspace_lock(settings)
        with pytest.raises(ReleaseConflict) as refused, lock("ads/staging", "deploy v8 by dave"):
            pytest.fail("two holders of one lock")
        assert "another release of ads/staging is in progress" in str(refused.value)
        assert f"deploy v7 by carol, pid {holder.pid}" in str(refused.value)
        with lock("ads/production", "deploy v8 by dave"):  # another environment is free
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no handler runs: the kernel drops the lock
        holder.wait(10)
    with workspace_lock(settings)("ads/staging", "deploy v8 by dave"):
        pass


_NOTE_LATE = """
import fcntl, json, os, socket, sys, time
with open(sys.argv[1], "a+") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(0.5)  # the holder's note comes just after its lock, as in workspace_lock
    note = {"holder": "deploy v7 by carol", "pid": os.getpid(), "host": socket.gethostname(),
            "since": "2026-11-30T10:00:00Z"}
    handle.write(json.dumps(note))
    handle.flush()
    time.sleep(600)
"""


def test_an_asker_that_loses_by_a_hair_still_names_the_holder(tmp_path: Path) -> None:
    """Two releases at the same instant: the loser may look before the winner wrote its note."""
    settings = Settings(workspace=tmp_path / "ws")
    path = settings.workspace / "locks" / "ads--staging.lock"
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _NOTE_LATE, str(path)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(ReleaseConflict) as refused,
            workspace_lock(settings)("ads/staging", "deploy v8 by dave"),
        ):
            pytest.fail("two holders of one lock")
        assert f"deploy v7 by carol, pid {holder.pid}" in str(refused.value)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)


def test_prefect_lock_is_one_slot_per_model_and_environment(prefect_api: str) -> None:
    from flows.locks import limit_name, release_lock  # Prefect: this test's alone

    lock = release_lock(Settings(prefect_api_url=prefect_api))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock("ads/staging", "deploy v7 by carol"):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(60)
        conflict = pytest.raises(ReleaseConflict, match=limit_name("ads/staging"))
        with conflict, lock("ads/staging", "deploy v8 by dave"):
            pytest.fail("two holders of one slot")
        with lock("ads/production", "deploy v8 by dave"):
            pass
    finally:
        release.set()
        holder.join(60)
    with lock("ads/staging", "deploy v8 by dave"):  # released on exit, and on an error too
        pass
    with pytest.raises(RuntimeError), lock("ads/staging", "deploy v9 by erin"):
        raise RuntimeError("rollout failed")
    with lock("ads/staging", "deploy v9 by erin"):
        pass
