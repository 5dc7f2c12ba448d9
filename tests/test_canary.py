"""The canary judge on generated traffic: windows built from sampled latencies, errors and
predictions, binned the way the serving app's metrics bin them."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binom, chi2

from modelyard import stack
from modelyard.atomic import replace_file
from modelyard.config import Settings
from modelyard.monitor import canary
from modelyard.monitor.canary import SlotWindow, Thresholds, judge, quantile, window
from modelyard.monitor.drift import Prometheus
from modelyard.serve.metrics import LATENCY_BUCKETS
from tests.conftest import free_port
from tests.serving import TOKEN, Server, build_example
from tests.stacks import wait_until

BOUNDS = (*LATENCY_BUCKETS, math.inf)
LIMITS = Thresholds(
    success_rate=0.99, latency_budget_ms=200, latency_ratio=1.5, psi=0.2, min_requests=100
)
SEEDS = range(12)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def generated(
    rng: np.random.Generator,
    requests: int,
    median_ms: float = 5.0,
    error_rate: float = 0.0,
    shift: float = 0.0,
    refusal_rate: float = 0.0,
) -> SlotWindow:
    """A slot's window: lognormal latencies around `median_ms`, a share of 5xx answers, and
    classifier scores (beta-distributed) moved by `shift`, in ten equal bins."""
    seconds = rng.lognormal(math.log(median_ms / 1000), 0.5, requests)
    scores = np.clip(rng.beta(2, 5, requests) + shift, 0, 1 - 1e-9)
    bins = np.bincount((scores * 10).astype(int), minlength=10)
    return SlotWindow(
        requests=float(requests),
        errors=float(rng.binomial(requests, error_rate)),
        refused=float(rng.binomial(requests, refusal_rate)),
        latency={b: float(np.sum(seconds <= b)) for b in BOUNDS},
        predictions={f"bin{i}": float(n) for i, n in enumerate(bins)},
    )


def failed(canary: SlotWindow, baseline: SlotWindow | None) -> list[str]:
    verdict = judge(canary, baseline, LIMITS)
    return [c.metric for c in verdict.failed]


@pytest.mark.parametrize("seed", SEEDS)
def test_a_canary_like_its_baseline_passes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    verdict = judge(generated(rng, 300), generated(rng, 5700), LIMITS)
    assert verdict.outcome == "passed", verdict.describe()


@pytest.mark.parametrize("seed", SEEDS)
def test_each_bad_canary_is_caught_by_the_check_for_its_fault(seed: int) -> None:
    rng = np.random.default_rng(seed)
    baseline = generated(rng, 5700)
    assert failed(generated(rng, 300, error_rate=0.08), baseline) == ["success_rate"]
    assert failed(generated(rng, 300, median_ms=20), baseline) == ["latency_p99_ratio"]
    assert failed(generated(rng, 300, shift=0.3), baseline) == ["prediction_psi"]
    # Slower than the budget although the baseline is as slow: the budget still holds.
    slow_baseline = generated(rng, 5700, median_ms=100)
    assert failed(generated(rng, 300, median_ms=100), slow_baseline) == ["latency_p99_ms"]


def contended(rng: np.random.Generator, requests: int, median_ms: float = 5.0) -> SlotWindow:
    """A slot's window on a busy machine: 3 % of its requests 2-6x slower than the rest."""
    seconds = rng.lognormal(math.log(median_ms / 1000), 0.5, requests)
    slowed = rng.random(requests) < 0.03
    seconds[slowed] *= rng.uniform(2, 6, int(slowed.sum()))
    window = generated(rng, requests, median_ms)
    return replace(window, latency={b: float(np.sum(seconds <= b)) for b in BOUNDS})


def test_small_windows_of_identical_versions_pass_although_their_p99_and_psi_wander() -> None:
    """60 canary requests beside 140: a p99 is close to the slowest request, and PSI over ten
    bins reads about 0.2 on noise alone. A point reading against the thresholds failed half of
    these windows; judged with their sample sizes, false alarms stay near the 1 % chance."""
    limits = replace(LIMITS, min_requests=20)
    verdicts = [judge(contended(rng, 60), contended(rng, 140), limits)
                for rng in map(np.random.default_rng, range(300))]  # fmt: skip
    over = [c for v in verdicts for c in v.checks
            if c.metric != "success_rate" and c.value is not None and c.value > c.threshold]  # fmt: skip
    assert len(over) > 100  # the point readings alone would fail them
    assert all(c.passed is False or "within chance" in c.note for c in over)
    assert sum(v.outcome == "failed" for v in verdicts) <= 6, Counter(
        c.metric for v in verdicts for c in v.failed
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_a_markedly_worse_version_fails_even_a_small_window(seed: int) -> None:
    rng = np.random.default_rng(seed)
    limits = replace(LIMITS, min_requests=20)
    baseline = generated(rng, 140)
    slower = judge(generated(rng, 60, median_ms=20), baseline, limits)
    assert [c.metric for c in slower.failed] == ["latency_p99_ratio"], slower.describe()
    shifted = judge(generated(rng, 60, shift=0.3), baseline, limits)
    assert [c.metric for c in shifted.failed] == ["prediction_psi"], shifted.describe()


def test_the_binomial_and_chi_square_tails_match_their_exact_values() -> None:
    for n, k in ((60, 2), (60, 4), (300, 9), (5000, 70), (10, 11)):
        exact = float(binom.sf(k - 1, n, 0.01))
        assert canary._binomial_tail(k, n, 0.01) == pytest.approx(exact, rel=1e-9, abs=1e-300)
    for df in range(2, 30):
        critical = float(chi2.isf(0.01, df))  # where the 1 % decision is made
        assert canary._chi_square_tail(critical, df) == pytest.approx(0.01, abs=0.0015)


@pytest.mark.parametrize("seed", SEEDS)
def test_refusing_what_the_baseline_takes_fails_and_shared_refusals_do_not(seed: int) -> None:
    rng = np.random.default_rng(seed)
    baseline = generated(rng, 2000, refusal_rate=0.02)  # clients' own mistakes, on both sides
    refusing = generated(rng, 300, refusal_rate=0.08)  # e.g. a column it now requires
    assert failed(refusing, baseline) == ["success_rate"]
    assert failed(generated(rng, 300, refusal_rate=0.02), baseline) == []
    few = replace(generated(rng, 40), refused=2.0)  # 5 % of a small share: within chance
    assert failed(few, baseline) == []
    # At 100 % nothing is left to compare with: only server errors count.
    assert judge(refusing, None, LIMITS).outcome == "passed"


def test_too_few_requests_is_inconclusive_whatever_they_show() -> None:
    rng = np.random.default_rng(0)
    few = generated(rng, 40, error_rate=0.5, median_ms=50, shift=0.4)
    verdict = judge(few, generated(rng, 5000), LIMITS)
    assert verdict.outcome == "inconclusive"
    assert all(c.passed is None and c.value is not None for c in verdict.checks)  # kept
    # A baseline with too little traffic cannot vouch for the comparison either.
    verdict = judge(generated(rng, 5000), generated(rng, 40), LIMITS)
    assert verdict.outcome == "inconclusive"


def test_missing_or_nan_values_never_pass() -> None:
    empty = SlotWindow(requests=0.0, errors=0.0, latency={})
    nan = SlotWindow(requests=math.nan, errors=math.nan, latency={b: math.nan for b in BOUNDS})
    rng = np.random.default_rng(1)
    for broken in (empty, nan):
        verdict = judge(
            broken, generated(rng, 5000), Thresholds(0.99, 200, 1.5, 0.2, min_requests=0)
        )
        assert verdict.outcome == "inconclusive", verdict.describe()
        assert not any(c.passed for c in verdict.checks)
    no_predictions = SlotWindow(requests=500.0, errors=0.0, latency=generated(rng, 500).latency)
    verdict = judge(no_predictions, generated(rng, 5000), LIMITS)
    assert [c.metric for c in verdict.checks if c.passed is None] == ["prediction_psi"]
    assert verdict.outcome == "inconclusive"


@pytest.mark.parametrize("seed", SEEDS)
def test_a_model_that_costs_more_per_row_fails_its_cost_ratio_however_busy_the_host(
    seed: int,
) -> None:
    """On a busy host both slots' p99 grow: a canary whose model costs 20x per row reads
    within 1.5x of its baseline's p99, and only the row cost, measured on each server's own CPU
    clock, shows it. The check is there only when asked for, and never passes without both
    readings."""
    rng = np.random.default_rng(seed)
    busy = replace(contended(rng, 5700, median_ms=20), row_cost=1e-6)
    heavier = replace(contended(rng, 300, median_ms=21), row_cost=2e-5)
    limits = replace(LIMITS, cost_ratio=3.0)
    verdict = judge(heavier, busy, limits)
    assert [c.metric for c in verdict.failed] == ["model_cost_ratio"], verdict.describe()
    assert verdict.checks[-1].value == pytest.approx(20)
    assert judge(replace(heavier, row_cost=1.4e-6), busy, limits).outcome == "passed"
    assert "model_cost_ratio" not in [c.metric for c in judge(heavier, busy, LIMITS).checks]
    unread = judge(replace(heavier, row_cost=None), busy, limits)  # a server without the gauge
    assert unread.outcome == "inconclusive" and unread.checks[-1].passed is None


def test_without_a_baseline_only_the_absolute_checks_apply() -> None:
    rng = np.random.default_rng(2)
    verdict = judge(generated(rng, 1000), None, LIMITS)
    assert [c.metric for c in verdict.checks] == ["success_rate", "latency_p99_ms"]
    assert verdict.outcome == "passed"
    assert judge(generated(rng, 1000, error_rate=0.1), None, LIMITS).outcome == "failed"


def test_quantile_interpolates_within_its_bucket_like_prometheus() -> None:
    # 100 observations: 50 up to 0.1, 40 more up to 0.5, 10 beyond 1.
    counts = {0.1: 50.0, 0.5: 90.0, 1.0: 90.0, math.inf: 100.0}
    assert quantile(0.5, counts) == pytest.approx(0.1)
    assert quantile(0.7, counts) == pytest.approx(0.1 + 0.4 * 20 / 40)
    assert quantile(0.99, counts) == 1.0  # in the +Inf bucket: the highest finite bound
    assert quantile(0.99, {0.1: 0.0, math.inf: 0.0}) is None
    assert quantile(0.99, {0.1: 5.0}) is None  # no +Inf bucket: not a histogram


@given(
    st.lists(st.floats(1e-5, 2.0), min_size=1, max_size=300),
    st.floats(0.01, 0.999),
)
def test_quantile_lies_in_the_bucket_of_the_true_one(samples: list[float], q: float) -> None:
    values = np.array(samples)
    counts = {b: float(np.sum(values <= b)) for b in BOUNDS}
    found = quantile(q, counts)
    assert found is not None
    rank = math.ceil(q * len(values))  # the observation at that rank, as Prometheus counts
    true = float(np.sort(values)[max(rank, 1) - 1])
    upper = next(b for b in BOUNDS if true <= b)
    lower = max([0.0, *(b for b in BOUNDS if b < upper)])
    if math.isinf(upper):
        assert found == lower
    else:
        assert lower <= found <= upper


@pytest.mark.integration
def test_a_window_read_from_prometheus_counts_every_request_of_each_slot(tmp_path: Path) -> None:
    """Two real servers of one bundle as the slots, scraped by the stack's real Prometheus
    every second. The canary starts after the baseline was scraped, so its series are born
    inside the window: it counts whole all the same."""
    built = build_example("ad_clicks", tmp_path / "ads")
    settings = Settings(workspace=tmp_path / "ws", stack_prometheus_port=free_port(),
                        prometheus_interval=1)  # fmt: skip
    prometheus = Prometheus(f"http://127.0.0.1:{settings.stack_prometheus_port}")
    rows = built.prepared.splits.eval.loc[:, built.spec.feature_names]
    blue = Server(built.bundle.path, built.public_key, workers=1).start()
    servers = [blue]
    stack.up(settings, ["prometheus"], progress=lambda _: None)
    try:
        assert prometheus.scrape_interval() == 1  # read from the configuration it runs
        _scrape(settings, {"blue": blue})
        _predict(blue, rows, requests=150)
        _scraped(prometheus, "blue", requests=150)
        # A window that starts after those: only what came since counts.
        scraped = time.time()
        time.sleep(3)
        _predict(blue, rows, requests=40)
        _scraped(prometheus, "blue", requests=190)
        since = int(time.time() - scraped) - 1  # its start lies between the scrape and the 40
        baseline = _scraped(prometheus, "blue", requests=40, seconds=since)
        green = Server(built.bundle.path, built.public_key, workers=1).start()
        servers.append(green)
        _scrape(settings, {"blue": blue, "green": green})
        _predict(green, rows, requests=40)  # the rows of the baseline's window
        bad = httpx.post(f"{green.url}/invocations", json={"rows": []}, headers=AUTH)
        assert bad.status_code == 400  # the client's error: counted, not held against the slot
        canary = _scraped(prometheus, "green", requests=41)
    finally:
        stack.down(settings, ["prometheus"], progress=lambda _: None)
        for server in servers:
            server.stop()
    for seen, requests, rows_predicted in ((baseline, 40, 80), (canary, 41, 80)):
        assert seen.row_cost is not None and seen.row_cost > 0  # measured by each at its start
        assert seen.errors == 0
        assert seen.latency[math.inf] == requests
        assert sum(seen.predictions.values()) == rows_predicted
    # The same model on both: what is judged here is that real windows can be. p99 of 41
    # requests is their slowest, and one request of a busy machine (12.9 ms beside 1.8 ms, seen
    # with CI running alongside) may exceed a tight ratio; generated windows test the ratio.
    limits = Thresholds(success_rate=0.99, latency_budget_ms=1000, latency_ratio=50,
                        psi=0.25, min_requests=40, cost_ratio=3.0)  # fmt: skip
    verdict = judge(canary, baseline, limits)
    assert verdict.outcome == "passed", verdict.describe()
    # One request more than the baseline's window holds: too few to vouch for the canary.
    assert judge(canary, baseline, replace(limits, min_requests=41)).outcome == "inconclusive"


def _scrape(settings: Settings, slots: dict[str, Server]) -> None:
    groups = [{"targets": [f"127.0.0.1:{server.port}"], "labels": {"slot": slot}}
              for slot, server in slots.items()]  # fmt: skip
    replace_file(stack.prometheus_targets_dir(settings) / "slots.json", json.dumps(groups).encode())


def _predict(server: Server, rows: pd.DataFrame, requests: int) -> None:
    """`requests` predictions of two rows each, the same rows for every server."""
    with httpx.Client(headers=AUTH, timeout=10) as client:
        for i in range(requests):
            records = rows.iloc[[i % len(rows), (i + 1) % len(rows)]].to_json(orient="records")
            body = f'{{"dataframe_records": {records}}}'  # a missing value is null
            answer = client.post(f"{server.url}/invocations", content=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
            assert answer.status_code == 200, answer.text


def _scraped(prometheus: Prometheus, slot: str, requests: int, seconds: int = 300) -> SlotWindow:
    """The slot's last `seconds` once Prometheus has scraped `requests` in them."""

    def seen() -> SlotWindow | None:
        found = window(prometheus, f'slot="{slot}"', seconds, time.time())
        return found if found.requests >= requests else None

    found = wait_until(f"Prometheus to scrape {requests} requests of {slot}", seen, timeout=60)
    assert isinstance(found, SlotWindow) and found.requests == requests, found
    return found
