"""Files that exist whole or not at all.

A key or token file cut short (a full disk, a kill mid-write) would be read back later as a
broken key, or as an empty token that turns auth off. These helpers write a sibling temporary
file, flush it to disk and only then give it its name.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def create_private(path: Path, data: bytes) -> bool:
    """Create `path` (mode 0600) holding `data`, unless it exists: then leave it and return
    False. Two processes racing to create it both end up reading the same winner's file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:  # unbuffered: no close-time flush can fail after the error below is raised
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:  # name the file: a write error alone does not
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        finally:
            os.close(fd)
        try:
            os.link(partial, path)  # fails if it exists: never replaces another's file
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
