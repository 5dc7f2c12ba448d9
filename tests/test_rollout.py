"""The canary's walk on simulated traffic: an environment whose requests split between the
baseline and the canary by the current share, each bake window generated the way the serving
app's metrics count it (tests/test_canary.py), on a clock the test moves."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from modelyard.monitor.canary import SlotWindow, Thresholds, window
from modelyard.monitor.drift import Prometheus
from modelyard.rollout import POLL_SECONDS, Analysis, Request, walk
from modelyard.spec import CanaryStrategy, ShadowStrategy
from tests.test_canary import generated

LIMITS = Thresholds(
    success_rate=0.99, latency_budget_ms=200, latency_ratio=1.5, psi=0.2, min_requests=100
)
SEEDS = range(6)
FAULTS = {  # how a bad version differs, and the check that must catch it
    "errors": ({"error_rate": 0.08}, "success_rate"),
    "slower": ({"median_ms": 20.0}, "latency_p99_ratio"),
    "shifted": ({"shift": 0.3}, "prediction_psi"),
    "refusing": ({"refusal_rate": 0.08}, "success_rate"),
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Environment:
    """Requests at `rate` per second, the canary's share of them by the current percent; the
    canary differs from the baseline by `fault` (keywords of `generated`)."""

    rng: np.random.Generator
    first: int
    rate: float = 10.0
    fault: dict[str, float] = field(default_factory=dict)
    moves: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.percent = self.first

    # Traffic
    def share(self, percent: int) -> None:
        self.percent = percent
        self.moves.append(f"share {percent}")

    def promote(self) -> None:
        self.moves.append("promote")

    def abort(self) -> None:
        self.moves.append("abort")

    # Windows
    def canary(self, seconds: int, at: float) -> SlotWindow:
        return generated(self.rng, self._requests(seconds, self.percent), **self.fault)

    def baseline(self, seconds: int, at: float) -> SlotWindow:
        return generated(self.rng, self._requests(seconds, 100 - self.percent))

    def _requests(self, seconds: int, percent: int) -> int:
        return int(self.rate * seconds * percent / 100)


def run(
    env: Environment,
    plan: CanaryStrategy,
    clock: Clock | None = None,
    requested=lambda: None,
    approve=None,
) -> tuple[object, list[Analysis]]:
    analyses: list[Analysis] = []
    outcome = walk(plan, LIMITS, env, env, analyses.append, clock or Clock(), requested, approve)
    return outcome, analyses


def plan(**changes: object) -> CanaryStrategy:
    return CanaryStrategy.model_validate({"kind": "canary", "bake": 300} | changes)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_good_version_walks_every_step_and_is_promoted(seed: int) -> None:
    steps = plan(steps=[5, 25, 50, 100])
    env = Environment(np.random.default_rng(seed), first=5)
    clock = Clock()
    outcome, analyses = run(env, steps, clock)
    assert outcome.promoted, outcome.reason
    assert env.moves == ["share 25", "share 50", "share 100", "promote"]
    assert [(a.step, a.percent, a.verdict.outcome) for a in analyses] == [
        (1, 5, "passed"), (2, 25, "passed"), (3, 50, "passed"), (4, 100, "passed")
    ]  # fmt: skip
    # The last step has no baseline left: only the canary's own checks are judged.
    assert {c.metric for c in analyses[-1].verdict.checks} == {"success_rate", "latency_p99_ms"}
    assert clock.now == pytest.approx(4 * 300)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fault", FAULTS)
def test_a_bad_version_is_rolled_back_by_the_check_for_its_fault(seed: int, fault: str) -> None:
    difference, check = FAULTS[fault]
    env = Environment(np.random.default_rng(seed), first=10, fault=difference)
    outcome, analyses = run(env, plan(steps=[10, 50, 100], max_failures=0))
    assert not outcome.promoted and env.moves == ["abort"]
    assert [c.metric for c in analyses[0].verdict.failed] == [check]
    assert "step 1 (10 %)" in outcome.reason and check in outcome.reason
    # What the flow publishes for the window: each check with its value and threshold.
    table = analyses[0].to_markdown("m v2 canary")
    failing = next(c for c in analyses[0].verdict.checks if c.metric == check)
    assert f"| {check} | {failing.value:.4g} | {failing.threshold:g} | **failed** |" in table


@pytest.mark.parametrize("seed", SEEDS)
def test_failures_within_max_failures_bake_the_step_again(seed: int) -> None:
    difference, _ = FAULTS["errors"]
    env = Environment(np.random.default_rng(seed), first=10, fault=difference)
    outcome, analyses = run(env, plan(steps=[10, 50, 100], max_failures=2))
    assert not outcome.promoted and env.moves == ["abort"]
    assert [(a.step, a.failures) for a in analyses] == [(1, 1), (1, 2), (1, 3)]
    assert "3 failed analyses, max_failures is 2" in outcome.reason


def test_too_little_traffic_is_never_a_pass_and_ends_at_the_timeout() -> None:
    env = Environment(np.random.default_rng(0), first=5, rate=0.5)  # 7 requests a window
    clock = Clock()
    outcome, analyses = run(env, plan(steps=[5, 100], bake=60, timeout=600), clock)
    assert not outcome.promoted and env.moves == ["abort"]
    assert {a.verdict.outcome for a in analyses} == {"inconclusive"}
    assert len(analyses) == 10 and clock.now <= 600
    assert outcome.reason.startswith("timeout 600 s reached with step 1 (5 %): inconclusive")


@pytest.mark.parametrize("request_", ["abort", "promote"])
def test_an_operator_is_heard_within_a_second_mid_bake(request_: Request) -> None:
    env = Environment(np.random.default_rng(1), first=5)
    clock = Clock()
    asked_at = 450.0  # during the second step's bake

    def requested() -> Request | None:
        return request_ if clock.now >= asked_at else None

    outcome, analyses = run(env, plan(steps=[5, 25, 100]), clock, requested)
    assert outcome.promoted == (request_ == "promote")
    assert env.moves == ["share 25", request_]
    assert len(analyses) == 1 and asked_at <= clock.now <= asked_at + POLL_SECONDS
    assert outcome.reason == f"{request_} asked by an operator at step 2"


@pytest.mark.parametrize("approved", [True, False])
def test_the_last_step_waits_for_the_approval(approved: bool) -> None:
    env = Environment(np.random.default_rng(2), first=5)
    asked: list[list[str]] = []

    def approve() -> bool:
        asked.append(list(env.moves))
        return approved

    outcome, _ = run(env, plan(steps=[5, 50, 100]), approve=approve)
    assert asked == [["share 50"]]  # asked once, after step 2 passed and before step 3
    assert outcome.promoted == approved
    expected = ["share 50", "share 100", "promote"] if approved else ["share 50", "abort"]
    assert env.moves == expected


@dataclass
class Shadowed(Environment):
    """A shadow: it gets copies of `sample` of the requests, all of which the baseline answers,
    and gives the baseline's class on each compared row with probability `agreement` (or, for a
    regressor, differs from it by `diff` on average)."""

    sample: float = 0.1
    agreement: float = 0.99
    diff: float = 0.0

    def canary(self, seconds: int, at: float) -> SlotWindow:
        copies = int(self.rate * seconds * self.sample)
        window = generated(self.rng, copies, **self.fault)
        agreed = float(self.rng.binomial(copies, self.agreement))
        diffs = float(self.rng.exponential(self.diff, copies).sum()) if self.diff else 0.0
        return replace(window, compared=float(copies), agreed=agreed, abs_diff=diffs)


def shadow(**changes: object) -> ShadowStrategy:
    return ShadowStrategy.model_validate({"kind": "shadow", "duration": 600} | changes)


def run_shadow(env: Shadowed, strategy: ShadowStrategy, approve=None, **limits: float):
    analyses: list[Analysis] = []
    judged = replace(LIMITS, **({"agreement": 0.95} | limits))
    clock = Clock()
    outcome = walk(strategy, judged, env, env, analyses.append, clock, approve=approve)
    return outcome, analyses, clock


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("approved", [True, False, None])
def test_a_shadow_that_follows_the_baseline_switches_in_once_approved(
    seed: int, approved: bool | None
) -> None:
    env = Shadowed(np.random.default_rng(seed), first=0)
    asked: list[list[str]] = []

    def approve() -> bool:
        asked.append(list(env.moves))
        return bool(approved)

    outcome, analyses, clock = run_shadow(env, shadow(sample=0.1),
                                          approve if approved is not None else None)  # fmt: skip
    assert [a.verdict.outcome for a in analyses] == ["passed"]
    assert "agreement" in {c.metric for c in analyses[0].verdict.checks}
    assert analyses[0].describe().startswith("shadow (10% of requests copied): passed")
    assert asked == ([] if approved is None else [[]])  # after the pass, before any move
    assert env.moves == (["abort"] if approved is False else ["promote"])
    assert outcome.promoted == (approved is not False)
    assert clock.now == pytest.approx(600)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_shadow_that_disagrees_or_fails_on_its_own_is_stopped(seed: int) -> None:
    disagrees = Shadowed(np.random.default_rng(seed), first=0, agreement=0.85)
    outcome, analyses, _ = run_shadow(disagrees, shadow())
    assert not outcome.promoted and disagrees.moves == ["abort"]
    assert [c.metric for c in analyses[0].verdict.failed] == ["agreement"]
    slower = Shadowed(np.random.default_rng(seed), first=0, fault={"median_ms": 20.0})
    outcome, analyses, _ = run_shadow(slower, shadow())
    assert not outcome.promoted and slower.moves == ["abort"]
    assert "latency_p99_ratio" in [c.metric for c in analyses[0].verdict.failed]


@pytest.mark.parametrize("seed", SEEDS)
def test_a_regressors_shadow_is_judged_by_its_mean_difference(seed: int) -> None:
    close = Shadowed(np.random.default_rng(seed), first=0, diff=0.5)
    outcome, analyses, _ = run_shadow(close, shadow(), agreement=None, max_mean_abs_diff=1.0)
    assert outcome.promoted, outcome.reason
    assert {c.metric for c in analyses[0].verdict.checks} >= {"mean_abs_diff"}
    assert "agreement" not in {c.metric for c in analyses[0].verdict.checks}
    far = Shadowed(np.random.default_rng(seed), first=0, diff=2.0)
    outcome, analyses, _ = run_shadow(far, shadow(), agreement=None, max_mean_abs_diff=1.0)
    assert not outcome.promoted
    assert [c.metric for c in analyses[0].verdict.failed] == ["mean_abs_diff"]


def test_a_shadow_with_too_few_copies_runs_again_until_its_timeout() -> None:
    # 1 % of 10 requests/s: 60 copies a duration, under min_requests; the baseline has plenty.
    env = Shadowed(np.random.default_rng(3), first=0, sample=0.01)
    outcome, analyses, clock = run_shadow(env, shadow(sample=0.01, timeout=2400))
    assert {a.verdict.outcome for a in analyses} == {"inconclusive"} and len(analyses) == 4
    assert not outcome.promoted and env.moves == ["abort"] and clock.now <= 2400
    assert outcome.reason.startswith("timeout 2400 s reached with shadow (1% of requests copied)")


def test_an_analysis_gives_mlflow_each_computed_value_and_every_threshold() -> None:
    # 0.6 copies a duration: none arrive, so the shadow's own values cannot be computed.
    env = Shadowed(np.random.default_rng(4), first=0, sample=0.0001)
    _, analyses, _ = run_shadow(env, shadow(sample=0.0001, timeout=600))
    metrics = analyses[0].metrics()
    checks = analyses[0].verdict.checks
    assert {f"{c.metric}.threshold" for c in checks} <= set(metrics)
    assert metrics["agreement.threshold"] == 0.95 and metrics["step"] == 1
    missing = {c.metric for c in checks if c.value is None}
    assert {"agreement", "success_rate"} <= missing and not missing & set(metrics)
    assert all(np.isfinite(list(metrics.values())))


def test_an_analysis_counts_what_each_side_answered() -> None:
    env = Shadowed(np.random.default_rng(5), first=0, sample=0.25)  # 10 requests/s, 600 s
    _, analyses, _ = run_shadow(env, shadow(sample=0.25))
    metrics = analyses[0].metrics()
    assert (metrics["requests"], metrics["baseline_requests"]) == (1500, 6000)
    assert "1500 requests to the new version, 6000 to the baseline" in analyses[0].to_markdown("x")


def test_a_bake_of_few_scrapes_is_warned_about() -> None:
    from modelyard.monitor.drift import duration_seconds
    from modelyard.rollout import bake_warning

    assert bake_warning(300, 15.0) is None and bake_warning(10, None) is None
    warned = bake_warning(30, 15.0)
    assert warned is not None and "every 15 s" in warned and "lengthen the bake" in warned
    assert [duration_seconds(t) for t in ("15s", "1m30s", "500ms", "2h", "15", "1x")] == [
        15,
        90,
        0.5,
        7200,
        None,
        None,
    ]


class _Recording(Prometheus):
    """Answers every instant query with nothing, noting when it was asked to evaluate it."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9")
        self.instants: list[float | None] = []

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        self.instants.append(at)
        return []


def test_a_slots_window_is_read_at_one_instant() -> None:
    """Each series of a window is asked for at the same evaluation time: a scrape between two
    queries must not shift one counter's window (agreed rows) against another's (compared)."""
    prometheus = _Recording()
    window(prometheus, 'slot="green"', 10, 1_796_000_000.5)
    assert len(prometheus.instants) >= 5 and set(prometheus.instants) == {1_796_000_000.5}


def test_both_sides_of_an_analysis_are_judged_at_one_instant() -> None:
    seen: list[tuple[str, float]] = []

    class Noted(Environment):
        def canary(self, seconds: int, at: float) -> SlotWindow:
            seen.append(("canary", at))
            return super().canary(seconds, at)

        def baseline(self, seconds: int, at: float) -> SlotWindow:
            seen.append(("baseline", at))
            return super().baseline(seconds, at)

    outcome, _ = run(Noted(np.random.default_rng(1), first=5), plan(steps=[5, 50, 100]))
    assert outcome.promoted, outcome.reason
    # The baseline is read before the canary at 5 % and 50 %; at 100 % it answers nothing.
    assert [kind for kind, _ in seen] == ["baseline", "canary"] * 2 + ["canary"], seen
    assert seen[0][1] == seen[1][1] and seen[2][1] == seen[3][1], seen
