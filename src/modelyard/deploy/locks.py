"""One release at a time per model and environment, and no move based on a stale view.

Two guards, because either alone lets two runs both move an alias:
- a lock held for the whole move (rollout, alias, ledger record), so two rollouts never touch
  the same hosts at once; the second asker does not wait, it gets `ReleaseConflict` at once;
- a compare-and-set on what serves: a pipeline run remembers which version served each
  environment when it started (its champion comparison and its approval were about that
  version) and moves nothing if another run has moved the environment since, like `git push`
  refusing a non-fast-forward.

The lock here is a file lock in the workspace: right whenever every run shares the workspace
(one machine, the embedded default). Runs on many machines share a Prefect server; the flows
then pass a lock built on Prefect's global concurrency limits (`flows/locks.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TextIO

from modelyard.config import Settings
from modelyard.deploy.ledger import Release
from modelyard.errors import DeployFailed

# A lock factory: given "<model>/<environment>" and who asks, hold the lock or raise
# ReleaseConflict at once.
Lock = Callable[[str, str], AbstractContextManager[None]]


class ReleaseConflict(DeployFailed):
    """Another release of the same model and environment is running, or has moved it."""

    exit_code = 5


def workspace_lock(settings: Settings) -> Lock:
    folder = settings.workspace / "locks"

    @contextlib.contextmanager
    def hold(key: str, holder: str) -> Iterator[None]:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (key.replace("/", "--") + ".lock")
        with path.open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ReleaseConflict(
                    f"another release of {key} is in progress ({_holder_of(path)}); nothing was "
                    "changed: wait for it to finish (`modelyard history`) and try again"
                ) from None
            # The kernel drops a flock when its holder dies, so a killed run never leaves a
            # stale lock; the note only says who holds it.
            _note(handle, holder)
            try:
                yield
            finally:
                handle.truncate(0)
                fcntl.flock(handle, fcntl.LOCK_UN)

    return hold


def check_unmoved(key: str, expected: str | None, live: Release | None) -> None:
    """Raise ReleaseConflict if what serves is no longer the version the caller based its move
    on. `expected` None: no expectation (an operator's explicit deploy or rollback)."""
    now = live.version if live else ""
    if expected is None or now == expected:
        return
    was = f"v{expected}" if expected else "nothing"
    assert live is not None  # now != expected, so something serves
    raise ReleaseConflict(
        f"{key} moved from {was} to v{now} ({live.action} by {live.actor} at {live.when}) after "
        "this run compared against it; nothing was changed. Run the pipeline again to compare "
        f"against v{now}, or deploy this version on purpose with `modelyard deploy`"
    )


def _note(handle: TextIO, holder: str) -> None:
    note = {"holder": holder, "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    handle.seek(0)
    handle.truncate(0)
    handle.write(json.dumps(note))
    handle.flush()


def _holder_of(path: Path, patience: float = 2.0) -> str:
    """Who holds the lock, from its note. The holder writes the note just after taking the
    lock, so an asker that lost by microseconds may find it empty or half-written: it reads
    again for up to `patience` seconds before giving up."""
    deadline = time.monotonic() + patience
    while True:
        try:
            note = json.loads(path.read_text())
            return f"{note['holder']}, pid {note['pid']} on {note['host']} since {note['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "holder unknown"
            time.sleep(0.02)
