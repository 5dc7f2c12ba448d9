"""A fork server for flow runs: a process that has already imported the pipeline forks one child
per flow run, so a run starts in milliseconds instead of paying Python's start and ~4 s of
imports (Prefect, MLflow, scikit-learn, pandas) every time.

`modelyard worker` starts it beside a stock Prefect process worker; each run's command is
`python -m flows.fork_client`, which hands its environment, working folder and standard
streams to this server over a Unix socket, forwards signals to the child (cancellation), and
exits with the child's status. Dagster's `forkserver` start method with preloaded modules is
the same idea. The server stays single-threaded and never logs through Prefect, so forking it
is safe: no thread or connection of it leaks into a child.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import warnings
from pathlib import Path

MAX_MESSAGE = 4 * 1024 * 1024  # a run's environment


def serve(path: Path) -> None:
    # The point: every child starts with these imported.
    import prefect.engine
    import prefect.flow_engine  # noqa: F401

    import flows.monitor
    import flows.pipeline  # noqa: F401

    _die_with_parent()
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)  # only the worker's user may start runs through it
    listener.listen(64)
    waiting: dict[int, socket.socket] = {}  # child pid → its client's connection
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the selector
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    print(f"fork server ready on {path}", flush=True)
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj is listener:
                    _accept(listener, waiting)
                else:
                    os.read(wake_r, 4096)
            _reap(waiting)
    finally:
        path.unlink(missing_ok=True)


def _die_with_parent() -> None:
    """Linux's parent-death signal: a worker killed outright takes its fork server along."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _accept(listener: socket.socket, waiting: dict[int, socket.socket]) -> None:
    connection, _ = listener.accept()
    try:
        message, fds, _, _ = socket.recv_fds(connection, MAX_MESSAGE, 3)
        request = json.loads(message)
    except (OSError, ValueError):
        connection.close()
        return
    pid = os.fork()
    if pid == 0:
        listener.close()
        _child(request, fds, connection)  # never returns
    for fd in fds:
        os.close(fd)
    connection.sendall(f"{pid}\n".encode())
    waiting[pid] = connection


def _reap(waiting: dict[int, socket.socket]) -> None:
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = waiting.pop(pid, None)
        if connection is not None:
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):  # a client killed meanwhile: nothing to tell
                connection.sendall(f"{code}\n".encode())
            connection.close()


def _child(request: dict, fds: list[int], connection: socket.socket) -> None:
    """Become the flow run's process: its streams, environment and folder, then Prefect's
    engine exactly as `python -m prefect.engine` runs it."""
    code = 1
    try:
        connection.close()
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()  # this run's settings, not the server's
        sys.argv = ["prefect.engine", *request["argv"]]
        with warnings.catch_warnings():
            # runpy notes that prefect.engine is imported already: preloading it is the point.
            warnings.filterwarnings("ignore", "'prefect.engine' found in sys.modules")
            runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):
                stream.flush()
        os._exit(code)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
