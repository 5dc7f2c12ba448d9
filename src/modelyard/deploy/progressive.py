"""A release by the environment's strategy: all at once (`release.deploy`), or a canary that
walks its steps or a shadow that gets copies of live requests (`modelyard.rollout.walk`) on the
role's traffic shares, judged from the stack's Prometheus, each analysis in the ledger.

A canary starts the new version in each host's idle slot beside the live one and gives it the
first step's share (deploy.yml in canary mode); a shadow starts it the same way with the live
version's bundle as its reference and a sample of copies (shadow mode; modelyard.serve.shadow
compares). ansible/traffic.yml moves the share, promotes or aborts. While it runs, `status`
shows where it is and `ask` lets an operator promote or abort it: the walk reads the request
within a second. Nothing moves the alias or calls the new version live before the last step
passes; a rollback leaves both as they were.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from modelyard import registry
from modelyard.atomic import replace_file
from modelyard.config import Settings
from modelyard.deploy import ledger, release
from modelyard.deploy.ledger import Release
from modelyard.deploy.locks import Lock, ReleaseConflict
from modelyard.deploy.playbooks import PlaybookResult
from modelyard.errors import DeployFailed, ModelyardError
from modelyard.monitor.canary import SlotWindow, window
from modelyard.monitor.drift import Prometheus, prometheus_for
from modelyard.monitor.targets import slot_targets, write_targets
from modelyard.rollout import (
    SYSTEM_CLOCK,
    Analysis,
    Clock,
    Plan,
    Request,
    bake_warning,
    thresholds,
    walk,
)
from modelyard.spec import CanaryStrategy, ShadowStrategy, Spec

Progress = Callable[[str], None]
ANALYSIS = "analysis"  # the ledger action of one judged bake window


def deploy(
    settings: Settings,
    spec: Spec,
    environment: str,
    version: str,
    progress: Progress,
    action: str = "deploy",
    reason: str = "",
    actor: str | None = None,
    expected: str | None = None,
    lock: Lock | None = None,
    approve: Callable[[], bool] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    on_analysis: Callable[[Analysis], None] = lambda _: None,
) -> Release:
    """Release `version` to `environment` by its strategy; see `release.deploy` for the
    others. `approve` is asked before a canary's last step; `on_analysis` hears of every
    judged window (the flow publishes each as an artifact)."""
    declared = spec.deploy.environments.get(environment)  # unknown: release.target says so
    plan = declared.strategy if declared else None
    if not isinstance(plan, CanaryStrategy | ShadowStrategy):
        return release.deploy(settings, spec, environment, version, progress, action, reason,
                              actor, expected, lock)  # fmt: skip
    where = release.target(spec, environment, settings, progress)
    actor = actor or release.actor_name(settings)
    kind = plan.kind
    with release.held(settings, spec, environment, f"{kind} v{version} by {actor}", expected,
                      lock) as live:  # fmt: skip
        if live is None or live.version == version:
            # Nothing else serves to judge it against: the first version goes in whole.
            progress(f"{kind}: no other version serves {environment}; deploying all at once")
            why = reason or f"first version: nothing to compare a {kind} with"
            return release.move(settings, spec, where, version, progress, action, why, actor,
                                live)  # fmt: skip
        record = replace(Release(spec.name, environment, action, version, ledger.SUCCEEDED,
                                 actor), reason=reason)  # fmt: skip
        hooks = _Hooks(progress, approve, clock, on_analysis)
        return _walk(settings, spec, where, plan, record, live, hooks)


@dataclass
class _HostTraffic:
    """The Ansible side of one running canary or shadow: every host's share, promotion and abort."""

    settings: Settings
    move: release.Move
    progress: Progress
    status: Path
    kind: str  # canary or shadow, as the operator reads it
    # A host could not be sent back (lost mid-walk): the status stays for `rollout abort`.
    stranded: bool = False

    def share(self, percent: int) -> None:
        self._traffic("weight", f"share-{percent}", {"model_service_canary_weight": percent})
        _update_status(self.status, lambda _: {"percent": percent})

    def promote(self) -> None:
        self._traffic("promote", "promote")

    def abort(self) -> None:
        self._traffic("abort", "abort")

    def _traffic(self, action: str, step: str, extra: dict[str, Any] | None = None) -> None:
        self.progress(f"{self.kind}: {action} {extra or ''}".rstrip())
        result = release.play(self.settings, self.move, "traffic.yml", step, self.progress,
                              {"model_service_traffic_action": action} | (extra or {}))  # fmt: skip
        if not result.ok:
            raise DeployFailed(f"{self.kind} {action} failed: {result.reason()}")


@dataclass(frozen=True)
class _Windows:
    prometheus: Prometheus
    selector: str  # the environment's series
    version: str
    baseline_version: str

    def canary(self, seconds: int, at: float) -> SlotWindow:
        return window(self.prometheus, f'{self.selector},version="{self.version}"', seconds, at)

    def baseline(self, seconds: int, at: float) -> SlotWindow:
        selector = f'{self.selector},version="{self.baseline_version}"'
        return window(self.prometheus, selector, seconds, at)


@dataclass(frozen=True)
class _Hooks:
    """What the caller hears and decides during a walk."""

    progress: Progress
    approve: Callable[[], bool] | None
    clock: Clock
    on_analysis: Callable[[Analysis], None]


def _walk(
    settings: Settings, spec: Spec, where: release.Target, plan: CanaryStrategy | ShadowStrategy,
    asked: Release, live: Release, hooks: _Hooks,
) -> Release:  # fmt: skip
    """Start the new version beside the live one, walk the plan, end promoted or rolled back.
    `asked`: the record of the release asked for (action, actor, reason)."""
    environment, version, progress = where.environment, asked.version, hooks.progress
    prometheus = prometheus_for(settings)  # a canary nobody can judge must not start
    warning = bake_warning(Plan.of(plan).bake, prometheus.scrape_interval())
    if warning:
        progress(f"{plan.kind}: warning: {warning}")
    move = release.prepare(settings, spec, where, version, plan.kind, progress)
    record = replace(move.record(spec, asked.action, asked.actor, live), reason=asked.reason)
    progress(f"{plan.kind}: {spec.name} v{version} → {environment} {_describe(plan)}, beside "
             f"v{live.version}")  # fmt: skip
    started = release.play(settings, move, "deploy.yml", "start", progress,
                           _start_vars(settings, spec, plan, version, live))  # fmt: skip
    record = replace(record, hosts=",".join(started.touched))
    status = status_file(settings, spec.name, environment)
    traffic = _HostTraffic(settings, move, progress, status, plan.kind)
    steps = Plan.of(plan)
    replace_file(status, json.dumps({
        "model": spec.name, "environment": environment, "version": version, "kind": plan.kind,
        "baseline": live.version, "steps": steps.steps, "percent": steps.steps[0],
        "copied": steps.copied, "bake": steps.bake, "analyses": [], "slots": started.slots,
    }, indent=2).encode())  # fmt: skip
    if not started.ok:
        why = started.reason() + _send_back(traffic, started, environment)
        _forget(traffic, settings, spec.name, environment)
        _fail(settings, record, why, started)
    write_targets(settings, spec.name, environment,
                  slot_targets(started.slots, live.version, version))  # fmt: skip
    windows = _Windows(prometheus, f'model="{spec.name}",environment="{environment}"',
                       version, live.version)  # fmt: skip

    def note(analysis: Analysis) -> None:
        progress(f"{plan.kind}: {analysis.describe()}")
        _update_status(status, lambda state: {
            "analyses": [*state.get("analyses", []), _analysis_json(analysis)],
        })  # fmt: skip
        ledger.append(settings, replace(record, action=ANALYSIS, outcome=analysis.verdict.outcome,
                                        reason=analysis.describe()),
                      metrics=analysis.metrics())  # fmt: skip
        hooks.on_analysis(analysis)

    try:
        outcome = walk(plan, thresholds(spec, plan.checks), traffic, windows, note, hooks.clock,
                       lambda: take_request(settings, spec.name, environment),
                       hooks.approve)  # fmt: skip
    except (ModelyardError, OSError) as exc:  # Prometheus or a host lost mid-walk
        why = f"{plan.kind} stopped: {exc}" + _send_back(traffic, started, environment)
        _fail(settings, record, why, started)
    finally:
        _forget(traffic, settings, spec.name, environment)
    if not outcome.promoted:
        write_targets(settings, spec.name, environment,
                      slot_targets(started.slots, live.version))  # fmt: skip
        _fail(settings, record, f"rolled back to v{live.version}: {outcome.reason}", started)
    _make_live(settings, spec.name, environment, version, started.slots)
    progress(f"{plan.kind}: {spec.name} v{version} serves {environment}; alias '{environment}' "
             "moved")  # fmt: skip
    why = "; ".join(filter(None, [record.reason, f"{plan.kind}: {outcome.reason}"]))
    return ledger.append(settings, replace(record, reason=why))


def _describe(plan: CanaryStrategy | ShadowStrategy) -> str:
    if isinstance(plan, ShadowStrategy):
        return (f"as a shadow: copies of {plan.sample:.0%} of the requests for {plan.duration} s, "
                "its answers dropped")  # fmt: skip
    return f"at {plan.steps[0]} %; steps {plan.steps}, bake {plan.bake} s"


def _start_vars(
    settings: Settings,
    spec: Spec,
    plan: CanaryStrategy | ShadowStrategy,
    version: str,
    live: Release,
) -> dict[str, Any]:
    """deploy.yml's variables that start the new version beside the live one, not in its place."""
    if isinstance(plan, CanaryStrategy):
        return {"model_service_traffic_mode": "canary",
                "model_service_canary_weight": plan.steps[0]}  # fmt: skip
    reference = registry.bundle_archive(
        settings, spec.name, live.version, release.version_tags(settings, spec.name, live.version)
    )
    own = registry.bundle_archive(settings, spec.name, version,
                                  release.version_tags(settings, spec.name, version))  # fmt: skip
    return release.bundle_key_vars(settings, [own, reference]) | {
        "model_service_traffic_mode": "shadow", "model_service_canary_weight": 0,
        "model_service_shadow_sample": plan.sample,
        "model_service_shadow_reference_archive": str(reference),
        "model_service_shadow_reference_version": live.version,
    }  # fmt: skip


def _make_live(
    settings: Settings, model: str, environment: str, version: str,
    slots: dict[str, dict[str, str]],
) -> None:  # fmt: skip
    """After a promotion: the alias moves, and Prometheus scrapes each host's canary slot,
    now its live one, alone."""
    registry.set_alias(registry.connect(settings), model, environment, version)
    promoted = {host: s | {"live": s.get("canary", ""), "canary": ""} for host, s in slots.items()}
    write_targets(settings, model, environment, slot_targets(promoted, version))


def _update_status(path: Path, changes: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Apply `changes` (given the status as it is) to a canary's status file, whole."""
    state = json.loads(path.read_text()) if path.exists() else {}
    replace_file(path, json.dumps(state | changes(state), indent=2).encode())


def _send_back(traffic: _HostTraffic, started: PlaybookResult, environment: str) -> str:
    """Send every host the canary reached back to its live slot; say how that went."""
    if not started.touched:
        return ""
    try:
        traffic.abort()
    except DeployFailed as exc:
        traffic.stranded = True
        return (f" (sending traffic back failed too: {exc}; once every host answers, "
                f"`modelyard rollout abort {environment}` finishes it)")  # fmt: skip
    return " (all traffic is back on the live version)"


def _forget(traffic: _HostTraffic, settings: Settings, model: str, environment: str) -> None:
    """The walk is over: its request file goes, and its status unless a host still carries
    the new version's share (then `rollout status` shows it and `rollout abort` ends it)."""
    request_file(settings, model, environment).unlink(missing_ok=True)
    if not traffic.stranded:
        traffic.status.unlink(missing_ok=True)


def _fail(settings: Settings, record: Release, why: str, result: PlaybookResult) -> None:
    ledger.append(settings, replace(record, outcome="failed", reason=why), result.files)
    raise DeployFailed(f"{record.action} of {record.model} v{record.version} to "
                       f"{record.environment} failed: {why}")  # fmt: skip


def _analysis_json(analysis: Analysis) -> dict[str, Any]:
    return {
        "step": analysis.step, "percent": analysis.percent, "stage": analysis.stage,
        "outcome": analysis.verdict.outcome, "failures": analysis.failures,
        "elapsed": round(analysis.elapsed, 1),
        "checks": [asdict(c) for c in analysis.verdict.checks],
    }  # fmt: skip


# --- operating a running canary ------------------------------------------------------------------
def _rollouts(settings: Settings) -> Path:
    folder = settings.workspace / "rollouts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def status_file(settings: Settings, model: str, environment: str) -> Path:
    return _rollouts(settings) / f"{model}--{environment}.json"


def request_file(settings: Settings, model: str, environment: str) -> Path:
    return _rollouts(settings) / f"{model}--{environment}.request"


def status(settings: Settings, model: str, environment: str) -> dict[str, Any] | None:
    """The running canary's weights, step and last checks; None when none runs."""
    path = status_file(settings, model, environment)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def ask(
    settings: Settings,
    spec: Spec,
    environment: str,
    request: Request,
    progress: Progress,
    lock: Lock | None = None,
) -> str:
    """Promote or abort the canary of `spec`'s model in `environment` now. A walk that runs
    holds the release lock and hears the request within a second; when the lock is free, the
    walk has died (its process was killed), and this acts on the hosts itself. Returns what
    was done."""
    state = status(settings, spec.name, environment)
    if state is None:
        raise ModelyardError(f"no canary of {spec.name} runs in {environment} from this workspace")
    actor = release.actor_name(settings)
    try:
        with release.held(settings, spec, environment, f"rollout {request} by {actor}",
                          lock=lock) as live:  # fmt: skip
            return _act_for_a_dead_walk(settings, spec, environment, state, request, actor, live,
                                        progress)  # fmt: skip
    except ReleaseConflict:  # the walk holds the lock: it reads the request
        replace_file(request_file(settings, spec.name, environment), request.encode())
        return (f"asked the canary's walk to {request}; a running walk acts within a second "
                "(`rollout status` shows it). A walk whose process died holds a Prefect "
                "release lock until its lease ends (2 minutes): ask again then")  # fmt: skip


def _act_for_a_dead_walk(
    settings: Settings, spec: Spec, environment: str, state: dict[str, Any], request: Request,
    actor: str, live: Release | None, progress: Progress,
) -> str:  # fmt: skip
    version, baseline = str(state["version"]), str(state["baseline"])
    where = release.target(spec, environment, settings, progress)
    move = release.prepare(settings, spec, where, version, f"canary-{request}", progress)
    why = f"{request} by an operator after the canary's walk stopped"
    record = replace(move.record(spec, "deploy", actor, live), reason=why)
    result = release.play(settings, move, "traffic.yml", request, progress,
                          {"model_service_traffic_action": request})  # fmt: skip
    record = replace(record, hosts=",".join(result.touched))
    if not result.ok:
        _fail(settings, record, result.reason(), result)
    slots: dict[str, dict[str, str]] = state.get("slots", {})
    status_file(settings, spec.name, environment).unlink(missing_ok=True)
    if request == "abort":
        write_targets(settings, spec.name, environment, slot_targets(slots, baseline))
        ledger.append(settings, replace(record, outcome="failed"))
        return f"aborted: v{baseline} serves {environment} alone, v{version} stopped"
    _make_live(settings, spec.name, environment, version, slots)
    ledger.append(settings, record)
    return f"promoted: v{version} serves {environment}; alias '{environment}' moved"


def take_request(settings: Settings, model: str, environment: str) -> Request | None:
    path = request_file(settings, model, environment)
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    path.unlink(missing_ok=True)
    return text if text in ("promote", "abort") else None  # type: ignore[return-value]
