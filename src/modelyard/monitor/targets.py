"""Prometheus file-based discovery of deployed model services, written by every deploy.

One file per model and environment (`<workspace>/stack/prometheus/targets/<model>-<env>.json`)
lists every running slot of every host that serves it, each scraped on its own port with the
labels dashboards, alerts and a canary's analysis group by (`version` and `slot` tell a canary
from its baseline on one host). Prometheus re-reads the folder on its own, so a new slot is
scraped and a stopped one dropped without a restart or reload. Each file is replaced whole
(write, then rename): Prometheus never reads half of one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from modelyard import servetls
from modelyard.atomic import replace_file
from modelyard.config import Settings
from modelyard.stack import prometheus_targets_dir, refresh_services_scrape


@dataclass(frozen=True)
class SlotTarget:
    host: str
    slot: str  # blue | green
    address: str  # host:port of the slot's /metrics
    version: str


def slot_targets(
    reported: Mapping[str, Mapping[str, str]], live_version: str, canary_version: str = ""
) -> list[SlotTarget]:
    """The running slots, from what the role reported per host (`PlaybookResult.slots`): the
    live one with `live_version`, and the canary's with `canary_version` when one runs."""
    found = []
    for host, slots in sorted(reported.items()):
        for role, version in (("live", live_version), ("canary", canary_version)):
            slot = slots.get(role, "")
            if slot and version:
                found.append(SlotTarget(host, slot, slots[slot], version))
    return found


def write_targets(
    settings: Settings, model: str, environment: str, targets: list[SlotTarget]
) -> Path:
    # Slots speak https with serving TLS on: said per target, as other services may not yet.
    scheme = {"__scheme__": "https"} if servetls.enabled(settings) else {}
    groups = [
        {
            "targets": [t.address],
            "labels": {
                "model": model,
                "environment": environment,
                "version": t.version,
                "host": t.host,
                "slot": t.slot,
                **scheme,
            },
        }
        for t in targets
    ]
    folder = prometheus_targets_dir(settings)
    path = folder / f"{model}-{environment}.json"
    replace_file(path, (json.dumps(groups, indent=2) + "\n").encode())  # no half file is read
    refresh_services_scrape(settings, progress=lambda _: None)
    return path
