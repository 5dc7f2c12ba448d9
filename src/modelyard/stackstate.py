"""What the local stack leaves in the workspace: one `state.json` per running service (its
URL and pid). Read by the settings (to find a running MLflow, Prefect or Prometheus) and by the
stack itself; it imports nothing of modelyard, so neither has to import the other."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def stack_dir(workspace: Path) -> Path:
    return workspace / "stack"


def running_url(workspace: Path, name: str) -> str | None:
    """The URL of a stack service whose process is alive, else None (cheap: no HTTP)."""
    state = read_state(stack_dir(workspace) / name)
    if state and alive(state.get("pid")):
        return str(state["url"])
    return None


def read_state(folder: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True
