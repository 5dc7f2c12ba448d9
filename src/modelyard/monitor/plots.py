"""Drift plots as PNG files: PSI per signal against the threshold, and live vs reference
shares bin by bin for the prediction and the inputs that drifted most."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from modelyard.monitor.drift import DriftReport, Signal
from modelyard.plots import save

DETAIL_SIGNALS = 4  # the prediction plus the inputs with the highest PSI


def render(report: DriftReport, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [_psi_bars(report, out_dir / "drift_psi.png")]
    if report.prediction is not None:
        paths.append(_shares([report.prediction], out_dir / "prediction_distribution.png"))
    worst = sorted(report.features, key=lambda s: -s.psi)[: DETAIL_SIGNALS - 1]
    if worst:
        paths.append(_shares(worst, out_dir / "input_distributions.png"))
    return paths


def _psi_bars(report: DriftReport, path: Path) -> Path:
    signals = sorted(report.signals, key=lambda s: s.psi)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(signals) + 1.6))
    colours = ["tab:red" if s.psi > report.threshold else "tab:blue" for s in signals]
    ax.barh([s.name for s in signals], [s.psi for s in signals], color=colours)
    ax.axvline(report.threshold, color="black", linestyle="--", label="threshold")
    ax.set(
        xlabel="PSI (live vs reference)",
        title=f"{report.model} v{report.version} in {report.environment}: drift over "
        f"{report.window_seconds // 60} min, {report.rows} rows",
    )
    ax.legend(loc="lower right")
    return save(fig, path)


def _shares(signals: list[Signal], path: Path) -> Path:
    fig, axes = plt.subplots(len(signals), 1, figsize=(9, 2.8 * len(signals)), squeeze=False)
    for ax, signal in zip(axes[:, 0], signals, strict=True):
        x = np.arange(len(signal.bins))
        ax.bar(x - 0.2, signal.reference, width=0.4, label="reference")
        ax.bar(x + 0.2, signal.live, width=0.4, label="live")
        ax.set_xticks(x, signal.bins, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel="share of rows", title=f"{signal.name}: PSI {signal.psi:.3f}")
        ax.legend()
    return save(fig, path)
