"""One-row prediction must fit the spec's latency budget (in-process, the model alone, on one
thread as each serving worker runs: a thread pool's hand-offs cost a one-row prediction more than
it saves, and on a busy machine they make the figure noise: HistGradientBoosting's OpenMP
threads took a p95 of 264 ms a row on this busy 2-core machine, 16 ms on one thread).

The verdict is on the thread's CPU time, not the wall clock: the work a prediction is made of
is the model's, the time spent waiting for a core is the machine's. A fast model must not fail
because the CI runner was busy (a p95 of 54 ms wall for a 6 ms model, with four test workers on
two cores), and a slow one fails on any machine. The wall-clock figure is reported beside it."""

import time

import numpy as np
from threadpoolctl import threadpool_limits

from modelyard.checks.model_tests_plugin import Candidate


def test_single_row_latency(candidate: Candidate) -> None:
    budget = candidate.spec.behaviour.latency
    rows = candidate.features
    for i in range(5):  # warm caches and lazy imports before measuring
        candidate.predict(rows.iloc[[i]])
    cpu, wall = [], []
    with threadpool_limits(limits=1):
        for i in range(budget.calls):
            row = rows.iloc[[i % len(rows)]]
            started, started_cpu = time.perf_counter(), time.thread_time()
            candidate.predict(row)
            cpu.append((time.thread_time() - started_cpu) * 1000)
            wall.append((time.perf_counter() - started) * 1000)
    observed = float(np.percentile(cpu, budget.percentile))
    assert observed <= budget.budget_ms, (
        f"p{budget.percentile:g} one-row latency {observed:.2f} ms of CPU time "
        f"({np.percentile(wall, budget.percentile):.2f} ms wall) exceeds the "
        f"{budget.budget_ms} ms budget"
    )
