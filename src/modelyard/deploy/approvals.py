"""Who must approve a release, who may, what they are shown, and what the ledger keeps of it.

The pipeline flow only waits (a Prefect pause) and passes the answer here: the policy is the
spec's, and is the same whether the answer came from the Prefect UI form or `modelyard approve`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from modelyard.config import Settings
from modelyard.deploy import card, ledger
from modelyard.deploy.ledger import Release
from modelyard.spec import Spec


def needs_approval(spec: Spec, environment: str) -> bool:
    """The environment's `approval`, else: every environment after the first."""
    env = spec.deploy.environments[environment]
    if env.approval is not None:
        return env.approval
    return list(spec.deploy.environments).index(environment) > 0


def at_last_step(spec: Spec, environment: str) -> bool:
    """Does the approval come at the end of a canary's or a shadow's analysis (before all
    traffic moves) rather than before the release starts? Approvers then decide on the new
    version's behaviour on real traffic, not on its offline metrics alone."""
    strategy = spec.deploy.environments[environment].strategy
    return needs_approval(spec, environment) and strategy.kind != "all_at_once"


def may_decide(spec: Spec, environment: str, approve: bool, approver: str) -> bool:
    """Anyone may reject (it moves nothing); only the environment's approvers, if it lists
    any, may approve."""
    allowed = spec.deploy.environments[environment].approvers
    return not approve or not allowed or approver in allowed


def request(
    spec: Spec,
    environment: str,
    version: str,
    metrics: Mapping[str, float],
    gates: Mapping[str, str],
    links: Mapping[str, str],
    serving: list[str],
) -> str:
    """The Markdown an approver reads: metrics, gate results, links, and who may approve.
    `gates`: the version's `gate.*` tags; `links`: label -> URL (MLflow version, run)."""
    metric_rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()))
    gate_rows = "\n".join(
        f"| {k.removeprefix('gate.')} | {v} |" for k, v in sorted(gates.items())
        if k.startswith("gate.")
    )  # fmt: skip
    allowed = spec.deploy.environments[environment].approvers
    who = f"Only {', '.join(allowed)} may approve." if allowed else ""
    link_text = " · ".join(f"[{label}]({url})" for label, url in links.items())
    return (
        f"## Deploy {spec.name} v{version} to {environment}?\n\n"
        f"It already serves {', '.join(serving) or 'no environment yet'}. {link_text}\n\n"
        f"| metric | value |\n|---|---|\n{metric_rows}\n\n"
        f"| gate | result |\n|---|---|\n{gate_rows}\n\n"
        f"Approve to deploy and move the `{environment}` alias; reject to keep what serves now. "
        f"{who}"
    )


def reject(
    settings: Settings, spec: Spec, environment: str, version: str, actor: str, reason: str
) -> Release:
    """Record that a person (or a timeout) kept `version` out of `environment`."""
    return _decision(settings, spec, environment, version, actor, reason, "reject", "rejected")


def approve(
    settings: Settings, spec: Spec, environment: str, version: str, actor: str, reason: str
) -> Release:
    """Record an approval given while a canary or a shadow waited at its last step."""
    return _decision(settings, spec, environment, version, actor, reason, "approve", "approved")


def refuse(settings: Settings, spec: Spec, environment: str, version: str, actor: str) -> Release:
    """Record an approval by someone the spec does not list for `environment`: it moved
    nothing, and the ledger says who tried."""
    allowed = ", ".join(spec.deploy.environments[environment].approvers)
    reason = f"{actor} is not an approver of {environment} (approvers: {allowed})"
    return _decision(settings, spec, environment, version, actor, reason, "approve", "refused")


def _decision(
    settings: Settings, spec: Spec, environment: str, version: str, actor: str, reason: str,
    action: str, outcome: str,
) -> Release:  # fmt: skip
    live = ledger.live(settings, spec.name, environment)
    record = Release(
        model=spec.name, environment=environment, action=action, version=version,
        outcome=outcome, actor=actor, previous_version=live.version if live else "",
        reason=reason,
    )  # fmt: skip
    done = ledger.append(settings, record)
    card.refresh(settings, spec.name, [version], logging.getLogger("modelyard").warning)
    return done
