"""What the flows hand back to whoever started them (the CLI, a test, a script): plain typed
values, so a caller reads `outcome.version` and a type checker sees a misspelt field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class StageRow:
    """One line of a run's stage table (the CLI's table, the Prefect artifact)."""

    stage: str
    outcome: str  # passed | failed | done | error | skipped | approved by … | rejected
    seconds: float
    cached: bool
    detail: str = ""  # what the stage says of itself, e.g. the data's source


@dataclass(frozen=True)
class Released:
    """One environment a pipeline run deployed to."""

    environment: str
    version: str
    outcome: str  # the ledger's outcome of the release


@dataclass(frozen=True)
class PipelineOutcome:
    """A pipeline run that registered a version (a failed run raises instead)."""

    model: str
    version: str
    reused_version: bool  # same commit, spec and data as a version already registered
    mlflow_run_id: str
    mlflow_run_url: str
    mlflow_version_url: str
    flow_run_id: str
    metrics: dict[str, float]
    cached_stages: list[str] = field(default_factory=list)
    bundle: dict[str, str] = field(default_factory=dict)  # empty when the version was reused
    releases: list[Released] = field(default_factory=list)
    stages: list[StageRow] = field(default_factory=list)

    @property
    def serving(self) -> list[str]:
        return [step.environment for step in self.releases]


@dataclass(frozen=True)
class MonitorOutcome:
    """One drift check of the version an environment serves, and what it started."""

    model: str
    environment: str
    version: str
    rows: int
    drifted: list[str]
    psi: dict[str, float]
    retrain: str  # none | started | cooldown (monitor.drift.retrain)
    retrain_detail: str
    mlflow_run_id: str

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.psi.items(), key=lambda kv: kv[1], default=("-", 0.0))


def table(rows: list[StageRow]) -> list[dict[str, object]]:
    """Rows as a Prefect table artifact takes them."""
    return [asdict(row) for row in rows]
