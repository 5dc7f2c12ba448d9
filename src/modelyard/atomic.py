"""Files that exist whole or not at all.

A key or token file cut short (a full disk, a kill mid-write) would be read back later as a
broken key, or as an empty token that turns auth off. These helpers write a sibling temporary
file, flush it to disk and only then give it its name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def create_private(path: Path, data: bytes) -> bool:
    """Create `path` (mode 0600) holding `data`, unless it exists: then leave it and return
    False. Two processes racing to create it both end up reading the same winner's file."""
    with _written_beside(path, data, 0o600) as partial:
        try:
            os.link(partial, path)  # fails if it exists: never replaces another's file
        except FileExistsError:
            return False
        return True


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Give `path` the content `data` in one step: a reader sees the old file or the new one."""
    with _written_beside(path, data, mode) as partial:
        os.replace(partial, path)


@contextlib.contextmanager
def _written_beside(path: Path, data: bytes, mode: int) -> Iterator[Path]:
    """A hidden sibling of `path` holding `data`, on disk; removed afterwards if still there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:  # unbuffered: no close-time flush can fail after the error below is raised
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:  # name the file: a write error alone does not
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        finally:
            os.close(fd)
        yield partial
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing), waiting for any other holder: for
    caches that concurrent runs on one machine fill. The kernel drops it if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
