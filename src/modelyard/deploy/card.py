"""The model card: one page per version that accounts for it, for the person approving it.

Its facts come from where the pipeline already records them: the spec (intended use), the
version's and its run's tags (lineage, libraries), the gate reports (slices, behaviour, the
champion comparison), the export parity, and the release ledger and the drift checks for
what happened after. What nothing recorded yet is measured once, when the pipeline writes the
card (`measure`): per-feature statistics of the training data, each metric's bootstrap
confidence interval and the features' permutation importance on the evaluation split; they
are logged as `card/facts.json`. `gather` reads everything back, so the card is rebuilt from
the record at any time (`modelyard card`) and again after each release (`publish`).
"""

from __future__ import annotations

import html
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from modelyard import registry
from modelyard.config import Settings
from modelyard.deploy import ledger
from modelyard.errors import ModelyardError
from modelyard.monitor.drift import EXPERIMENT as DRIFT_EXPERIMENT
from modelyard.spec import Spec

if TYPE_CHECKING:
    from modelyard.data import Splits

# The measuring half (training's) imports scikit-learn where it runs: the rendering half runs on
# every deploy, rollback and approval, which need none of it (0.8 s of each command's start).

FACTS = "card/facts.json"
_RESAMPLES = 200  # bootstrap resamples for a metric's interval: ±1 point of a 95 % bound
_IMPORTANCE_ROWS = 2000  # permutation importance on at most this many evaluation rows
_IMPORTANCE_REPEATS = 5
SECTIONS = (
    "Intended use", "Data", "Metrics", "Slices", "Behaviour", "Champion",
    "Feature importance", "Export parity", "Lineage", "Releases", "Drift checks",
)  # fmt: skip


def measure(
    spec: Spec, splits: Splits, model: Any, eval_scores: np.ndarray, classes: list | None
) -> dict[str, Any]:
    """What the card needs that the run has not recorded: data statistics, metric intervals
    and permutation importance. Deterministic (fixed seeds): a rerun measures the same."""
    return {
        "intended_use": spec.description.strip(),
        "rows": {"train": len(splits.train), "eval": len(splits.eval)},
        "features": [_feature_stats(splits.train[f.name], f.type) for f in spec.features],
        "intervals": _intervals(spec, splits.eval, eval_scores, classes),
        "importance": _importance(spec, splits.eval, model),
    }


def _feature_stats(column: pd.Series, kind: str) -> dict[str, Any]:
    stats: dict[str, Any] = {"name": column.name, "type": kind,
                             "missing": float(column.isna().mean())}  # fmt: skip
    present = column.dropna()
    if kind == "numeric":
        values = pd.to_numeric(present, errors="coerce").dropna()
        return stats | {
            key: _number(getattr(values, key)()) for key in ("mean", "std", "min", "max")
        }
    shares = present.astype(str).value_counts(normalize=True)
    return stats | {"levels": int(shares.size),
                    "top": [[str(k), float(v)] for k, v in shares.head(3).items()]}  # fmt: skip


def _number(value: Any) -> float | None:
    number = float(value)
    return None if math.isnan(number) else number


def _intervals(
    spec: Spec, frame: pd.DataFrame, scores: np.ndarray, classes: list | None
) -> dict[str, list[float | None]]:
    """Each metric's 95 % interval: the 2.5th and 97.5th percentiles of the metric on
    evaluation rows drawn again with replacement."""
    from modelyard.evaluation import target_values

    truth = target_values(spec, frame)
    rng = np.random.default_rng(0)
    drawn: dict[str, list[float]] = {}
    # Resamples in blocks of about a million drawn rows: all at once where the metrics are
    # vectorised, whatever the size of the evaluation split.
    block = max(1, min(_RESAMPLES, 1_000_000 // max(len(truth), 1)))
    for first in range(0, _RESAMPLES, block):
        draws = rng.integers(0, len(truth), (min(block, _RESAMPLES - first), len(truth)))
        for name, values in _metrics_of(spec, truth, scores, classes, draws).items():
            drawn.setdefault(name, []).extend(values)
    return {
        name: [_number(np.nanpercentile(values, 2.5)), _number(np.nanpercentile(values, 97.5))]
        if not all(math.isnan(v) for v in values) else [None, None]
        for name, values in drawn.items()
    }  # fmt: skip


def _metrics_of(
    spec: Spec, truth: np.ndarray, scores: np.ndarray, classes: list | None, draws: np.ndarray
) -> dict[str, list[float]]:
    """Each metric on each resample (a row of `draws`): vectorised where the task allows."""
    from modelyard.evaluation import compute_metrics, resampled_metrics

    together = resampled_metrics(spec.task, truth, scores, draws)
    if together is not None:
        return {name: values.tolist() for name, values in together.items()}
    each: dict[str, list[float]] = {}
    for rows in draws:
        for name, value in compute_metrics(spec.task, truth[rows], scores[rows], classes).items():
            each.setdefault(name, []).append(value)
    return each


def _importance(spec: Spec, frame: pd.DataFrame, model: Any) -> list[dict[str, Any]]:
    """Permutation importance: how much the model's own score (accuracy; R² for regression)
    drops on the evaluation split when one feature's values are shuffled."""
    from sklearn.inspection import permutation_importance

    from modelyard.evaluation import target_values

    rows = frame.head(_IMPORTANCE_ROWS)
    found = permutation_importance(model, rows.loc[:, spec.feature_names],
                                   target_values(spec, rows), n_repeats=_IMPORTANCE_REPEATS,
                                   random_state=0)  # fmt: skip
    ranked = sorted(zip(spec.feature_names, found.importances_mean, found.importances_std,
                        strict=True), key=lambda t: -t[1])  # fmt: skip
    return [{"feature": n, "mean": float(m), "std": float(s)} for n, m, s in ranked]


@dataclass
class Card:
    model: str
    version: str
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    releases: list[dict[str, str]] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    run_url: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gather(settings: Settings, model: str, version: str) -> Card:
    """The card of a registered version, read back from MLflow and the release ledger."""
    client = registry.connect(settings)
    try:
        found = client.get_model_version(model, version)
    except MlflowException:
        raise ModelyardError(f"{model} has no version {version}; see `modelyard models`") from None
    made = Card(
        model=model,
        version=str(version),
        tags=dict(found.tags),
        releases=[
            _release_row(r)
            for r in reversed(ledger.history(settings, model))
            if r.version == str(version) or r.previous_version == str(version)
        ],
        drift=_drift_checks(client, model, str(version)),
    )
    if found.run_id:  # a version registered by hand may have no run
        _read_run(settings, client, found.run_id, made)
    return made


def _read_run(settings: Settings, client: MlflowClient, run_id: str, made: Card) -> None:
    run = client.get_run(run_id)
    made.metrics = dict(run.data.metrics)
    made.facts = _artifact_json(client, run_id, FACTS)
    made.description = made.facts.get("intended_use", "")
    made.gates = {gate: _artifact_json(client, run_id, f"gates/{gate}/report.json")
                  for gate in ("data", "model", "behaviour", "infra")}  # fmt: skip
    made.parity = _artifact_json(client, run_id, "package/parity.json")
    made.run_url = registry.run_url(settings, run.info.experiment_id, run_id)


def _artifact_json(client: MlflowClient, run_id: str, path: str) -> dict[str, Any]:
    """A JSON artifact of the run ({} when it has none: a gate skipped, an older version)."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            return json.loads(Path(client.download_artifacts(run_id, path, folder)).read_text())
        except (MlflowException, OSError, ValueError):
            return {}


def _release_row(entry: ledger.Release) -> dict[str, str]:
    return {"when": entry.when, "action": entry.action, "environment": entry.environment,
            "version": entry.version, "previous": entry.previous_version,
            "outcome": entry.outcome, "actor": entry.actor, "reason": entry.reason}  # fmt: skip


def _drift_checks(client: MlflowClient, model: str, version: str) -> list[dict[str, Any]]:
    experiment = client.get_experiment_by_name(DRIFT_EXPERIMENT)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.model = '{registry.quoted(model)}' and tags.version = '{registry.quoted(version)}'",
        order_by=["attributes.start_time DESC"], max_results=50,
    )  # fmt: skip
    return [{"when": pd.Timestamp(r.info.start_time, unit="ms", tz="UTC").isoformat(),
             "environment": r.data.tags.get("environment", ""),
             "verdict": r.data.tags.get("verdict", ""), "drifted": r.data.tags.get("drifted", ""),
             "rows": r.data.metrics.get("rows")} for r in runs]  # fmt: skip


# --- rendering ------------------------------------------------------------------------------


def markdown(card: Card) -> str:
    """The card as Markdown: one `##` section per part, tables where there are rows."""
    return "\n".join(_render(card, _MarkdownPage())) + "\n"


def to_html(card: Card) -> str:
    """The card as one self-contained HTML page (no script, no external asset)."""
    body = "\n".join(_render(card, _HtmlPage()))
    return _HTML.format(title=html.escape(f"{card.model} v{card.version}"), body=body)


def summary(card: Card) -> str:
    """A few lines for the MLflow version's description: what it is, how good, where it went."""
    intervals = card.facts.get("intervals", {})
    metrics = ", ".join(f"{k} {v:.4g} ({_interval(intervals.get(k))})"
                        for k, v in sorted(card.metrics.items()) if k in intervals)  # fmt: skip
    gates = ", ".join(f"{g} {'passed' if r.get('passed') else 'failed'}"
                      for g, r in card.gates.items() if r)  # fmt: skip
    releases = [_said(r, card.version) for r in card.releases]
    return "\n\n".join([
        card.description or f"{card.model} v{card.version}",
        f"Evaluation: {metrics or 'no metrics recorded'}. Gates: {gates or 'none recorded'}.",
        f"Releases: {'; '.join(releases[-3:]) or 'none yet'}. The whole card: the run's "
        "artifacts card/card.html and card/card.md, or `modelyard card "
        f"{card.model} {card.version}`.",
    ])  # fmt: skip


class _Page:
    def title(self, text: str) -> str:
        raise NotImplementedError

    def heading(self, text: str) -> str:
        raise NotImplementedError

    def text(self, text: str) -> str:
        raise NotImplementedError

    def table(self, header: list[str], rows: list[list[Any]]) -> str:
        raise NotImplementedError


class _MarkdownPage(_Page):
    def title(self, text: str) -> str:
        return f"# {_plain(text)}"

    def heading(self, text: str) -> str:
        return f"\n## {text}\n"

    def text(self, text: str) -> str:
        return _plain(text)

    def table(self, header: list[str], rows: list[list[Any]]) -> str:
        if not rows:
            return "_none recorded_"
        cells = [[_plain(_cell(v)).replace("|", "\\|") for v in row] for row in rows]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


class _HtmlPage(_Page):
    def title(self, text: str) -> str:
        return f"<h1>{html.escape(text)}</h1>"

    def heading(self, text: str) -> str:
        anchor = text.lower().replace(" ", "-")
        return f'<h2 id="{anchor}">{html.escape(text)}</h2>'

    def text(self, text: str) -> str:
        return f"<p>{html.escape(text)}</p>"

    def table(self, header: list[str], rows: list[list[Any]]) -> str:
        if not rows:
            return "<p><em>none recorded</em></p>"
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
            for row in rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _said(entry: dict[str, str], version: str) -> str:
    """A release as the version's summary tells it: its own, or the one that replaced it."""
    when = entry["when"][:10]
    if entry["version"] == version:
        return f"{entry['action']} to {entry['environment']} {entry['outcome']} ({when})"
    return f"replaced in {entry['environment']} by v{entry['version']} ({entry['action']}, {when})"


def _plain(text: str) -> str:
    """Text shown as written where Markdown is rendered (Prefect, MLflow): no markup in it."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _render(card: Card, page: _Page) -> list[str]:
    parts = [page.title(f"Model card: {card.model} v{card.version}")]
    for section, build in _BUILDERS.items():
        parts += [page.heading(section), build(card, page)]
    return parts


def _intended_use(card: Card, page: _Page) -> str:
    return page.text(card.description or "No description in the spec (`description:`).")


def _data(card: Card, page: _Page) -> str:
    facts, tags = card.facts, card.tags
    rows = facts.get("rows", {})
    said = page.text(f"Source {tags.get('data_source', '?')}, fingerprint "
                     f"{tags.get('data_fingerprint', '?')[:16]}, {rows.get('train', '?')} training "
                     f"and {rows.get('eval', '?')} evaluation rows.")  # fmt: skip
    table = page.table(
        ["feature", "type", "missing", "mean", "std", "min", "max", "levels", "most common"],
        [[f["name"], f["type"], f["missing"], f.get("mean"), f.get("std"), f.get("min"),
          f.get("max"), f.get("levels"),
          ", ".join(f"{k} ({v:.0%})" for k, v in f.get("top", []))]
         for f in facts.get("features", [])],
    )  # fmt: skip
    return said + "\n\n" + table


def _metrics(card: Card, page: _Page) -> str:
    intervals = card.facts.get("intervals", {})
    return page.table(
        ["metric", "value", "95 % interval (bootstrap, evaluation split)"],
        [[name, value, _interval(intervals.get(name))]
         for name, value in sorted(card.metrics.items()) if name in intervals],
    )  # fmt: skip


def _interval(bounds: list[float | None] | None) -> str:
    if not bounds or bounds[0] is None:
        return "–"
    return f"{_cell(bounds[0])} – {_cell(bounds[1])}"


def _checks(
    keep: Callable[[dict[str, Any]], bool],
    gates: tuple[str, ...] = ("model", "behaviour"),
    none: str = "",
) -> Callable[[Card, _Page], str]:
    """A section of the checks of `gates` that `keep` picks; `none`: what to say when there
    are none, instead of an empty table."""

    def build(card: Card, page: _Page) -> str:
        checks = [c for gate in gates
                  for c in card.gates.get(gate, {}).get("checks", []) if keep(c)]  # fmt: skip
        if not checks and none:
            return page.text(none)
        return page.table(["check", "result", "detail"],
                          [[c["name"], "passed" if c["passed"] else "failed", c.get("detail", "")]
                           for c in checks])  # fmt: skip

    return build


def _slice(check: dict[str, Any]) -> bool:
    return "slice" in str(check["name"])


def _importance_table(card: Card, page: _Page) -> str:
    return page.table(["feature", "drop in score when shuffled", "±"],
                      [[i["feature"], i["mean"], i["std"]]
                       for i in card.facts.get("importance", [])])  # fmt: skip


def _parity(card: Card, page: _Page) -> str:
    return page.table(["export", "result", "rows", "largest difference"],
                      [[name, "skipped: " + r["skipped"] if "skipped" in r else
                        ("passed" if r.get("passed") else "failed"), r.get("rows"),
                        r.get("max_abs_diff")] for name, r in card.parity.items()])  # fmt: skip


def _lineage(card: Card, page: _Page) -> str:
    keys = ("git_commit", "git_branch", "git_dirty", "spec_hash", "data_fingerprint",
            "spec_path", "bundle_digest", "image_ref", "mlflow_run_id")  # fmt: skip
    rows = [[k, card.tags[k]] for k in keys if card.tags.get(k)]
    rows += [[k, v] for k, v in sorted(card.tags.items()) if k.startswith(("lib.", "rebuild."))]
    return page.table(["what", "value"], [*rows, ["MLflow run", card.run_url]])


def _releases(card: Card, page: _Page) -> str:
    return page.table(["when", "action", "environment", "version", "from", "outcome", "by",
                       "reason"],
                      [[r["when"], r["action"], r["environment"], r["version"], r["previous"],
                        r["outcome"], r["actor"], r["reason"]] for r in card.releases])  # fmt: skip


def _drift(card: Card, page: _Page) -> str:
    return page.table(["when", "environment", "verdict", "drifted", "rows"],
                      [[d["when"], d["environment"], d["verdict"], d["drifted"], d["rows"]]
                       for d in card.drift])  # fmt: skip


_BUILDERS: dict[str, Callable[[Card, _Page], str]] = {
    "Intended use": _intended_use,
    "Data": _data,
    "Metrics": _metrics,
    "Slices": _checks(_slice),
    "Behaviour": _checks(lambda c: not _slice(c), gates=("behaviour",)),
    "Champion": _checks(
        lambda c: str(c["name"]).startswith("champion"),
        none="No version served when this one was registered: there was no champion to beat.",
    ),
    "Feature importance": _importance_table,
    "Export parity": _parity,
    "Lineage": _lineage,
    "Releases": _releases,
    "Drift checks": _drift,
}
assert tuple(_BUILDERS) == SECTIONS

_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; max-width: 72rem; margin: 2rem auto;
       padding: 0 1rem; color: #1b1f24; }}
h1 {{ font-size: 1.7rem; }}
h2 {{ font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }}
table {{ border-collapse: collapse; margin: .5rem 0; }}
th, td {{ border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: left;
         vertical-align: top; }}
th {{ background: #f6f8fa; }}
</style></head>
<body>
{body}
</body></html>
"""


def publish(settings: Settings, model: str, version: str) -> Card:
    """Render the version's card from the record and keep it with the version: Markdown and
    HTML in its run's `card/` artifacts, the summary as the MLflow version's description."""
    client = registry.connect(settings)
    found = gather(settings, model, version)
    run_id = client.get_model_version(model, version).run_id
    if run_id:
        client.log_text(run_id, markdown(found), "card/card.md")
        client.log_text(run_id, to_html(found), "card/card.html")
    client.update_model_version(model, version, description=summary(found))
    return found


def refresh(
    settings: Settings, model: str, versions: list[str], say: Callable[[str], None]
) -> None:
    """After a release: the cards of the versions it moved, brought up to date. A card that
    cannot be written is said, never a reason for the release to fail."""
    for version in dict.fromkeys(v for v in versions if v):
        try:
            publish(settings, model, version)
        except Exception as exc:  # MLflow's, the network's, a version deleted meanwhile
            say(f"card: v{version}'s model card was not brought up to date ({exc})")
