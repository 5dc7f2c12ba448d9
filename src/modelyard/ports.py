"""Free loopback ports for servers this process is about to start (infra validation, the tests,
the benchmarks).

The usual trick, bind port 0 and close, races twice: the kernel hands the same port to a second
caller before the first server has bound it, and every outgoing connection draws its source port
from that same ephemeral range, so an SSH or HTTP client can take the port in the gap. Ports here
come from below the ephemeral range, and each one handed out is reserved for a while in a small
table shared by every process on the machine (under a file lock), so neither can happen.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

RESERVE_SECONDS = 300.0  # long enough for any server here to bind what it was given
_LOWEST = 10_000
_TABLE = Path(tempfile.gettempdir()) / "modelyard-ports.json"


def free_port() -> int:
    """A loopback port nobody listens on, that no other caller gets for `RESERVE_SECONDS`."""
    return free_ports(1)


def free_ports(count: int) -> int:
    """The first of `count` consecutive such ports (a front door and its two slots)."""
    low, high = _LOWEST, _ephemeral_start() - count
    pick = random.SystemRandom()
    with _reservations() as reserved:
        for _ in range(1000):
            first = pick.randrange(low, high)
            block = range(first, first + count)
            if not any(str(p) in reserved for p in block) and all(map(_bindable, block)):
                until = time.time() + RESERVE_SECONDS
                reserved.update({str(p): until for p in block})
                return first
    raise RuntimeError(f"no {count} consecutive free ports between {low} and {high}")


def _ephemeral_start() -> int:
    """Where the kernel starts picking source ports for outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int) -> bool:
    # No SO_REUSEADDR: a port with connections still in TIME_WAIT counts as taken too.
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _reservations() -> Iterator[dict[str, float]]:
    """The shared table of reserved ports (port -> until), expired entries dropped, held under
    an exclusive lock and written back when the block ends."""
    fd = os.open(_TABLE, os.O_RDWR | os.O_CREAT, 0o666)
    with os.fdopen(fd, "r+") as table:
        fcntl.flock(table, fcntl.LOCK_EX)
        try:
            found = json.loads(table.read() or "{}")
        except ValueError:  # a writer killed mid-write: the reservations were short-lived anyway
            found = {}
        if not isinstance(found, dict):
            found = {}
        now = time.time()
        reserved = {port: until for port, until in found.items() if until > now}
        yield reserved
        table.seek(0)
        table.truncate()
        table.write(json.dumps(reserved))
