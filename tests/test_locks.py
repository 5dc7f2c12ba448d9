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

from flows.locks import limit_name, release_lock
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


def test_prefect_lock_is_one_slot_per_model_and_environment(prefect_api: str) -> None:
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
