"""Prometheus file-based discovery of deployed model services, written by every deploy.

One file per model and environment (`<workspace>/stack/prometheus/targets/<model>-<env>.json`)
lists the hosts that serve it with the labels dashboards and alerts group by. Prometheus
re-reads the folder on its own, so a new host is scraped and a removed one dropped without a
restart or reload. Each file is replaced whole (write, then rename): Prometheus never reads
half of one.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelyard.atomic import replace_file
from modelyard.config import Settings
from modelyard.stack import prometheus_targets_dir


def write_targets(
    settings: Settings, model: str, environment: str, version: str, scrape: dict[str, str]
) -> Path:
    """`scrape`: host name -> the host:port Prometheus reads /metrics from."""
    groups = [
        {
            "targets": [address],
            "labels": {
                "model": model,
                "environment": environment,
                "version": version,
                "host": host,
            },
        }
        for host, address in sorted(scrape.items())
    ]
    folder = prometheus_targets_dir(settings)
    path = folder / f"{model}-{environment}.json"
    replace_file(path, (json.dumps(groups, indent=2) + "\n").encode())  # no half file is read
    return path
