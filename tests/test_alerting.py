"""Alerts that reach a person: the stack's Alertmanager configuration from settings, checked by
amtool; its routes against every alert the rules define; its inhibition in a real Alertmanager.
A firing alert reaching a webhook and a mailbox is in tests/test_monitoring.py (the drift loop).
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from modelyard import stack
from modelyard.config import Settings
from modelyard.ports import free_port
from tests.conftest import ROOT
from tests.stacks import wait_until

RULES = ROOT / "infra" / "prometheus"
SECRETS = {"password": "relay-pass-7d1f", "token": "hook-token-93ab", "url": "s3cr3t-path"}


def alert_rules() -> dict[str, dict]:
    """Every alert infra/prometheus/rules.yml defines, by name: its labels."""
    groups = yaml.safe_load((RULES / "rules.yml").read_text())["groups"]
    return {r["alert"]: r.get("labels", {}) for g in groups for r in g["rules"] if "alert" in r}


def team_settings(workspace: Path, **changes: object) -> Settings:
    """Every channel on: a webhook with a token, mail through a relay that wants a password."""
    values: dict = {
        "workspace": workspace,
        "stack_alertmanager_port": free_port(),
        "alert_webhook_url": f"http://127.0.0.1:9/{SECRETS['url']}",
        "alert_webhook_token": SECRETS["token"],
        "alert_email_to": "ops@example.com, ml@example.com",
        "alert_smtp_relay": "127.0.0.1:2525",
        "alert_smtp_username": "alerts",
        "alert_smtp_password": SECRETS["password"],
        "alert_smtp_tls": False,
    }
    return Settings(**(values | changes))


def written(settings: Settings) -> Path:
    """The Alertmanager service's files, written as `stack up` writes them; its folder."""
    service = next(s for s in stack.plan(settings) if s.name == "alertmanager")
    folder = service.folder(settings)
    stack.write_files(service, folder)
    return folder


def amtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["amtool", *args], capture_output=True, text=True, timeout=30)


# --- the configuration, in process --------------------------------------------------------------


def test_the_configuration_passes_amtool_and_keeps_its_secrets_in_private_files(tmp_path):
    settings = team_settings(tmp_path / "ws")
    folder = written(settings)
    config_file = folder / "alertmanager.yml"
    checked = amtool("check-config", str(config_file))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    config = yaml.safe_load(config_file.read_text())
    people = next(r for r in config["receivers"] if r["name"] == "people")
    assert people["email_configs"] == [{"to": "ops@example.com, ml@example.com",
                                        "send_resolved": True}]  # fmt: skip
    assert config["global"]["smtp_smarthost"] == "127.0.0.1:2525"
    assert config["global"]["smtp_require_tls"] is False
    # The password and the token are in files of their own that the configuration names; the
    # webhook URL (no file form in Alertmanager 0.25) only in the private configuration.
    text = config_file.read_text()
    assert SECRETS["password"] not in text and SECRETS["token"] not in text
    assert (folder / config["global"]["smtp_auth_password_file"]).read_text() == SECRETS["password"]
    bearer = people["webhook_configs"][0]["http_config"]["authorization"]
    assert Path(bearer["credentials_file"]).read_text() == SECRETS["token"]
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # Nor does any secret show where a service is printed or logged.
    shown = repr(next(s for s in stack.plan(settings) if s.name == "alertmanager"))
    assert not any(secret in shown for secret in SECRETS.values()), shown


def test_without_channels_the_configuration_is_valid_and_routes_to_nobody(tmp_path):
    settings = Settings(workspace=tmp_path / "ws")
    folder = written(settings)
    checked = amtool("check-config", str(folder / "alertmanager.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load((folder / "alertmanager.yml").read_text())
    assert config["receivers"] == [{"name": "people"}] and "global" not in config
    assert sorted(p.name for p in folder.iterdir()) == ["alertmanager.yml"]


def test_every_alert_routes_to_people_and_the_routes_name_only_real_alerts(tmp_path):
    rules = alert_rules()
    folder = written(team_settings(tmp_path / "ws"))
    for name, labels in rules.items():
        routed = amtool("config", "routes", "test", "--config.file", str(folder / "alertmanager.yml"),
                        "--verify.receivers=people", f"alertname={name}",
                        f"severity={labels['severity']}", "model=ads", "environment=staging")  # fmt: skip
        assert routed.returncode == 0, f"{name}: {routed.stdout}{routed.stderr}"
    # An alert the routes or the inhibition rules name but the rules never raise is a typo that
    # would silently route or inhibit nothing.
    named = set(re.findall(r"Modelyard\w+", (RULES / "alertmanager.yml").read_text()))
    assert named and named <= set(rules), named - set(rules)


def test_alerting_mistakes_are_refused_naming_the_setting_and_nothing_starts(tmp_path):
    no_receiver = tmp_path / "routes.yml"
    no_receiver.write_text("route: {receiver: pager}\nreceivers: [{name: pager}]\n")
    cases = {
        "MODELYARD_ALERT_SMTP_RELAY": {"alert_smtp_relay": None},
        "(e.g. smtp.example.com:587)": {"alert_smtp_relay": "smtp.example.com"},
        "needs MODELYARD_ALERT_SMTP_USERNAME": {"alert_smtp_username": None},
        "needs MODELYARD_ALERT_WEBHOOK_URL": {"alert_webhook_url": None},
        "has no receiver named `people`": {"alert_routes": no_receiver},
        "cannot be read as YAML": {"alert_routes": tmp_path / "missing.yml"},
    }
    for expected, change in cases.items():
        settings = team_settings(tmp_path / "ws", **change)
        with pytest.raises(stack.StackError, match=re.escape(expected)):
            stack.up(settings, ["alertmanager"], progress=lambda _: None)
        assert not (stack.stack_dir(settings) / "alertmanager" / "state.json").exists()


def test_prometheus_sends_what_fires_to_the_stacks_alertmanager(tmp_path):
    settings = Settings(workspace=tmp_path / "ws", stack_alertmanager_port=free_port())
    prometheus = next(s for s in stack.plan(settings) if s.name == "prometheus")
    stack.write_files(prometheus, tmp_path)
    config = json.loads((tmp_path / "prometheus.yml").read_text())
    targets = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == [f"127.0.0.1:{settings.stack_alertmanager_port}"]
    checked = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- a real Alertmanager --------------------------------------------------------------------------


@pytest.fixture
def alertmanager_server(tmp_path: Path) -> Iterator[str]:
    settings = Settings(workspace=tmp_path / "ws", stack_alertmanager_port=free_port())
    stack.up(settings, ["alertmanager"], progress=lambda _: None)
    yield f"http://127.0.0.1:{settings.stack_alertmanager_port}"
    stack.down(settings, ["alertmanager"], progress=lambda _: None)


def test_a_down_host_inhibits_its_versions_drift_and_latency_alerts(alertmanager_server):
    version = {"model": "ads", "environment": "production", "version": "4"}
    other = version | {"version": "5"}
    down = alert("ModelyardInstanceDown", "critical", version | {"host": "web-1"})
    drift = alert("ModelyardInputDrift", "warning", version | {"feature": "age"})
    slow = alert("ModelyardLatencyOverBudget", "warning", version)
    drift_elsewhere = alert("ModelyardInputDrift", "warning", other | {"feature": "age"})
    posted = httpx.post(f"{alertmanager_server}/api/v2/alerts", timeout=10,
                        json=[down, drift, slow, drift_elsewhere])  # fmt: skip
    assert posted.status_code == 200, posted.text

    def states() -> dict[tuple[str, str], list[str]]:
        listed = httpx.get(f"{alertmanager_server}/api/v2/alerts", timeout=10).json()
        return {(a["labels"]["alertname"], a["labels"]["version"]): a["status"]["inhibitedBy"]
                for a in listed}  # fmt: skip

    wait_until("the inhibition to apply",
               lambda: states().get(("ModelyardInputDrift", "4")), timeout=30)  # fmt: skip
    now = states()
    assert now[("ModelyardInputDrift", "4")] and now[("ModelyardLatencyOverBudget", "4")]
    assert now[("ModelyardInstanceDown", "4")] == []
    assert now[("ModelyardInputDrift", "5")] == [], "another version's drift must still be sent"


def alert(name: str, severity: str, labels: dict[str, str]) -> dict:
    return {"labels": {"alertname": name, "severity": severity, **labels},
            "annotations": {"summary": name}}  # fmt: skip
