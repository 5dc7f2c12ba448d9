"""Progressive delivery: a canary walks its steps, each judged from Prometheus against the
baseline that serves beside it; a failure sends all traffic back to the baseline at once. A
shadow is one step with no client traffic: it gets copies of a sample of the requests, is
judged on its own answers and on how closely they follow the baseline's, and once it passes
(and is approved, where the environment has approvers) takes all traffic at once.

`walk` is the decision loop alone: it moves traffic through a `Traffic`, reads each bake
window through `Windows` and hands every analysis to `record`, so it knows nothing of Ansible
or Prometheus and runs on any clock. `modelyard.deploy.progressive` wires it to
the role's ansible/traffic.yml, the stack's Prometheus and the release ledger.

What the systems that do this taught, and this loop keeps:
- a window with too few requests is inconclusive and bakes again (up to the timeout), never a
  pass (Flagger's and Argo's users were bitten by quiet passes on no traffic);
- the timeout rolls back: a canary that cannot be judged does not reach everyone;
- an operator can promote or abort at any time, and is heard within a second, not at the end
  of a bake.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from modelyard.monitor.canary import SlotWindow, Thresholds, Verdict, judge
from modelyard.spec import CanaryChecks, CanaryStrategy, ShadowChecks, ShadowStrategy, Spec

Request = Literal["promote", "abort"]
POLL_SECONDS = 1.0  # how often a bake looks for an operator's promote or abort


class Traffic(Protocol):
    """Moves an environment's traffic between the baseline and the canary (every host)."""

    def share(self, percent: int) -> None: ...

    def promote(self) -> None: ...

    def abort(self) -> None: ...


class Windows(Protocol):
    """What each side did over the `seconds` before `at` (Unix seconds; one instant for both
    sides of an analysis, so that they are judged over the same window)."""

    def canary(self, seconds: int, at: float) -> SlotWindow: ...

    def baseline(self, seconds: int, at: float) -> SlotWindow: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class _SystemClock:
    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)


SYSTEM_CLOCK: Clock = _SystemClock()


@dataclass(frozen=True)
class Analysis:
    """One bake window judged."""

    step: int  # 1-based, as an operator counts them
    percent: int  # the canary's share during the window
    verdict: Verdict
    failures: int  # failed analyses so far, this one included
    elapsed: float  # seconds since the rollout started
    copied: float | None = None  # a shadow's: the share of requests copied to it

    @property
    def stage(self) -> str:
        if self.copied is not None:
            return f"shadow ({self.copied:.0%} of requests copied)"
        return f"step {self.step} ({self.percent} %)"

    def describe(self) -> str:
        return f"{self.stage}: {self.verdict.describe()}"

    def metrics(self) -> dict[str, float]:
        """Each check's value (when it could be computed) and threshold, for the MLflow record."""
        values = {c.metric: c.value for c in self.verdict.checks
                  if c.value is not None and math.isfinite(c.value)}  # fmt: skip
        thresholds = {f"{c.metric}.threshold": c.threshold for c in self.verdict.checks}
        verdict = self.verdict
        counts = {"requests": verdict.requests, "step": float(self.step),
                  "percent": float(self.percent)}  # fmt: skip
        if verdict.baseline_requests is not None:
            counts["baseline_requests"] = verdict.baseline_requests
        return values | thresholds | counts

    def to_markdown(self, title: str) -> str:
        """A table of the window's checks, for a Prefect artifact."""
        rows = [
            f"| {c.metric} | {'n/a' if c.value is None else f'{c.value:.4g}'} | "
            f"{c.threshold:g} | {_VERDICTS[c.passed]} |"
            for c in self.verdict.checks
        ]
        return "\n".join([
            f"## {title}: {self.stage} {self.verdict.outcome}", "",
            f"{self.failures} failed analyses so far, {self.elapsed:.0f} s into the rollout; "
            f"{self.verdict.requests:.0f} requests to the new version"
            + ("" if self.verdict.baseline_requests is None
               else f", {self.verdict.baseline_requests:.0f} to the baseline") + ".", "",
            "| check | value | threshold | verdict |", "|---|---|---|---|", *rows, "",
        ])  # fmt: skip


_VERDICTS = {True: "ok", False: "**failed**", None: "inconclusive"}


@dataclass(frozen=True)
class Plan:
    """A strategy as the walk sees it."""

    steps: tuple[int, ...]  # the new version's share of client requests at each step
    bake: int
    max_failures: int
    timeout: int
    copied: float | None = None  # a shadow: the share of requests copied to it
    # After the last step passes all traffic moves at once (a shadow's switch): the approval,
    # where one is needed, comes first.
    switch: bool = False

    @classmethod
    def of(cls, strategy: CanaryStrategy | ShadowStrategy) -> Plan:
        if isinstance(strategy, ShadowStrategy):
            return cls((0,), strategy.duration, 0, strategy.timeout, strategy.sample, switch=True)
        return cls(tuple(strategy.steps), strategy.bake, strategy.max_failures, strategy.timeout)


@dataclass(frozen=True)
class Outcome:
    promoted: bool
    reason: str
    analyses: tuple[Analysis, ...] = field(default=())


MIN_SCRAPES = 4  # a window of fewer scrapes is judged on one or two samples of each counter


def bake_warning(bake: int, scrape_interval: float | None) -> str | None:
    """What to tell the operator when each window holds too few of Prometheus's scrapes."""
    if scrape_interval is None or bake >= MIN_SCRAPES * scrape_interval:
        return None
    return (f"each {bake} s window holds fewer than {MIN_SCRAPES} of Prometheus's scrapes "
            f"(every {scrape_interval:g} s), so it is judged on little data: lengthen the "
            "bake (or duration) or scrape more often")  # fmt: skip


def thresholds(spec: Spec, checks: CanaryChecks) -> Thresholds:
    """The checks with the latency budget's default filled in: monitoring's budget for p99
    alerts, else the behaviour gate's. A shadow's comparison is by class agreement for a
    classifier, by mean absolute difference for a regressor."""
    budget = (
        checks.latency_budget_ms
        or spec.monitoring.latency_budget_ms
        or spec.behaviour.latency.budget_ms
    )
    return Thresholds(
        success_rate=checks.success_rate,
        latency_budget_ms=budget,
        latency_ratio=checks.latency_ratio,
        psi=checks.psi,
        min_requests=checks.min_requests,
        cost_ratio=checks.cost_ratio,
        **_comparison(spec, checks),
    )


def _comparison(spec: Spec, checks: CanaryChecks) -> dict[str, float | None]:
    if not isinstance(checks, ShadowChecks):
        return {}
    if spec.task == "regression":
        return {"max_mean_abs_diff": checks.max_mean_abs_diff}
    return {"agreement": checks.agreement}


def walk(
    strategy: CanaryStrategy | ShadowStrategy | Plan,
    limits: Thresholds,
    traffic: Traffic,
    windows: Windows,
    record: Callable[[Analysis], None],
    clock: Clock = SYSTEM_CLOCK,
    requested: Callable[[], Request | None] = lambda: None,
    approve: Callable[[], bool] | None = None,
) -> Outcome:
    """Walk the steps from the first, whose share the deploy already set. Ends promoted (all
    traffic on the canary, which becomes the live slot) or rolled back (all traffic on the
    baseline, the canary stopped); `approve`, when given, is asked before all traffic moves to
    the new version: before a canary's last step, after a shadow passes."""
    plan = strategy if isinstance(strategy, Plan) else Plan.of(strategy)
    started = clock.monotonic()
    analyses: list[Analysis] = []
    failures, step = 0, 0

    def end(promoted: bool, reason: str) -> Outcome:
        (traffic.promote if promoted else traffic.abort)()
        return Outcome(promoted, reason, tuple(analyses))

    while True:
        percent = plan.steps[step]
        request = _bake(plan.bake, clock, requested)
        if request is not None:
            return end(request == "promote", f"{request} asked by an operator at step {step + 1}")
        # At 100 % the baseline answers nothing: only the canary's own checks apply.
        at = time.time()
        baseline = windows.baseline(plan.bake, at) if percent < 100 else None
        verdict = judge(windows.canary(plan.bake, at), baseline, limits)
        failures += verdict.outcome == "failed"
        analysis = Analysis(step + 1, percent, verdict, failures, clock.monotonic() - started,
                            plan.copied)  # fmt: skip
        analyses.append(analysis)
        record(analysis)
        if verdict.outcome == "failed" and failures > plan.max_failures:
            return end(False, f"{analysis.describe()}; {failures} failed analyses, "
                              f"max_failures is {plan.max_failures}")  # fmt: skip
        if verdict.outcome == "passed":
            if step + 1 == len(plan.steps):
                if plan.switch and approve is not None and not approve():
                    return end(False, f"{analysis.stage} passed; the switch was not approved")
                passed = analysis.stage if plan.switch else f"all {len(plan.steps)} steps"
                return end(True, f"{passed} passed")
            step += 1
            if step + 1 == len(plan.steps) and approve is not None and not approve():
                return end(False, f"the last step to {plan.steps[step]} % was not approved")
            traffic.share(plan.steps[step])
            continue
        # Inconclusive, or a failure still within max_failures: the same step bakes again.
        if clock.monotonic() - started + plan.bake > plan.timeout:
            return end(False, f"timeout {plan.timeout} s reached with {analysis.describe()}")


def _bake(seconds: int, clock: Clock, requested: Callable[[], Request | None]) -> Request | None:
    """Wait out a bake, or less if an operator asks for something."""
    until = clock.monotonic() + seconds
    while (left := until - clock.monotonic()) > 0:
        request = requested()
        if request is not None:
            return request
        clock.sleep(min(POLL_SECONDS, left))
    return requested()
