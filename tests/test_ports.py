"""Ports handed to servers: never the same one twice, never one an outgoing connection can take."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from modelyard import ports
from modelyard.ports import _ephemeral_start, free_port, free_ports


@pytest.fixture(autouse=True)
def _table_of_their_own(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests draw 1,200 ports: in the machine's table they would cost every later draw
    for five minutes (each reads and writes the whole table) and narrow the other tests' picks."""
    monkeypatch.setattr(ports, "_TABLE", tmp_path / "ports.json")


def _draw(table: str, count: int) -> list[int]:
    ports._TABLE = Path(table)  # this child's own module: the test's table, not the machine's
    return [free_port() for _ in range(count)]


def test_processes_drawing_at_once_never_share_a_port(tmp_path) -> None:
    # From a fork server, not forked from this process: a fork of a process with threads (an
    # xdist worker's) can inherit a lock some thread held, and hung a child in CI (ci27). The
    # server imports this module once, so the children skip a second of imports each.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["modelyard.ports", __name__])
    with context.Pool(4) as pool:
        batches = pool.starmap(_draw, [(str(tmp_path / "ports.json"), 150)] * 4)
    drawn = [port for batch in batches for port in batch]
    assert len(set(drawn)) == len(drawn) == 600  # unreserved: a collision, p > 0.999
    assert all(1024 < port < _ephemeral_start() for port in drawn)


def test_a_block_is_consecutive_and_not_handed_out_again() -> None:
    first = free_ports(3)
    block = set(range(first, first + 3))
    later = {start + offset for start in [free_ports(3) for _ in range(200)] for offset in range(3)}
    assert block.isdisjoint(later)
