"""The release ledger on a real MLflow store (SQLite): append-only records, what serves, and
which version a rollback goes back to."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelyard import registry
from modelyard.config import Settings
from modelyard.deploy import chain, ledger
from modelyard.deploy.ledger import Release
from modelyard.deploy.release import actor_name
from tests.conftest import invoke_cli


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


# --- the chain: an edit, a deletion or a reordering made in MLflow behind modelyard's back ------


def _four_moves(settings: Settings) -> list[Release]:
    """m → production: deploy 1, deploy 2, rollback to 1, deploy 3; oldest first."""
    for action, version, previous in (("deploy", "1", ""), ("deploy", "2", "1"),
                                      ("rollback", "1", "2"), ("deploy", "3", "1")):  # fmt: skip
        record(settings, action, version, previous=previous)
    return ledger.history(settings, "m", "production")[::-1]


def test_each_environment_is_a_chain_of_signed_records(settings):
    records = _four_moves(settings)
    staging = Release(model="m", environment="staging", action="deploy", version="2",
                      outcome="succeeded", actor="tester")  # fmt: skip
    ledger.append(settings, staging)
    assert ledger.verify(settings) == {("m", "production"): [], ("m", "staging"): []}
    client = registry.connect(settings)
    tags = [client.get_run(r.record_id).data.tags for r in records]
    assert [t["chain.seq"] for t in tags] == ["1", "2", "3", "4"]
    assert tags[0]["chain.prev"] == chain.GENESIS
    assert [t["chain.prev"] for t in tags[1:]] == [t["chain.hash"] for t in tags[:-1]]
    assert ledger.verify(settings, "m", "staging") == {("m", "staging"): []}
    shown = invoke_cli("history", "m", "--verify", env=_cli_env(settings))
    assert shown.exit_code == 0, shown.output
    assert "m → production: chain intact" in shown.output and "m → staging" in shown.output


def _cli_env(settings: Settings) -> dict[str, str | None]:
    return {"MODELYARD_WORKSPACE": str(settings.workspace),
            "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri}  # fmt: skip


def _edit(client, records: list[Release], settings: Settings) -> None:
    client.set_tag(records[1].record_id, "reason", "nothing happened here")


def _drop_tag(client, records: list[Release], settings: Settings) -> None:
    client.delete_tag(records[1].record_id, "actor")


def _resign(client, records: list[Release], settings: Settings) -> None:
    """An edit whose hash is made anew and signed, by a key nobody trusts."""
    run = client.get_run(records[1].record_id)
    fields = {f.name: run.data.tags.get(f.name, "") for f in dataclasses.fields(Release)
              if f.name != "record_id"} | {"version": "7"}  # fmt: skip
    before = chain.parse(client.get_run(records[0].record_id).data.tags)
    forged = chain.extend(fields, before, Ed25519PrivateKey.generate())
    for name, value in forged.tags().items() | {("version", "7")}:
        client.set_tag(run.info.run_id, name, value)


def _delete_second(client, records: list[Release], settings: Settings) -> None:
    client.delete_run(records[1].record_id)


def _delete_newest(client, records: list[Release], settings: Settings) -> None:
    client.delete_run(records[3].record_id)


def _swap_start_times(client, records: list[Release], settings: Settings) -> None:
    """What only the database allows: the second and third records change places."""
    second, third = (client.get_run(r.record_id).info for r in records[1:3])
    database = settings.mlflow_tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(database) as db:
        for run, start in ((second, third.start_time), (third, second.start_time)):
            db.execute("UPDATE runs SET start_time = ? WHERE run_uuid = ?", (start, run.run_id))


def _insert(client, records: list[Release], settings: Settings) -> None:
    """A record written by hand, as modelyard would have but for the link."""
    experiment = client.get_experiment_by_name(ledger.EXPERIMENT).experiment_id
    tags = {"model": "m", "environment": "production", "action": "deploy", "version": "2",
            "outcome": "succeeded", "actor": "intruder", "modelyard.release": "1"}  # fmt: skip
    client.create_run(experiment, tags=tags)


@pytest.mark.parametrize(
    ("tamper", "named", "problem"),
    [
        (_edit, 1, "edited: its fields or its place no longer match its hash"),
        (_drop_tag, 1, "edited: its fields or its place no longer match its hash"),
        (_resign, 1, "does not verify with any trusted key"),
        (_delete_second, 2, "the record before it (seq 2) was deleted or edited"),
        (_delete_newest, None, "points at seq 4, which no record has: the newest records"),
        (_swap_start_times, 1, "listed after seq 3: reordered"),
        (_insert, 4, "carries no chain link"),
    ],
)
def test_verify_names_the_first_record_tampered_with(settings, tamper, named, problem):
    records = _four_moves(settings)
    tamper(registry.connect(settings), records, settings)
    breaks = ledger.verify(settings, "m")[("m", "production")]
    assert breaks, "the tampering went unseen"
    first = breaks[0]
    if named is None:
        assert first.entry is None  # the head
    elif named < len(records):
        assert first.entry is not None and first.entry.record_id == records[named].record_id
    else:  # a record that was never modelyard's
        assert first.entry is not None and first.entry.fields["actor"] == "intruder"
    assert problem in first.problem, breaks
    shown = invoke_cli("history", "m", "--verify", env=_cli_env(settings))
    assert shown.exit_code == 1 and "first break:" in shown.output and problem in shown.output
    listed = ledger.history(settings, "m")
    doctor = invoke_cli("doctor", "m", "--fix", env=_cli_env(settings))
    assert doctor.exit_code == 1 and problem in doctor.output, doctor.output
    assert ledger.history(settings, "m") == listed  # it repaired nothing on a tampered ledger


def test_records_from_before_the_chain_and_racing_writers_are_not_breaks():
    """Records older than the chain are left alone; two writers that both followed the same
    record (a rejection beside a deploy) leave two signed links, not a break."""
    key = Ed25519PrivateKey.generate()
    fields = [{"model": "m", "environment": "p", "version": str(n)} for n in range(4)]
    first = chain.extend(fields[1], None, key)
    racing = [chain.extend(fields[2], first, key), chain.extend(fields[3], first, key)]
    entries = [
        chain.Entry("old", fields[0], None, 1),
        chain.Entry("a", fields[1], first, 2),
        chain.Entry("b", fields[2], racing[0], 3),
        chain.Entry("c", fields[3], racing[1], 3),
    ]
    assert chain.verify(entries, racing[1], [key.public_key()]) == []
    assert chain.verify(entries, None, [key.public_key()])[0].entry is None  # head removed
    stranger = Ed25519PrivateKey.generate().public_key()
    assert [b.entry.record_id for b in chain.verify(entries, racing[1], [stranger])
            if b.entry] == ["a", "b", "c"]  # fmt: skip


def test_records_signed_by_a_retired_key_verify_once_it_is_a_ledger_key(settings, tmp_path):
    """A signing-key rotation: records signed by the old key break the chain's trust until the
    old key's public half is in ledger_keys, which bundles do not trust."""
    from cryptography.hazmat.primitives import serialization

    from modelyard.bundle import public_key_text

    old = Ed25519PrivateKey.generate()
    pem = old.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())  # fmt: skip
    (tmp_path / "old.pem").write_bytes(pem)
    retired = settings.model_copy(update={"signing_key_file": tmp_path / "old.pem"})
    record(retired, "deploy", "1")
    record(settings, "deploy", "2", previous="1")  # signed by the workspace's key from now on
    breaks = ledger.verify(settings, "m")[("m", "production")]
    assert [(b.entry.fields["version"] if b.entry else None) for b in breaks] == ["1"], breaks
    assert breaks[0].problem.endswith("does not verify with any trusted key")
    trusting = settings.model_copy(update={"ledger_keys": public_key_text(old.public_key())})
    assert ledger.verify(trusting, "m") == {("m", "production"): []}
