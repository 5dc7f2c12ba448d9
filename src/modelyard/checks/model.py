"""The model gate: absolute metric thresholds, then champion vs challenger.

Champion/challenger statistic: a paired bootstrap of the relative difference in mean per-row loss
(squared error for regression, log-loss for classification) on the same evaluation rows. Pairing
removes the row-to-row variance both models share, so real differences show with few rows; the
bootstrap needs no normality assumption (squared errors are heavy-tailed); and per-row log-loss is
a proper scoring rule, unlike ROC-AUC, which does not decompose by row. The challenger fails when
the one-sided (1 - alpha) lower confidence bound of the relative loss increase exceeds the margin,
i.e. only when it is *significantly* worse, not when it is worse by noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from modelyard.checks.report import Check, GateReport
from modelyard.evaluation import (
    classes_of,
    compute_metrics,
    passes,
    row_losses,
    scores,
    target_values,
)
from modelyard.registry import ChampionModel
from modelyard.spec import Champion, Spec


def check_thresholds(spec: Spec, metrics: dict[str, float]) -> list[Check]:
    checks = []
    for metric, bound in sorted(spec.gates.metrics.items()):
        value = metrics[metric]
        wanted = " and ".join(
            text
            for text in (
                f">= {bound.min}" if bound.min is not None else "",
                f"<= {bound.max}" if bound.max is not None else "",
            )
            if text
        )
        checks.append(
            Check(
                name=f"metric {metric}",
                passed=passes(metric, value, bound.min, bound.max),
                detail=f"{metric} = {value:.4g}, required {wanted}",
                observed=value,
            )
        )
    return checks


def paired_bootstrap(
    challenger_loss: np.ndarray,
    champion_loss: np.ndarray,
    resamples: int,
    alpha: float,
    seed: int = 0,
) -> dict[str, float]:
    """Relative change in mean loss (challenger vs champion) with its one-sided lower bound."""
    rng = np.random.default_rng(seed)
    n = len(challenger_loss)
    idx = rng.integers(0, n, size=(resamples, n))
    base = champion_loss[idx].mean(axis=1)
    diff = challenger_loss[idx].mean(axis=1) - base
    relative = diff / np.maximum(base, np.finfo(float).tiny)
    observed = (challenger_loss.mean() - champion_loss.mean()) / max(
        champion_loss.mean(), np.finfo(float).tiny
    )
    return {
        "relative_loss_change": float(observed),
        "lower_bound": float(np.quantile(relative, alpha)),
        "upper_bound": float(np.quantile(relative, 1 - alpha)),
        "p_not_worse": float(np.mean(relative <= 0)),
    }


def compare_with_champion(
    spec: Spec,
    eval_frame: pd.DataFrame,
    challenger_scores: np.ndarray,
    champion: ChampionModel,
    classes: list | None = None,
) -> tuple[Check, dict[str, Any]]:
    """`classes`: the challenger's, for multiclass scores; the champion's come from its model
    (it may know other classes: a row of a class it never saw costs it the largest loss)."""
    settings: Champion = spec.gates.champion
    y_true = target_values(spec, eval_frame)
    champion_scores = scores(champion.model, eval_frame.loc[:, champion.input_columns], spec.task)
    champion_classes = None if spec.task == "regression" else classes_of(champion.model)
    stats = paired_bootstrap(
        row_losses(spec.task, y_true, challenger_scores, classes),
        row_losses(spec.task, y_true, champion_scores, champion_classes),
        resamples=settings.resamples,
        alpha=settings.alpha,
    )
    worse = stats["lower_bound"] > settings.margin
    detail = (
        f"mean loss {stats['relative_loss_change']:+.2%} vs {settings.alias} v{champion.version} "
        f"({1 - settings.alpha:.0%} lower bound {stats['lower_bound']:+.2%}, margin "
        f"{settings.margin:.2%}): {'significantly worse' if worse else 'not significantly worse'}"
    )
    data = {
        "champion_version": champion.version,
        "champion_metrics": compute_metrics(spec.task, y_true, champion_scores, champion_classes),
        **stats,
    }
    return Check(name=f"champion ({settings.alias})", passed=not worse, detail=detail), data


def check_model(
    spec: Spec,
    eval_frame: pd.DataFrame,
    metrics: dict[str, float],
    challenger_scores: np.ndarray,
    champion: ChampionModel | None,
    classes: list | None = None,
) -> GateReport:
    report = GateReport(gate="model", checks=check_thresholds(spec, metrics))
    report.data["challenger_metrics"] = metrics
    if not spec.gates.champion.enabled:
        report.notes.append("champion comparison disabled in the spec")
    elif champion is None:
        report.notes.append(
            f"no version holds the alias {spec.gates.champion.alias!r}: nothing to compare against"
        )
    else:
        missing = [c for c in champion.input_columns if c not in eval_frame.columns]
        if missing:
            report.notes.append(
                f"champion v{champion.version} needs column(s) {missing} that the evaluation data "
                "lacks; comparison skipped"
            )
        else:
            check, data = compare_with_champion(
                spec, eval_frame, challenger_scores, champion, classes
            )
            report.checks.append(check)
            report.data["champion"] = data
    return report
