"""The code a triggered run trains: a checkout of one commit of the user's repository.

A worker may run on any machine, so a run names its repository (a URL or a path any worker can
reach) and its commit, never a folder. Each workspace keeps one bare mirror per repository,
fetched when a commit is missing, and one detached worktree per commit; runs of several models
from the same push share that worktree. A lock per mirror keeps concurrent runs from fetching
or checking out over each other.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

from modelyard.atomic import exclusive
from modelyard.config import Settings
from modelyard.errors import ModelyardError

KEEP_CHECKOUTS = 10  # per repository; older worktrees are removed when a new one is made


class SourceError(ModelyardError):
    """The repository or the commit a run asks for cannot be checked out."""


def checkout(settings: Settings, repository: str, commit: str) -> Path:
    """The worktree of `commit` (full SHA, short SHA or ref) of `repository`."""
    mirror = _mirror_path(settings, repository)
    with exclusive(mirror.with_suffix(".lock")):
        if not mirror.exists():
            _git("clone", "--mirror", "--quiet", repository, str(mirror), what=repository)
        sha = _resolve(mirror, commit)
        if sha is None:
            _git("-C", str(mirror), "fetch", "--quiet", "--prune", "origin", what=repository)
            sha = _resolve(mirror, commit)
        if sha is None:
            raise SourceError(
                f"commit {commit!r} is not in {repository}; push it first, or check the "
                "repository the pipeline deployment points at (`modelyard pipelines list`)"
            )
        worktree = mirror.parent.parent / "checkouts" / mirror.stem / sha
        if not (worktree / ".git").exists():
            shutil.rmtree(worktree, ignore_errors=True)  # a half-made one from a killed run
            _git("-C", str(mirror), "worktree", "prune", what=repository)
            _git("-C", str(mirror), "worktree", "add", "--detach", "--force", str(worktree), sha,
                 what=repository)  # fmt: skip
            _prune(mirror, worktree.parent)
        return worktree


def _mirror_path(settings: Settings, repository: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", repository.rstrip("/").rsplit("/", 1)[-1])
    name = name.removesuffix(".git") or "repository"
    digest = hashlib.sha256(repository.encode()).hexdigest()[:8]
    folder = settings.workspace / "sources" / "mirrors"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-{digest}.git"


def _resolve(mirror: Path, commit: str) -> str | None:
    found = subprocess.run(
        ["git", "-C", str(mirror), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    return found.stdout.strip() if found.returncode == 0 else None


def _prune(mirror: Path, checkouts: Path) -> None:
    trees = sorted((p for p in checkouts.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in trees[:-KEEP_CHECKOUTS]:
        _git("-C", str(mirror), "worktree", "remove", "--force", str(old), what=str(mirror))


def _git(*args: str, what: str) -> None:
    done = subprocess.run(["git", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SourceError(f"git {args[0] if args[0] != '-C' else args[2]} failed for {what}: "
                          f"{done.stderr.strip() or done.stdout.strip()}")  # fmt: skip
