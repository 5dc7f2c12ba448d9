"""Judging a canary against the baseline it runs beside, over one bake window.

The verdict is `passed`, `failed` or `inconclusive`. What the systems that do this taught:
- a window with too few requests is inconclusive, never a pass (a minimum-request guard that
  passes quietly lets a version through on no evidence);
- a value that cannot be computed (no series, NaN) is never taken for a good one (Kayenta once
  read NaN as 0 and passed);
- the success rate is judged absolutely, not only against the baseline's, so a baseline that
  fails too does not excuse the canary; requests the canary refuses (4xx) beyond the share the
  baseline refuses count against it;
- a p99 read from a small window is close to its one slowest request: identical versions over
  60 requests read a p99 above 1.5x the baseline's in half of the windows. A p99 over its
  limit fails only when more requests exceed the limit than a true p99 at the limit would put
  there by chance (one-sided binomial test at 99 %); a markedly slower version still fails on
  60 requests. PSI over ten bins is as noisy (about 0.2 between identical versions over 60
  against 140 predictions): a PSI over its threshold fails only when a chi-square test of the
  two windows' bin counts puts the difference beyond chance at 99 %.
- a p99 also rises and falls with what else the host runs: on a busy host a version several
  times heavier can read within 1.5x of its baseline's p99 (a 1000-tree forest did beside a CI
  run's other tests). Where that matters, `cost_ratio` compares what a row costs each model on
  its server's own CPU clock, which other processes do not inflate.

Everything here is arithmetic on counts; `window` reads them from Prometheus.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from modelyard.bins import psi
from modelyard.monitor.drift import Prometheus

Outcome = Literal["passed", "failed", "inconclusive"]
# The routes that answer predictions: what the canary is judged on (not health checks).
PREDICTION_ROUTES = "/invocations|/v2/models/.*/infer"


@dataclass(frozen=True)
class SlotWindow:
    """What one slot did during a window."""

    requests: float  # prediction requests answered
    errors: float  # of them, server errors (5xx)
    latency: Mapping[float, float]  # cumulative request counts by upper bound in s (+inf too)
    predictions: Mapping[str, float] = field(default_factory=dict)  # count per prediction bin
    refused: float = 0.0  # of them, client errors (4xx): requests the version would not take
    # A shadow's comparison with the serving version on the copies (modelyard.serve.shadow).
    compared: float = 0.0  # rows both predicted
    agreed: float = 0.0  # of them, rows with the same class
    abs_diff: float = 0.0  # sum of |shadow - serving| over them
    # CPU seconds a row costs its model, as its server measured at start (serve.runtime.row_cost);
    # None: not exported.
    row_cost: float | None = None


@dataclass(frozen=True)
class Thresholds:
    success_rate: float  # the canary's share of answers without a server error, at least
    latency_budget_ms: float  # the canary's p99, at most
    latency_ratio: float  # the canary's p99, at most this times the baseline's
    psi: float  # PSI of the canary's predictions against the baseline's, at most
    min_requests: int  # fewer prediction requests in the window: nothing is judged
    # A shadow's: the share of compared rows of the same class (classifiers), at least; the
    # mean |shadow - serving| (regressors), at most. None: not judged.
    agreement: float | None = None
    max_mean_abs_diff: float | None = None
    cost_ratio: float | None = None  # the canary's row cost, at most this times the baseline's


@dataclass(frozen=True)
class Check:
    metric: str
    value: float | None  # None: it could not be computed
    threshold: float
    passed: bool | None  # None: not enough to judge
    note: str = ""  # why a value beyond its threshold is not held against the version

    def describe(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.4g}"
        verdict = {True: "ok", False: "FAILED", None: "inconclusive"}[self.passed]
        why = f" ({self.note})" if self.note else ""
        return f"{self.metric} {shown} (threshold {self.threshold:g}): {verdict}{why}"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    checks: tuple[Check, ...]
    requests: float = 0.0  # prediction requests the new version answered in the window
    baseline_requests: float | None = None  # and the baseline (None: it had no share)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def describe(self) -> str:
        return f"{self.outcome}: " + "; ".join(c.describe() for c in self.checks)


def judge(canary: SlotWindow, baseline: SlotWindow | None, limits: Thresholds) -> Verdict:
    """The canary's verdict for one window. `baseline` is None when no traffic is left on it
    (the last step): then only the absolute checks apply."""
    p99 = _p99_ms(canary)
    checks = [
        _at_least("success_rate", _success_rate(canary, baseline), limits.success_rate),
        _tail("latency_p99_ms", p99, limits.latency_budget_ms, canary, limits.latency_budget_ms),
    ]
    if baseline is not None:
        base = _p99_ms(baseline)
        ratio, limit_ms = _ratio(p99, base), None if base is None else base * limits.latency_ratio
        checks += [
            _tail("latency_p99_ratio", ratio, limits.latency_ratio, canary, limit_ms),
            _shift("prediction_psi", _prediction_psi(canary, baseline), limits.psi, canary,
                   baseline),
        ]  # fmt: skip
        if limits.cost_ratio is not None:  # a measurement, not a sample: no chance to allow for
            cost = _ratio(canary.row_cost, baseline.row_cost)
            checks.append(_at_most("model_cost_ratio", cost, limits.cost_ratio))
    checks += _shadow_checks(canary, limits)
    too_few = [w for w in (canary, baseline) if w is not None and w.requests < limits.min_requests]
    compares = limits.agreement is not None or limits.max_mean_abs_diff is not None
    if compares and canary.compared < limits.min_requests:  # rows compared, for a shadow
        too_few.append(canary)
    if too_few:  # the values are kept for the record, the verdict waits for more traffic
        checks = [Check(c.metric, c.value, c.threshold, None) for c in checks]
    return Verdict(_outcome(checks), tuple(checks), canary.requests,
                   None if baseline is None else baseline.requests)  # fmt: skip


def _shadow_checks(shadow: SlotWindow, limits: Thresholds) -> list[Check]:
    """How closely a shadow followed the serving version on the same requests."""
    checks = []
    if limits.agreement is not None:
        agreement = shadow.agreed / shadow.compared if shadow.compared > 0 else None
        checks.append(_at_least("agreement", agreement, limits.agreement))
    if limits.max_mean_abs_diff is not None:
        mean = shadow.abs_diff / shadow.compared if shadow.compared > 0 else None
        checks.append(_at_most("mean_abs_diff", mean, limits.max_mean_abs_diff))
    return checks


def window(prometheus: Prometheus, selector: str, seconds: int, at: float) -> SlotWindow:
    """What the slot whose series match `selector` (PromQL label matchers, e.g.
    'model="ads",environment="production",slot="green"') did in the `seconds` before `at` (Unix
    seconds). Every query is evaluated at that one instant: asked each at its own, a scrape
    landing between two of them moves one series' window and not the other's (the likely cause
    of a shadow that read agreement 0.88 between two identical versions in CI)."""
    routes = f'{selector},route=~"{PREDICTION_ROUTES}"'
    # One query by status: all requests, server errors (5xx) and refusals (4xx) from it.
    by_status = prometheus.values(
        _grown(f"modelyard_requests_total{{{routes}}}", seconds, "status"), "status", at=at
    )
    latency = prometheus.values(
        _grown(f"modelyard_request_duration_seconds_bucket{{{routes}}}", seconds, "le"), "le", at=at
    )
    predictions = prometheus.values(
        _grown(f"modelyard_prediction_bin_total{{{selector}}}", seconds, "bin"), "bin", at=at
    )
    shadow = {
        name: prometheus.values(
            _grown(f"modelyard_shadow_{name}_total{{{selector}}}", seconds), at=at
        )
        for name in ("compared_rows", "agreed_rows", "abs_diff")
    }  # only a shadow's slot has these series; the others read 0
    row_cost = prometheus.values(f"min(modelyard_model_row_cpu_seconds{{{selector}}})", at=at)
    return SlotWindow(
        requests=sum(by_status.values()),
        errors=sum(n for (status,), n in by_status.items() if status.startswith("5")),
        refused=sum(n for (status,), n in by_status.items() if status.startswith("4")),
        latency={float(le): count for (le,), count in latency.items()},
        predictions={label: count for (label,), count in predictions.items()},
        compared=shadow["compared_rows"].get((), 0.0),
        agreed=shadow["agreed_rows"].get((), 0.0),
        abs_diff=shadow["abs_diff"].get((), 0.0),
        row_cost=row_cost.get(()),
    )


def _grown(series: str, seconds: int, by: str = "") -> str:
    """PromQL for how much counters grew in the last `seconds`, summed (by a label).

    Not `increase()`: a series born inside the window (a slot's first 5xx) would lose what it
    counted before its first scrape. A series the window's start does not know counts whole,
    and so does one that went back (a restarted server counts from zero)."""
    grown = f"(({series} - {series} offset {seconds}s) >= 0) or {series}"
    return f"sum by ({by}) ({grown})" if by else f"sum({grown})"


def quantile(q: float, cumulative: Mapping[float, float]) -> float | None:
    """The q-quantile of a histogram given as cumulative counts by upper bound, interpolated
    within its bucket as Prometheus's histogram_quantile does; None without observations."""
    bounds = sorted(cumulative)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = cumulative[bounds[-1]]
    if not total > 0:  # also NaN
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):  # beyond the last finite bucket: its bound is all we know
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return None


def _success_rate(window: SlotWindow, baseline: SlotWindow | None) -> float | None:
    """The share of requests answered without a server error, less the share it refused
    beyond what the baseline refuses: a version that turns away values the serving one takes
    (a column it now requires, a category it lost) fails its clients as surely as a 5xx,
    while requests both refuse (no token, a malformed body) are the clients' own errors."""
    if not window.requests > 0:
        return None
    rate = (window.requests - window.errors) / window.requests
    if baseline is None or not baseline.requests > 0:
        return rate
    return rate - _excess_refusals(window, baseline)


# One-sided 99 %: a refusal share above the baseline's by less is taken for chance (a few bad
# requests that happened to land on the canary's small share).
_REFUSAL_Z = 2.33


def _excess_refusals(canary: SlotWindow, baseline: SlotWindow) -> float:
    """How far the canary's share of refused requests exceeds the baseline's, beyond what a
    two-proportion test puts down to chance at 99 %; 0 when it does not."""
    ours, theirs = canary.refused / canary.requests, baseline.refused / baseline.requests
    pooled = (canary.refused + baseline.refused) / (canary.requests + baseline.requests)
    noise = _REFUSAL_Z * math.sqrt(
        pooled * (1 - pooled) * (1 / canary.requests + 1 / baseline.requests)
    )
    return max(0.0, ours - theirs - noise)


# The share of requests a p99 leaves above itself; and the chance below which what a check saw
# is taken for the version's doing rather than a few unlucky requests (one-sided 99 %).
_TAIL, _CHANCE = 0.01, 0.01


def _tail(
    metric: str, value: float | None, threshold: float, window: SlotWindow, limit_ms: float | None
) -> Check:
    """A p99 check (`value` against `threshold`) that fails only when the requests slower than
    `limit_ms` are too many for a true p99 at that limit."""
    check = _at_most(metric, value, threshold)
    if check.passed is not False or limit_ms is None:
        return check
    total = window.latency.get(math.inf, 0.0)
    slower = total - _count_within(window.latency, limit_ms / 1000)
    chance = _binomial_tail(round(slower), round(total), _TAIL)
    return _unless_chance(
        check, chance, f"{slower:.0f} of {total:.0f} requests over {limit_ms:.3g} ms"
    )


def _shift(
    metric: str, value: float | None, threshold: float, canary: SlotWindow, baseline: SlotWindow
) -> Check:
    """A PSI check that fails only when the two windows' predictions differ beyond chance."""
    check = _at_most(metric, value, threshold)
    if check.passed is not False:
        return check
    chance = _homogeneity(canary.predictions, baseline.predictions)
    counted = f"{sum(canary.predictions.values()):.0f} predictions against "
    return _unless_chance(check, chance, counted + f"{sum(baseline.predictions.values()):.0f}")


def _unless_chance(check: Check, chance: float, evidence: str) -> Check:
    """A failed check stands when what it saw is unlikely by chance; else it passes, saying so."""
    if chance < _CHANCE:
        return check
    return replace(check, passed=True, note=f"{evidence}: within chance, p={chance:.2g}")


def _homogeneity(ours: Mapping[str, float], theirs: Mapping[str, float]) -> float:
    """The chance that two samples of one distribution differ in their bin counts as much as
    these do (Pearson's chi-square test of homogeneity)."""
    labels = [b for b in ours.keys() | theirs.keys() if ours.get(b, 0) + theirs.get(b, 0) > 0]
    n, m = sum(ours.get(b, 0.0) for b in labels), sum(theirs.get(b, 0.0) for b in labels)
    if len(labels) < 2 or not n > 0 or not m > 0:
        return 1.0
    statistic = 0.0
    for label in labels:
        a, b = ours.get(label, 0.0), theirs.get(label, 0.0)
        expected = (a + b) / (n + m)
        statistic += (a - n * expected) ** 2 / (n * expected)
        statistic += (b - m * expected) ** 2 / (m * expected)
    return _chi_square_tail(statistic, len(labels) - 1)


def _chi_square_tail(x: float, df: int) -> float:
    """P(X >= x) for a chi-square with `df` degrees of freedom (Wilson-Hilferty: within a few
    thousandths of the exact tail at the 1 % level from df 2 up)."""
    if not x > 0:
        return 1.0
    spread = 2 / (9 * df)
    z = ((x / df) ** (1 / 3) - (1 - spread)) / math.sqrt(spread)
    return 0.5 * math.erfc(z / math.sqrt(2))


def _count_within(cumulative: Mapping[float, float], bound: float) -> float:
    """Observations at most `bound`, interpolated within its bucket (as `quantile` does)."""
    lower, below = 0.0, 0.0
    for upper in sorted(cumulative):
        count = cumulative[upper]
        if bound < upper:
            if math.isinf(upper):  # beyond the last finite bucket: none known to be within
                return below
            return below + (count - below) * (bound - lower) / (upper - lower)
        lower, below = upper, count
    return below


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space from k up while it matters."""
    if k <= n * p:  # at or below the expected count: nothing to see
        return 1.0
    if k > n:
        return 0.0
    log_term = (
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        + k * math.log(p) + (n - k) * math.log1p(-p)
    )  # fmt: skip
    term, total = math.exp(log_term), 0.0
    for i in range(k, n + 1):  # past the mode each term is smaller than the one before
        total += term
        if term < total * 1e-12:
            break
        term *= (n - i) / (i + 1) * p / (1 - p)
    return min(1.0, total)


def _p99_ms(window: SlotWindow) -> float | None:
    seconds = quantile(0.99, window.latency)
    return None if seconds is None else seconds * 1000


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or not base > 0:
        return None
    return value / base


def _prediction_psi(canary: SlotWindow, baseline: SlotWindow) -> float | None:
    reference_total = sum(baseline.predictions.values())
    if not reference_total > 0 or not sum(canary.predictions.values()) > 0:
        return None
    shares = {label: count / reference_total for label, count in baseline.predictions.items()}
    # A bin only the canary fills counts too: PSI over the union of both sides' bins.
    shares |= {label: 0.0 for label in canary.predictions if label not in shares}
    return psi(canary.predictions, shares)


def _at_least(metric: str, value: float | None, threshold: float) -> Check:
    return _check(metric, value, threshold, lambda v: v >= threshold)


def _at_most(metric: str, value: float | None, threshold: float) -> Check:
    return _check(metric, value, threshold, lambda v: v <= threshold)


def _check(
    metric: str, value: float | None, threshold: float, holds: Callable[[float], bool]
) -> Check:
    if value is None or not math.isfinite(value):  # never read as a good value
        return Check(metric, value, threshold, None)
    return Check(metric, value, threshold, holds(value))


def _outcome(checks: list[Check]) -> Outcome:
    if any(c.passed is False for c in checks):
        return "failed"
    if any(c.passed is None for c in checks):
        return "inconclusive"
    return "passed"
