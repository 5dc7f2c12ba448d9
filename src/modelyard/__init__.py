"""modelyard: ML CI/CD as code."""

from __future__ import annotations

import functools


def __getattr__(name: str) -> str:
    # Looked up when asked for: importlib.metadata (and the email package it loads) costs every
    # serving process ~4 MB of memory and 75 ms for a figure only training records.
    if name != "__version__":
        raise AttributeError(f"module 'modelyard' has no attribute {name!r}")
    return _version()


@functools.cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelyard")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0.0.0+unknown"
