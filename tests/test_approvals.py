"""Approval policy and its ledger records, in process: who must approve, who may, what the
approver is shown, what a rejection or a refused approval leaves, and which version an
operator's deploy picks. MLflow is a SQLite store in the test's folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from modelyard import registry
from modelyard.config import Settings
from modelyard.deploy import approvals, ledger, release
from modelyard.deploy.ledger import Release
from modelyard.errors import ModelyardError
from modelyard.spec import Spec, load_spec
from tests.conftest import ROOT


def spec_with(tmp_path: Path, environments: dict) -> Spec:
    data = yaml.safe_load((ROOT / "examples" / "ad_clicks" / "modelyard.yaml").read_text())
    data["name"] = "m"
    data["deploy"] = {"environments": environments}
    path = tmp_path / "modelyard.yaml"  # environments keep their order:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_spec(path)


@pytest.fixture
def settings(local_settings: Settings) -> Settings:
    return local_settings


LOCAL = {"target": "local", "port": 18000}


def test_every_environment_after_the_first_waits_unless_the_spec_says(tmp_path):
    spec = spec_with(tmp_path, {
        "dev": LOCAL, "staging": LOCAL | {"approval": True}, "canary": LOCAL | {"approval": False},
        "production": LOCAL,
    })  # fmt: skip
    assert [approvals.needs_approval(spec, env) for env in spec.deploy.environments] == [
        False, True, False, True,
    ]  # fmt: skip


def test_a_canary_or_a_shadow_is_approved_at_its_last_step_not_before_it_starts(tmp_path):
    shadow = {"kind": "shadow", "checks": {"agreement": 0.9}}
    spec = spec_with(tmp_path, {
        "dev": LOCAL | {"strategy": "canary"},  # the first: no approval at all
        "staging": LOCAL | {"strategy": "canary"},
        "shadowed": LOCAL | {"strategy": shadow, "approvers": ["alice"]},
        "quiet": LOCAL | {"strategy": "canary", "approval": False},
        "production": LOCAL,  # all at once: asked before the release, as ever
    })  # fmt: skip
    at_last = {env: approvals.at_last_step(spec, env) for env in spec.deploy.environments}
    assert at_last == {"dev": False, "staging": True, "shadowed": True, "quiet": False,
                       "production": False}  # fmt: skip
    assert approvals.needs_approval(spec, "production")


def test_anyone_may_reject_and_only_listed_approvers_may_approve(tmp_path):
    spec = spec_with(tmp_path, {
        "staging": LOCAL, "production": LOCAL | {"approvers": ["ana", "bo"]},
        "open": LOCAL | {"approvers": []},
    })  # fmt: skip
    assert approvals.may_decide(spec, "production", approve=True, approver="ana")
    assert not approvals.may_decide(spec, "production", approve=True, approver="mallory")
    assert approvals.may_decide(spec, "production", approve=False, approver="mallory")
    assert approvals.may_decide(spec, "open", approve=True, approver="anyone")


def test_the_request_shows_metrics_gates_links_and_who_may_approve(tmp_path):
    spec = spec_with(tmp_path, {"staging": LOCAL, "production": LOCAL | {"approvers": ["ana"]}})
    text = approvals.request(
        spec, "production", "3", {"roc_auc": 0.91234, "accuracy": 0.8},
        {"gate.data": "passed", "gate.model": "passed", "bundle_digest": "ab"},
        {"MLflow version": "http://mlflow/v3"}, ["staging"],
    )  # fmt: skip
    assert text.startswith("## Deploy m v3 to production?")
    assert "It already serves staging." in text and "[MLflow version](http://mlflow/v3)" in text
    assert "| accuracy | 0.8 |\n| roc_auc | 0.9123 |" in text  # sorted, 4 significant digits
    assert "| data | passed |\n| model | passed |" in text and "bundle_digest" not in text
    assert text.endswith("Only ana may approve.")
    first = approvals.request(spec, "staging", "1", {}, {}, {}, [])
    assert "It already serves no environment yet." in first and "may approve" not in first


def test_a_rejection_and_a_refused_approval_are_recorded_and_move_nothing(tmp_path, settings):
    spec = spec_with(tmp_path, {"staging": LOCAL, "production": LOCAL | {"approvers": ["ana"]}})
    served = Release(model="m", environment="production", action="deploy", version="1",
                     outcome="succeeded", actor="ci")  # fmt: skip
    ledger.append(settings, served)
    refused = approvals.refuse(settings, spec, "production", "2", "mallory")
    rejected = approvals.reject(settings, spec, "production", "2", "ana", "latency regressed")
    assert (refused.action, refused.outcome, refused.previous_version) == (
        "approve",
        "refused",
        "1",
    )
    assert refused.reason == "mallory is not an approver of production (approvers: ana)"
    assert (rejected.action, rejected.outcome, rejected.reason) == (
        "reject", "rejected", "latency regressed",
    )  # fmt: skip
    history = ledger.history(settings, "m", "production")
    assert [(r.action, r.actor) for r in history] == [
        ("reject", "ana"), ("approve", "mallory"), ("deploy", "ci"),
    ]  # fmt: skip
    assert ledger.live(settings, "m", "production").version == "1"


def test_an_operators_deploy_takes_the_named_version_else_the_candidate(tmp_path, settings):
    spec = spec_with(tmp_path, {"staging": LOCAL})
    with pytest.raises(ModelyardError, match="m has no 'candidate' version; pass --version"):
        release.version_to_deploy(settings, spec, None)
    registry.set_alias(registry.connect(settings), "m", registry.CANDIDATE, "2")
    assert release.version_to_deploy(settings, spec, None) == "2"
    assert release.version_to_deploy(settings, spec, "3") == "3"
