"""Ports handed to servers: never the same one twice, never one an outgoing connection can take."""

from __future__ import annotations

import multiprocessing

import pytest

from modelyard import ports
from modelyard.ports import _ephemeral_start, free_port, free_ports


@pytest.fixture(autouse=True)
def _table_of_their_own(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests draw 1,200 ports: in the machine's table they would cost every later draw
    for five minutes (each reads and writes the whole table) and narrow the other tests' picks."""
    monkeypatch.setattr(ports, "_TABLE", tmp_path / "ports.json")


def _draw(count: int) -> list[int]:
    return [free_port() for _ in range(count)]


def test_processes_drawing_at_once_never_share_a_port() -> None:
    # Forked, not spawned: the children keep this test's table (and skip a second of imports
    # each); what they share is that file, which a fork does not copy.
    with multiprocessing.get_context("fork").Pool(4) as pool:
        drawn = [port for batch in pool.map(_draw, [150] * 4) for port in batch]
    assert len(set(drawn)) == len(drawn) == 600  # unreserved: a collision, p > 0.999
    assert all(1024 < port < _ephemeral_start() for port in drawn)


def test_a_block_is_consecutive_and_not_handed_out_again() -> None:
    first = free_ports(3)
    block = set(range(first, first + 3))
    later = {start + offset for start in [free_ports(3) for _ in range(200)] for offset in range(3)}
    assert block.isdisjoint(later)
