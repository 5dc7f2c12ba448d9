"""How modelyard starts Ansible: the playbook strategy. The deploys themselves are in
test_deploy.py; this runs one playbook over the local connection, with no host and no server."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelyard.config import Settings
from modelyard.deploy.playbooks import PlaybookError, ansible_env, run_playbook, strategy_env

# Each test starts Ansible (4-8 s): the slow tier, so `make check` stays under its minute.
pytestmark = pytest.mark.slow

_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.command: echo ran
      register: echoed
      changed_when: false
    - ansible.builtin.assert:
        that: echoed.stdout == 'ran'
"""


def test_mitogen_is_the_default_and_runs_a_playbook_with_this_ansible(tmp_path: Path) -> None:
    """A Mitogen release that does not fit the installed ansible-core fails here, not in a
    deploy: Ansible refuses an unknown or broken strategy before the first task."""
    assert Settings().ansible_strategy == "mitogen"
    env = strategy_env("mitogen")
    assert env["ANSIBLE_STRATEGY"] == "mitogen_linear"
    assert (Path(env["ANSIBLE_STRATEGY_PLUGINS"]) / "mitogen_linear.py").is_file()
    playbook = tmp_path / "echo.yml"
    playbook.write_text(_PLAYBOOK)
    ansible = Path(sys.executable).with_name("ansible-playbook")
    ran = subprocess.run(
        [
            str(ansible),
            "-i",
            "localhost,",
            "-c",
            "local",
            str(playbook),
            "-e",
            f"ansible_python_interpreter={sys.executable}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | ansible_env() | env,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "ok=2" in ran.stdout


def test_linear_needs_nothing_and_a_missing_mitogen_names_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert strategy_env("linear") == {}
    assert Settings(ansible_strategy="linear").ansible_strategy == "linear"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PlaybookError, match="MODELYARD_ANSIBLE_STRATEGY=linear"):
        strategy_env("mitogen")


def test_a_host_python_mitogen_cannot_run_fails_the_host_with_the_fix(tmp_path: Path) -> None:
    """What a pyenv shim does to Mitogen, with an interpreter that exits at once: the host
    fails unreachable, and the reason says what to change."""
    dead = tmp_path / "python3"
    dead.write_text("#!/bin/sh\nexit 3\n")
    dead.chmod(0o755)
    inventory = tmp_path / "hosts.yml"
    host = {"ansible_connection": "local", "ansible_python_interpreter": str(dead)}
    inventory.write_text(yaml.safe_dump({"model_hosts": {"hosts": {"here": host}}}))
    release = {"model_service_model": "m", "model_service_environment": "e",
               "model_service_version": "1", "model_service_runtime": "container",
               "model_service_image": "m:1"}  # fmt: skip
    result = run_playbook("deploy.yml", inventory, release, tmp_path / "run", lambda _: None,
                          strategy="mitogen")  # fmt: skip
    assert not result.ok
    assert result.failures["here"].startswith("unreachable: ")
    assert "MODELYARD_ANSIBLE_STRATEGY=linear" in result.failures["here"]


_SERVICE_USER_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.include_role:
        name: model_service
        tasks_from: service_user
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="creates a system user: root only")
def test_plays_on_one_machine_creating_the_service_user_at_once_all_succeed(
    tmp_path: Path,
) -> None:
    """Hosts that are one machine (or two services deployed to one host at once) race to create
    the service user: each play sees it missing, and groupadd fails for all but the first
    ('group ... already exists', seen in CI). Every play must end with the user there. The
    linear strategy's forks race every time with 16 hosts (Mitogen's local connection happens to
    space them out, so it would not show the race here)."""
    user = f"mysvc{os.getpid() % 100000}"
    playbook = tmp_path / "user.yml"
    playbook.write_text(_SERVICE_USER_PLAYBOOK)
    hosts = ",".join(f"same{i}" for i in range(16)) + ","
    try:
        ran = subprocess.run(
            [str(Path(sys.executable).with_name("ansible-playbook")), "-i", hosts,
             "-c", "local", "-f", "16", str(playbook),
             "-e", f"ansible_python_interpreter={sys.executable} model_service_user={user}"],
            capture_output=True, text=True, timeout=180,
            env=os.environ | ansible_env() | strategy_env("linear"),
        )  # fmt: skip
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert ran.stdout.count("failed=0") == 16
        assert subprocess.run(["id", "-gn", user], capture_output=True, text=True).stdout == (
            f"{user}\n"
        )
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)
