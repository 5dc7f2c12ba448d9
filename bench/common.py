"""What the benchmarks share: the machine they ran on, and their sections of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def stamp() -> str:
    return (f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores "
            f"({platform.machine()}, Python {platform.python_version()})")  # fmt: skip


def replace_section(name: str, text: str) -> None:
    """Put `text` between the `<!-- name:start -->` and `<!-- name:end -->` markers."""
    current = DOC.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in current:
        raise SystemExit(f"{DOC} has no {start} marker")
    section = f"{start}\n{text}\n{end}"
    DOC.write_text(
        re.sub(f"{re.escape(start)}.*{re.escape(end)}", lambda _: section, current, flags=re.S)
    )


def stop_services(root: Path, env: dict[str, str]) -> None:
    """Stop what a benchmark deployed under `root`: containers by their root label, and each
    service root's supervisord. Nothing else on the engine is touched."""
    listed = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=io.modelyard.root"],
        capture_output=True, text=True, env=env,
    ).stdout.split()  # fmt: skip
    for container in listed:
        label = subprocess.run(
            ["docker", "inspect", "-f", '{{index .Config.Labels "io.modelyard.root"}}', container],
            capture_output=True, text=True, env=env,
        ).stdout.strip()  # fmt: skip
        if label.startswith(str(root)):
            subprocess.run(["docker", "rm", "-f", container], capture_output=True, env=env)
    for conf in root.rglob("supervisord.conf"):
        subprocess.run(["supervisorctl", "-c", str(conf), "shutdown"], capture_output=True)
