"""A git `post-receive` hook for self-hosted repositories: every push to a watched branch
starts the pipeline deployments of that repository for the pushed commit.

The hook only calls `modelyard trigger`; it holds no logic and no secrets. It carries the
settings that locate the Prefect server (workspace, API URL) as they were at install time,
since git runs hooks with a bare environment. A push is never refused: post-receive runs after
the refs moved, and a trigger that fails says why on the pusher's terminal.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from modelyard.config import Settings
from modelyard.errors import ModelyardError

MARKER = "# modelyard post-receive hook"
# Not secrets: where the state is and which server to ask. Credentials stay out of the hook.
# A running stack's URL is read from the workspace, so its port settings need no carrying.
CARRIED = ("MODELYARD_WORKSPACE", "MODELYARD_PREFECT_API_URL", "PREFECT_API_URL")


class HookError(ModelyardError):
    """The hook cannot be installed where asked."""


def install(settings: Settings, repository: Path, branches: list[str], force: bool = False) -> Path:
    hooks = _hooks_dir(repository)
    hook = hooks / "post-receive"
    if hook.exists() and MARKER not in hook.read_text(errors="replace") and not force:
        raise HookError(
            f"{hook} exists and is not modelyard's; merge it by hand (call `modelyard trigger` "
            "from it), or pass --force to replace it"
        )
    hook.write_text(render(settings, repository, branches))
    hook.chmod(0o755)
    return hook


def uninstall(repository: Path) -> bool:
    hook = _hooks_dir(repository) / "post-receive"
    if hook.exists() and MARKER in hook.read_text(errors="replace"):
        hook.unlink()
        return True
    return False


def render(settings: Settings, repository: Path, branches: list[str]) -> str:
    beside = Path(sys.executable).with_name("modelyard")  # this installation's, not PATH's
    modelyard = str(beside) if beside.exists() else shutil.which("modelyard") or "modelyard"
    env = {name: os.environ[name] for name in CARRIED if os.environ.get(name)}
    env["MODELYARD_WORKSPACE"] = str(settings.workspace)
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
    watched = " ".join(shlex.quote(b) for b in branches)
    repo = shlex.quote(str(repository.resolve()))
    return f"""#!/bin/sh
{MARKER}: installed by `modelyard hooks install`; reinstall rather than edit.
# Each pushed branch head among the watched ones becomes a pipeline run of this repository.
{exports}watched={shlex.quote(watched)}
while read -r old new ref; do
    case "$ref" in refs/heads/*) ;; *) continue ;; esac
    branch=${{ref#refs/heads/}}
    case " $watched " in *" $branch "*) ;; *) continue ;; esac
    [ "$new" = 0000000000000000000000000000000000000000 ] && continue  # a deleted branch
    echo "modelyard: starting the pipeline for $branch at $new"
    {shlex.quote(modelyard)} trigger --commit "$new" --branch "$branch" --source git-hook \\
        --repository {repo} --key "git-hook:$ref:$new" \\
        || echo "modelyard: the pipeline did not start (see above); the push itself succeeded"
done
exit 0
"""


def _hooks_dir(repository: Path) -> Path:
    bare = repository / "hooks"
    if (repository / "HEAD").is_file() and bare.is_dir():
        return bare
    if (repository / ".git" / "hooks").is_dir():
        return repository / ".git" / "hooks"
    raise HookError(f"{repository} is not a git repository (no hooks folder)")
