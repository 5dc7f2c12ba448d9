"""Find and repair what a killed process left half done.

Every step that can be interrupted leaves a trace this module knows how to read:

- a version registered whose packaging never finished (the run died after `register`, before
  `package` tagged the bundle): it has no `bundle_digest` and no alias, can never deploy, and
  a rerun of the same commit would otherwise keep finding it. Repair: withdraw it.
- an environment's alias that disagrees with the release ledger (a deploy died after the hosts
  switched but before the alias moved, or someone moved the alias by hand). The ledger records
  what the hosts were last successfully given, so the alias follows the ledger.

Each repair is recorded in the ledger (action `withdraw` or `realias`).

It also checks the ledger's chains (`ledger.verify`). A record edited or deleted behind
modelyard's back cannot be repaired from what is left (its true content is gone), so that is
reported, never "fixed".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from modelyard import registry
from modelyard.config import Settings
from modelyard.deploy import ledger
from modelyard.deploy.ledger import Release
from modelyard.errors import ModelyardError


@dataclass
class Finding:
    model: str
    problem: str
    fix: str
    version: str
    action: str  # how the repair is recorded in the ledger
    environment: str = ""
    repair: Callable[[], None] = field(repr=False, default=lambda: None)


def examine(settings: Settings, model: str) -> list[Finding]:
    # Aliases first: a leftover version someone pointed an alias at becomes unaliased (and
    # so withdrawable) once the alias follows the ledger again.
    return _aliases_off_the_ledger(settings, model) + _unfinished_versions(settings, model)


def ledger_breaks(settings: Settings, model: str) -> list[str]:
    """The first break of each of the model's ledger chains, described."""
    return [f"the release ledger of {name} → {environment}: {breaks[0].describe()}"
            for (name, environment), breaks in ledger.verify(settings, model).items()
            if breaks]  # fmt: skip


def repair(settings: Settings, finding: Finding, actor: str) -> Release:
    finding.repair()
    record = Release(
        model=finding.model, environment=finding.environment or "-", action=finding.action,
        version=finding.version, outcome="succeeded", actor=actor,
        reason=f"{finding.problem}; {finding.fix}",
    )  # fmt: skip
    return ledger.append(settings, record)


def repair_all(
    settings: Settings, models: list[str], actor: str, report: Callable[[Finding, bool], None]
) -> bool:
    """Examine `models` and repair until nothing is found; True if nothing was found at all.
    `report(finding, repaired)` is told of each finding, then of its repair. A repair can
    uncover the next problem (see `examine`), so this looks again after each round, and stops
    with an error if a problem it repaired comes back."""
    findings = [f for name in models for f in examine(settings, name)]
    healthy, repaired = not findings, set()
    while findings:
        if any(f.problem in repaired for f in findings):
            raise ModelyardError("a repair did not hold; see `modelyard history`")
        for finding in findings:
            report(finding, False)
            repair(settings, finding, actor)
            repaired.add(finding.problem)
            report(finding, True)
        findings = [f for name in models for f in examine(settings, name)]
    return healthy


def _unfinished_versions(settings: Settings, model: str) -> list[Finding]:
    client = registry.connect(settings)
    aliased = set(registry.aliases(client, model).values())
    found = []
    for info in registry.list_versions(client, model):
        if info.tags.get("bundle_digest") or info.version in aliased:
            continue
        found.append(Finding(
            model=model, version=info.version, action=ledger.WITHDRAW,
            problem=f"{model} v{info.version} was registered but never packaged (the run "
            "stopped between register and package)",
            fix=f"withdraw v{info.version}; rerun the pipeline for its commit",
            repair=partial(registry.withdraw, client, model, info.version),
        ))  # fmt: skip
    return found


def _aliases_off_the_ledger(settings: Settings, model: str) -> list[Finding]:
    client = registry.connect(settings)
    aliases = registry.aliases(client, model)
    environments = {r.environment for r in ledger.history(settings, model) if r.serving}
    found = []
    for environment in sorted(environments):
        live = ledger.live(settings, model, environment)
        if live is None or aliases.get(environment) == live.version:
            continue
        pointed = aliases.get(environment)
        found.append(Finding(
            model=model, version=live.version, environment=environment, action="realias",
            problem=f"alias '{environment}' points at "
            f"{'v' + pointed if pointed else 'nothing'} but the ledger says v{live.version} "
            f"serves {environment}",
            fix=f"move alias '{environment}' to v{live.version}",
            repair=partial(registry.set_alias, client, model, environment, live.version),
        ))  # fmt: skip
    return found
