"""A flow run's command under `modelyard worker`: ask the worker's fork server for the run.

Standard library only, so it starts in a few milliseconds. It passes its environment, working
folder and standard streams to the server, forwards SIGTERM and SIGINT to the run's process
(Prefect cancels a run by signalling its command), and exits with the run's status. Without a
fork server (`MODELYARD_FORKSERVER` unset or not answering) it becomes the command Prefect runs
by default, `python -m prefect.engine`, so a plain Prefect worker can serve the same pool.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys


def main() -> int:
    path = os.environ.get("MODELYARD_FORKSERVER", "")
    server = _connect(path) if path else None
    if server is None:
        os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *sys.argv[1:]])
    request = {"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv[1:]}
    socket.send_fds(server, [json.dumps(request).encode()], [0, 1, 2])
    replies = server.makefile("r")
    pid = int(replies.readline() or 0)
    if not pid:
        print("modelyard: the fork server refused the run", file=sys.stderr)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _: _forward(pid, received))
    status = replies.readline()
    if not status:  # the server died: the run's process may live on, but cannot report
        print("modelyard: lost the fork server while the run was going", file=sys.stderr)
        return 1
    return int(status)


def _connect(path: str) -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except OSError:
        client.close()
        return None
    return client


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


if __name__ == "__main__":
    sys.exit(main())
