"""The release ledger on a real MLflow store (SQLite): append-only records, what serves, and
which version a rollback goes back to."""

from __future__ import annotations

import pytest

from modelyard import registry
from modelyard.config import Settings
from modelyard.deploy import ledger
from modelyard.deploy.ledger import Release
from modelyard.deploy.release import actor_name


@pytest.fixture
def settings(local_settings: Settings) -> Settings:
    registry.connect(local_settings).create_model_version("m", "file:///nowhere")  # a fourth
    return local_settings


def record(
    settings: Settings, action: str, version: str, outcome: str = "succeeded", previous: str = ""
) -> Release:
    move = Release(model="m", environment="production", action=action, version=version,
                   outcome=outcome, actor="tester", previous_version=previous)  # fmt: skip
    return ledger.append(settings, move)


def test_records_are_runs_newest_first_and_tag_the_version(settings):
    record(settings, "deploy", "1")
    record(settings, "deploy", "2", outcome="failed", previous="1")
    records = ledger.history(settings, "m")
    assert [(r.action, r.version, r.outcome) for r in records] == [
        ("deploy", "2", "failed"), ("deploy", "1", "succeeded"),
    ]  # fmt: skip
    assert records[0].when and records[0].actor == "tester"
    run = registry.connect(settings).get_run(records[0].record_id)
    assert run.info.status == "FAILED" and run.data.tags["previous_version"] == "1"
    tag = registry.connect(settings).get_model_version("m", "2").tags["release.production"]
    assert tag.startswith("deploy failed")
    assert ledger.live(settings, "m", "production").version == "1"  # a failed move serves nothing
    assert ledger.history(settings, "other") == []


@pytest.mark.parametrize(
    ("moves", "back_to"),
    [
        ([("deploy", "1", ""), ("deploy", "2", "1")], "1"),
        ([("deploy", "1", ""), ("deploy", "2", "1"), ("reject", "3", "2")], "1"),
        # Rolling back twice does not bring the version rolled away from back.
        ([("deploy", "1", ""), ("deploy", "2", "1"), ("rollback", "1", "2")], None),
        # ...unless it was deployed again on purpose since.
        (
            [
                ("deploy", "1", ""),
                ("deploy", "2", "1"),
                ("rollback", "1", "2"),
                ("deploy", "2", "1"),
                ("deploy", "3", "2"),
            ],
            "2",
        ),
        ([("deploy", "1", "")], None),
    ],
)
def test_previous_good_version(settings, moves, back_to):
    for action, version, previous in moves:
        outcome = "rejected" if action == "reject" else "succeeded"
        record(settings, action, version, outcome, previous)
    found = ledger.previous_good(settings, "m", "production")
    assert (found.version if found else None) == back_to


def test_actor_is_never_empty(monkeypatch):
    for name in ("GITHUB_ACTOR", "GITLAB_USER_LOGIN", "BUILD_USER_ID"):
        monkeypatch.delenv(name, raising=False)
    assert actor_name(Settings(actor="alice")) == "alice"
    monkeypatch.setenv("GITHUB_ACTOR", "octocat")
    assert actor_name(Settings(actor="  ")) == "octocat"
    monkeypatch.delenv("GITHUB_ACTOR")
    assert actor_name(Settings()).strip()
