"""Errors a user can act on. Each message names what is wrong and how to fix it."""


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
