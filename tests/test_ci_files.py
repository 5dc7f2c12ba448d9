"""The CI files run only real things: every command in the GitHub workflows and the Jenkinsfile
is a `make` target of the Makefile or a `modelyard` command with options it has."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from modelyard.cli import app

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def workflow_scripts(path: Path) -> list[str]:
    document = yaml.safe_load(path.read_text())
    return [step["run"] for job in document["jobs"].values() for step in job["steps"]
            if "run" in step]  # fmt: skip


def jenkins_scripts(path: Path) -> list[str]:
    # sh '...' with single quotes (the file uses no other form; the check below makes sure).
    text = path.read_text()
    scripts = re.findall(r"\bsh\s+'((?:[^'\\]|\\.)*)'", text)
    assert len(scripts) == len(re.findall(r"\bsh\b", text)), "an sh step in another form"
    return scripts


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+):(?!=)", text, flags=re.MULTILINE))


def problems(script: str) -> list[str]:
    """What in a shell script is not a make target or a modelyard command with real options."""
    found = []
    for command in re.split(r"\n|&&|\|\||;", script):
        words = shlex.split(command)
        if not words:
            continue
        if words[0] == "sudo":  # sudo [--option ...] COMMAND
            words = words[1:]
            while words and words[0].startswith("-"):
                words = words[1:]
        program, args = Path(words[0]).name, words[1:]
        if program == "make":
            targets = [a for a in args if "=" not in a and not a.startswith("-")]
            found += [f"make {t}: no such target" for t in targets if t not in make_targets()]
        elif program == "modelyard":
            found += _cli_problems(args)
        else:
            found.append(f"{command.strip()}: not a make target or modelyard command")
    return found


def _cli_problems(args: list[str]) -> list[str]:
    command: Any = typer.main.get_command(app)
    path = ["modelyard"]
    # A group (Typer's own click) has `commands`; a command does not.
    while hasattr(command, "commands") and args and not args[0].startswith("-"):
        sub = command.commands.get(args[0])
        if sub is None:
            return [f"{' '.join(path)} has no command {args[0]!r}"]
        path.append(args[0])
        command, args = sub, args[1:]
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    return [f"{' '.join(path)} has no option {a.split('=')[0]}" for a in args
            if a.startswith("--") and a.split("=")[0] not in options]  # fmt: skip


@pytest.mark.parametrize("path", [*WORKFLOWS, ROOT / "Jenkinsfile"], ids=lambda p: p.name)
def test_every_command_exists(path: Path):
    scripts = jenkins_scripts(path) if path.name == "Jenkinsfile" else workflow_scripts(path)
    assert scripts, f"{path} runs nothing"
    assert [p for s in scripts for p in problems(s)] == []


def test_the_check_catches_what_does_not_exist():
    assert problems("make tset") == ["make tset: no such target"]
    assert problems(".venv/bin/modelyard deploy-everything") == [
        "modelyard has no command 'deploy-everything'"
    ]
    assert problems('modelyard trigger --commit "$SHA" --forever') == [
        "modelyard trigger has no option --forever"
    ]
    assert problems("modelyard stack up && curl http://x") == [
        "curl http://x: not a make target or modelyard command"
    ]
    assert problems('sudo --preserve-env=PATH make test PYTHON="$(command -v python)"') == []


def test_the_pipeline_workflow_triggers_on_main_and_promotes_on_tags():
    pipeline = yaml.safe_load((ROOT / ".github" / "workflows" / "pipeline.yml").read_text())
    on = pipeline[True]  # YAML 1.1 reads the key `on` as a boolean
    assert on["push"]["branches"] == ["main"] and on["push"]["tags"] == ["v*"]
    scripts = workflow_scripts(ROOT / ".github" / "workflows" / "pipeline.yml")
    assert any("modelyard trigger" in s and "--wait" in s for s in scripts)
    assert any("modelyard approve --commit" in s for s in scripts)
    jenkins = (ROOT / "Jenkinsfile").read_text()
    assert "input(" in jenkins and "modelyard approve --commit" in jenkins


def test_workflows_pass_actionlint():
    done = subprocess.run([str(ROOT / "infra" / "scripts" / "actionlint.sh")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Checking {len(WORKFLOWS)} workflow file(s)" in done.stdout


def test_compose_describes_the_stack_on_loopback_without_secrets():
    from modelyard.stack import SERVICES

    folder = ROOT / "infra" / "compose"  # what infra/compose.yaml mounts and builds
    compose = yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {*SERVICES, "postgres", "grafana"}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key or "URI" in key or "URL" in key:
                # Secrets only as ${VARIABLE} references, never as literals.
                assert "${" in str(value) or "password" not in str(value).lower()
    assert services["mlflow"]["environment"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert services["prefect"]["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    for name in ("prefect", "mlflow", "postgres"):
        assert "healthcheck" in services[name]
    # Files it mounts or builds exist, and Prometheus' configuration is valid.
    assert (folder / "initdb" / "databases.sql").is_file()
    assert (folder / services["mlflow"]["build"]["dockerfile"]).is_file()
    checked = subprocess.run(["promtool", "check", "config", str(folder / "prometheus.yml")],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 rule files found" in checked.stdout  # infra/prometheus/rules.yml, as mounted
    mounted = {(ROOT / "infra" / v.split(":")[0]).resolve()
               for name in ("grafana", "alertmanager")
               for v in services[name]["volumes"] if v.startswith("./")}  # fmt: skip
    grafana = ROOT / "infra" / "grafana"
    assert {grafana / "provisioning", grafana / "dashboards"} <= mounted
    assert ROOT / "infra" / "prometheus" / "alertmanager.yml" in mounted  # the shipped routes
