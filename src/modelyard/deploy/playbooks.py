"""Run modelyard's Ansible playbooks with ansible-runner, streaming events as progress.

The playbooks and the `model_service` role live in `ansible/` (shipped inside the wheel as
`modelyard/deploy/ansible`). Each run gets its own private data folder; its full output and
events stay there and go to the release record. Secrets are passed as extra variables and the
file ansible-runner writes them to is removed as soon as the run ends.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelyard.errors import ModelyardError

Progress = Callable[[str], None]

_ANSIBLE_DIRS = (
    Path(__file__).with_name("ansible"),
    Path(__file__).resolve().parents[3] / "ansible",
)
_SAYING = ("ansible.builtin.debug", "debug")
_REPORTED_EVENTS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "FAILED",
    "runner_on_unreachable": "UNREACHABLE",
}


class PlaybookError(ModelyardError):
    """Ansible could not be started (not a failed host: those are in PlaybookResult)."""


@dataclass
class PlaybookResult:
    playbook: str
    status: str  # successful | failed | timeout | canceled
    rc: int
    failures: dict[str, str] = field(default_factory=dict)  # host -> why
    touched: list[str] = field(default_factory=list)  # hosts a task ran on (reached hosts)
    # host -> where its slots are scraped ("blue"/"green": host:port) and which run ("live",
    # "canary": a slot name or ""), from the role's set_stats
    slots: dict[str, dict[str, str]] = field(default_factory=dict)
    stdout: Path | None = None
    events: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status == "successful" and not self.failures

    @property
    def files(self) -> list[Path]:
        """Ansible's output and events, for the ledger."""
        return [p for p in (self.stdout, self.events) if p]

    def reason(self) -> str:
        if self.failures:
            return "; ".join(f"{host}: {why}" for host, why in self.failures.items())
        return f"{self.playbook} ended {self.status} (rc {self.rc})"


def ansible_dir() -> Path:
    for folder in _ANSIBLE_DIRS:
        if (folder / "deploy.yml").is_file():
            return folder
    raise PlaybookError("modelyard's ansible/ folder is missing from this installation")


def strategy_env(strategy: str) -> dict[str, str]:
    """Ansible's variables for a playbook `strategy` ('mitogen' or 'linear')."""
    if strategy == "linear":
        return {}
    # Located, not imported: ansible_mitogen imports Ansible, which only its run needs.
    found = importlib.util.find_spec("ansible_mitogen")
    if found is None or found.origin is None:
        raise PlaybookError(
            "MODELYARD_ANSIBLE_STRATEGY=mitogen needs the mitogen package: install it "
            "(pip install mitogen) or set MODELYARD_ANSIBLE_STRATEGY=linear"
        )
    plugins = Path(found.origin).parent / "plugins" / "strategy"
    return {"ANSIBLE_STRATEGY_PLUGINS": str(plugins), "ANSIBLE_STRATEGY": "mitogen_linear"}


def ansible_env(collections: Path | None = None) -> dict[str, str]:
    """The environment every Ansible command of modelyard runs with."""
    project = ansible_dir()
    env = {
        "ANSIBLE_CONFIG": str(project / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(project / "roles"),
        "ANSIBLE_NOCOLOR": "1",
        # ansible-runner turns host key checking off by default; an unknown host must not
        # receive a model and a token.
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        # The ansible-playbook beside this Python, also when its bin/ is not on PATH.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    if collections is not None:
        env["ANSIBLE_COLLECTIONS_PATH"] = str(collections)
    return env


def inventory_hosts(inventory: Path, collections: Path | None = None) -> dict[str, dict[str, Any]]:
    """The model_hosts of `inventory` with their variables (group variables merged), as
    Ansible resolves them: a dynamic inventory (EC2) is asked, not read."""
    listed = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-inventory")), "-i", str(inventory), "--list"],
        capture_output=True, text=True, timeout=300, env=os.environ | ansible_env(collections),
    )  # fmt: skip
    if listed.returncode != 0:
        raise PlaybookError(f"the inventory {inventory} failed: {listed.stderr.strip()[-1500:]}")
    out = _plain(json.loads(listed.stdout))
    hostvars = out.get("_meta", {}).get("hostvars", {})
    return {name: hostvars.get(name, {}) for name in sorted(_group_hosts(out, "model_hosts"))}


def _group_hosts(listing: dict[str, Any], group: str) -> list[str]:
    """A group's hosts, its children's included (ansible-inventory lists each group's own)."""
    entry = listing.get(group, {})
    found = list(entry.get("hosts", []))
    for child in entry.get("children", []):
        found += _group_hosts(listing, child)
    return found


def _plain(value: Any) -> Any:
    """ansible-inventory's JSON wraps templated strings as {"__ansible_unsafe": ...}."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def run_playbook(
    playbook: str,
    inventory: Path,
    extravars: dict[str, Any],
    workdir: Path,
    progress: Progress,
    secrets: tuple[str, ...] = (),
    collections: Path | None = None,
    limit: list[str] | None = None,
    strategy: str = "linear",
) -> PlaybookResult:
    """Run `playbook` from ansible/ against `inventory` (only the `limit` hosts, if given) with
    the playbook `strategy` (see `strategy_env`); never raises for a failed host."""
    import ansible_runner
    from ansible_runner.exceptions import AnsibleRunnerException

    project = ansible_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    result = PlaybookResult(playbook=playbook, status="unstarted", rc=-1)

    def on_event(event: dict[str, Any]) -> bool:
        _note_event(event, result, progress)
        return True

    try:
        runner = ansible_runner.run(
            private_data_dir=str(workdir),
            project_dir=str(project),
            playbook=playbook,
            inventory=str(inventory),
            extravars=extravars,
            envvars=ansible_env(collections) | strategy_env(strategy),
            event_handler=on_event,
            limit=",".join(limit) if limit else None,
            quiet=True,
            ident="run",
        )
    except AnsibleRunnerException as exc:
        raise PlaybookError(f"ansible-runner could not run {playbook}: {exc}") from exc
    finally:
        _forget_secrets(workdir)
    artifacts = Path(runner.config.artifact_dir)
    # ansible-runner records the whole process environment there, secrets included.
    (artifacts / "command").unlink(missing_ok=True)
    result.status, result.rc = runner.status, runner.rc if runner.rc is not None else -1
    result.stdout = artifacts / "stdout"
    result.events = _write_events(runner, workdir / "events.jsonl")
    if result.status != "successful" and not result.failures:
        # Failed before any host did (bad inventory, syntax): say what Ansible said.
        result.failures["ansible"] = _tail(result.stdout)
    elif not result.touched and not result.failures:
        # Ansible calls a play with no hosts a success; a deploy to nowhere is not one.
        result.failures["ansible"] = f"no host in group model_hosts of {inventory}"
    if strategy == "mitogen":
        _explain_lost_python(result)
    _scrub(result, secrets)
    return result


# All Mitogen says when the Python it runs on a host ends: the connection dropped, or the
# interpreter cannot run under it (a pyenv shim, say). The second needs a hint to be fixable.
_MITOGEN_LOST = "EOF on stream"


def _explain_lost_python(result: PlaybookResult) -> None:
    for host, why in result.failures.items():
        if _MITOGEN_LOST in why:
            result.failures[host] = (
                f"{why} (Mitogen lost its Python there: the connection dropped, or the host's "
                "interpreter cannot run under Mitogen, e.g. a pyenv shim; set "
                "ansible_python_interpreter to the interpreter itself, or "
                "MODELYARD_ANSIBLE_STRATEGY=linear)"
            )


def _note_event(event: dict[str, Any], result: PlaybookResult, progress: Progress) -> None:
    kind = event.get("event", "")
    data = event.get("event_data", {})
    if kind == "playbook_on_stats":  # the role's set_stats: where each host's slots are scraped
        stats = (data.get("artifact_data") or {}).get("model_service_scrape_slots") or {}
        result.slots.update(stats)
        return
    if kind == "playbook_on_play_start":
        progress(f"ansible: {data.get('play', '')}")
        return
    label = _REPORTED_EVENTS.get(kind)
    if label is None:
        return
    host, task = data.get("host", "?"), data.get("task", "")
    res = data.get("res", {}) or {}
    if label != "UNREACHABLE" and host not in result.touched:
        result.touched.append(host)  # an unreachable host was not changed by this task
    if kind == "runner_on_failed" and data.get("ignore_errors"):
        return
    if label != "ok":
        why = _why(res, task)
        result.failures[host] = (f"unreachable: {why}" if label == "UNREACHABLE" else why)[:2000]
    elif data.get("task_action") in _SAYING:  # the role says something to the person deploying
        progress(f"ansible: {host}: {res.get('msg', '')}")
        return
    elif not res.get("changed"):
        return  # unchanged checks would drown the changes
    progress(f"ansible: {host}: {task} → {label if label != 'ok' else 'changed'}")


def _why(res: dict[str, Any], task: str) -> str:
    """What went wrong; for a loop, the first item that went wrong (the loop's own message is
    only 'All items completed')."""
    for item in res.get("results") or []:
        if isinstance(item, dict) and (item.get("failed") or item.get("unreachable")):
            return _message(item, task)
    return _message(res, task)


def _message(res: dict[str, Any], task: str) -> str:
    """A command's own words when Ansible's say only that it failed (scrubbed later)."""
    said = str(res.get("msg") or "")
    output = str(res.get("stderr") or res.get("stdout") or "").strip()
    if output and said in ("", "non-zero return code"):
        return f"{task}: {output[-1000:]}"
    return said or output or task


def _tail(stdout: Path, lines: int = 6) -> str:
    if not stdout.exists():
        return "no output"
    kept = [line for line in stdout.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(kept[-lines:])[:2000]


def _write_events(runner: Any, path: Path) -> Path:
    """The run's events, one JSON object per line, without the bulky per-module results."""
    with path.open("w") as out:
        for event in runner.events:
            data = event.get("event_data", {})
            slim = {
                "event": event.get("event"),
                "created": event.get("created"),
                "host": data.get("host"),
                "play": data.get("play"),
                "task": data.get("task"),
                "changed": (data.get("res") or {}).get("changed"),
                "msg": (data.get("res") or {}).get("msg"),
            }
            out.write(json.dumps(slim, default=str) + "\n")
    return path


def _forget_secrets(workdir: Path) -> None:
    # ansible-runner writes extra vars (with the serving token) to env/extravars.
    for name in ("extravars", "envvars", "passwords", "ssh_key"):
        path = workdir / "env" / name
        if path.exists():
            path.unlink()


def _scrub(result: PlaybookResult, secrets: tuple[str, ...]) -> None:
    """Belt and braces: no secret may survive in what is kept with the release record."""
    for path in (result.stdout, result.events):
        if path is not None and path.exists():
            text = path.read_text(errors="replace")
            if any(s and s in text for s in secrets):
                path.write_text(_redact(text, secrets))
    result.failures = {host: _redact(why, secrets) for host, why in result.failures.items()}


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "********")
    return text
