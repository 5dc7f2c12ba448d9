"""Where a run came from: git commit, branch, dirty flag, taken from CI variables or git itself."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from modelyard.config import Settings

# Commit and branch as CI systems announce them (GitHub Actions, Jenkins, GitLab).
_COMMIT_VARS = ("GITHUB_SHA", "GIT_COMMIT", "CI_COMMIT_SHA")
_BRANCH_VARS = ("GITHUB_REF_NAME", "BRANCH_NAME", "GIT_BRANCH", "CI_COMMIT_REF_NAME")


@dataclass(frozen=True)
class GitInfo:
    commit: str
    branch: str
    dirty: bool | None  # None: not a git checkout, so unknown

    @property
    def short(self) -> str:
        return self.commit[:8]


def git(folder: Path, *args: str) -> str | None:
    """`git ARGS` in `folder`: its output, or None when git fails or is missing."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=folder, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _first_env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def git_info(folder: Path, settings: Settings) -> GitInfo:
    commit = settings.git_commit or _first_env(_COMMIT_VARS) or git(folder, "rev-parse", "HEAD")
    branch = (
        settings.git_branch
        or _first_env(_BRANCH_VARS)
        or git(folder, "rev-parse", "--abbrev-ref", "HEAD")
    )
    status = git(folder, "status", "--porcelain", "--untracked-files=no")
    return GitInfo(
        commit=commit or "unknown",
        branch=branch or "unknown",
        dirty=None if status is None else bool(status),
    )


def run_name(
    spec_path: str,
    commit: str | None,
    repository: str | None,
    settings: Settings,
    model: str | None = None,
) -> str:
    """`<model>@<commit>`: what the Prefect UI lists, so a run is found by its commit.

    Without the model's name, its spec's folder. With a repository the spec path is inside it
    and not on this machine: only its name counts.
    """
    folder = Path(spec_path) if repository else Path(spec_path).resolve()
    if not commit:
        commit = git_info(folder.parent, settings).commit
    return f"{model or folder.parent.name}@{commit[:8]}"


def run_tags(model: str, commit: str, branch: str, trigger: str) -> list[str]:
    """The Prefect tags of a pipeline run, however it was started: the UI filters by them."""
    return [f"model:{model}", f"commit:{commit}", f"branch:{branch}", f"trigger:{trigger}"]


def slug(text: str) -> str:
    """Lower-case letters, digits and dashes: Prefect artifact keys allow nothing else."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def model_from_tags(tags: Iterable[str]) -> str | None:
    return next((t.removeprefix("model:") for t in tags if t.startswith("model:")), None)


# The libraries that decide what a model is (training) and what its export computes: what a
# rebuild compares with the ones it runs (`modelyard rebuild`).
LIBRARIES = ("scikit-learn", "numpy", "scipy", "pandas", "skl2onnx", "onnx", "onnxruntime",
             "onnxmltools", "xgboost", "lightgbm")  # fmt: skip


def library_tags() -> dict[str, str]:
    """`lib.<name>`: the version of each of LIBRARIES installed here, and of Python."""
    found = {"lib.python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[f"lib.{name}"] = importlib.metadata.version(name)
    return found


def spec_in_repository(spec_path: Path) -> str:
    """The spec's path from the root of its git checkout ("" outside one): where a rebuild
    finds it in the recorded commit."""
    root = git(spec_path.resolve().parent, "rev-parse", "--show-toplevel")
    if not root:
        return ""
    return spec_path.resolve().relative_to(Path(root).resolve()).as_posix()
