"""Errors a user can act on. Each message names what is wrong and how to fix it."""

from __future__ import annotations

import errno


class ModelyardError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""

    exit_code = 1


class SpecError(ModelyardError):
    """The pipeline spec is invalid; raised before any work is done."""

    exit_code = 2


class DataError(ModelyardError):
    """The dataset cannot be loaded or does not match the spec."""


class GateFailed(ModelyardError):
    """A validation gate rejected the candidate; nothing was registered."""

    exit_code = 3

    def __init__(self, gate: str, reasons: list[str]) -> None:
        self.gate = gate
        self.reasons = reasons
        plural = "s" if " and " in gate else ""
        super().__init__(f"{gate} gate{plural} failed: " + "; ".join(reasons))


class DeployFailed(ModelyardError):
    """A rollout stopped; every host was put back on the version it served before."""

    exit_code = 4


class ExportFailed(ModelyardError):
    """A model cannot be exported, or its export does not reproduce scikit-learn's scores;
    nothing was registered."""

    exit_code = 6


class DiskFull(ModelyardError):
    """A write failed for lack of space; what was half-done has been undone."""


def disk_full(exc: BaseException | None, workspace: object) -> DiskFull | None:
    """The clear error for a full disk anywhere in `exc`'s chain of causes, else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f"the disk holding {exc.filename}" if exc.filename else "a disk"
            return DiskFull(
                f"{where} is full ({exc.strerror}): free space on it, or set MODELYARD_WORKSPACE "
                f"(now {workspace}) to a folder on a larger disk, and run again"
            )
        exc = exc.__cause__ or exc.__context__
    return None
