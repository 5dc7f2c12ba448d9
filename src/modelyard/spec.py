"""The pipeline spec (`modelyard.yaml`) as a pydantic model.

Everything a run does is decided here, so an invalid spec must fail before any work with a message
that names the field, the value given and what is allowed.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import itertools
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelyard.errors import SpecError
from modelyard.values import category_text

Task = Literal["regression", "binary_classification", "multiclass_classification"]

METRICS: dict[str, dict[str, str]] = {
    # metric -> which direction is better; used by gates and reports alike.
    "regression": {"rmse": "lower", "mae": "lower", "r2": "higher"},
    "binary_classification": {
        "roc_auc": "higher",
        "f1": "higher",
        "log_loss": "lower",
        "accuracy": "higher",
        "precision": "higher",
        "recall": "higher",
    },
    "multiclass_classification": {
        "accuracy": "higher",
        "f1_macro": "higher",
        "f1_weighted": "higher",
        "log_loss": "lower",
        "roc_auc_ovr": "higher",  # one-vs-rest, averaged over the classes
    },
}

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Feature(_Strict):
    """An input column: its type and what valid values look like."""

    name: str
    type: Literal["numeric", "categorical"]
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = Field(
        default=None,
        description="Allowed values of a categorical column: text, integer codes or true/false "
        "(requests may send codes and booleans as JSON numbers and booleans).",
    )
    max_missing: Fraction = Field(default=0.0, description="Largest allowed fraction of nulls.")

    @field_validator("categories", mode="before")
    @classmethod
    def _categories_as_text(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [v if isinstance(v, str) else category_text(v) for v in value]
        return value

    @model_validator(mode="after")
    def _bounds_fit_type(self) -> Feature:
        if self.type == "categorical" and (self.min is not None or self.max is not None):
            raise ValueError("min/max apply to numeric features; use categories for categorical")
        if self.type == "numeric" and self.categories is not None:
            raise ValueError("categories apply to categorical features; use min/max for numeric")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max})")
        return self


class SqlQuery(_Strict):
    """Rows from a SQL query, read through SQLAlchemy."""

    url: str = Field(
        description="SQLAlchemy database URL without a password, e.g. "
        "postgresql://reader@db.example.com:5432/sales."
    )
    query: str = Field(description="A SELECT whose columns include the features and the target.")
    password_env: str | None = Field(
        default=None,
        description="Name of the environment variable holding the password; without it the "
        "driver's own ways apply (PGPASSWORD, ~/.pgpass, IAM).",
    )

    @field_validator("url")
    @classmethod
    def _url_without_password(cls, value: str) -> str:
        from sqlalchemy.engine import make_url  # MLflow brings SQLAlchemy; parse only here

        try:
            url = make_url(value)
        except Exception as exc:  # ArgumentError, or a bad port
            raise ValueError(
                f"{value!r} is not a database URL (dialect[+driver]://user@host:port/db): {exc}"
            ) from exc
        if url.password is not None or any("password" in k.lower() for k in url.query):
            # The spec is logged to MLflow and lives in git: a password here would leak there.
            raise ValueError(
                "the URL holds a password, which would be stored with the spec in git and "
                "MLflow; remove it and set password_env to the name of an environment variable "
                "that holds it"
            )
        return value

    @field_validator("password_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"{value!r} is not an environment variable name; give its name")
        return value

    @field_validator("query")
    @classmethod
    def _one_statement(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the query is empty; give a SELECT")
        return value


class Dataset(_Strict):
    """Where rows come from: a CSV/Parquet file (local or S3), a SQL query or a generator."""

    path: str | None = Field(
        default=None,
        description="CSV or Parquet file, relative to the spec, or s3://bucket/key "
        "(read with boto3's usual credentials, region and AWS_ENDPOINT_URL_S3).",
    )
    sql: SqlQuery | None = Field(default=None, description="A SQL query against a database.")
    generator: str | None = Field(
        default=None, description="'module:function' returning a DataFrame; module beside the spec."
    )
    rows: int = Field(default=5000, gt=0, description="Rows to generate.")
    seed: int = Field(default=0, description="Generator seed; same seed, same data.")

    @model_validator(mode="after")
    def _one_source(self) -> Dataset:
        given = [k for k in ("path", "sql", "generator") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of 'path' (CSV/Parquet file, local or s3://), 'sql' "
                f"(url and query) or 'generator'; given: {given or 'none'}"
            )
        if self.path is not None:
            _check_path(self.path)
        if self.generator is not None and not re.fullmatch(r"[\w.]+:\w+", self.generator):
            raise ValueError(
                f"generator {self.generator!r} must look like 'module:function', "
                "e.g. 'data:generate'"
            )
        return self

    def describe(self) -> str:
        """Where the rows come from, in words safe for logs and tags (no password)."""
        if self.sql is not None:
            return f"SQL query on {self.sql.url}"
        return self.path or f"generator {self.generator}"


def _check_path(path: str) -> None:
    if Path(path).suffix.lower() not in {".csv", ".parquet"}:
        raise ValueError(f"path {path!r} must end in .csv or .parquet")
    if "://" in path and not re.fullmatch(r"s3://[^/]+/.+", path):
        raise ValueError(
            f"path {path!r}: the one remote store is S3, written s3://bucket/key; for a "
            "database give 'sql' instead"
        )


class Estimator(_Strict):
    """Any scikit-learn estimator by import path; modelyard wraps it in a preprocessing Pipeline."""

    class_: str = Field(alias="class", description="Import path, e.g. sklearn.linear_model.Ridge")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Constructor arguments; `random_state`, where the estimator takes one and "
        "it is left out, is `split.seed`, so a rerun trains the same model.",
    )

    @model_validator(mode="after")
    def _importable_with_params(self) -> Estimator:
        cls = resolve_estimator(self.class_)
        unknown = sorted(set(self.params) - set(cls().get_params(deep=False)))
        if unknown and not _takes_any_keyword(cls):  # LightGBM and XGBoost pass extras on
            allowed = ", ".join(sorted(cls().get_params(deep=False)))
            raise ValueError(f"{self.class_} has no parameter(s) {unknown}; it accepts: {allowed}")
        try:
            cls(**self.params)
        except Exception as exc:  # the estimator's own constructor message is the useful one
            raise ValueError(f"{self.class_}(**params) failed: {exc}") from exc
        return self


class Split(_Strict):
    test_size: float = Field(default=0.2, gt=0.0, lt=1.0)
    seed: int = 0
    stratify: bool | None = Field(
        default=None, description="Stratify on the target; defaults to true for classification."
    )


class Expectations(_Strict):
    """Table-level expectations; column-level ones come from the feature declarations."""

    min_rows: int = Field(default=100, gt=0)
    max_rows: int | None = Field(default=None, gt=0)
    target_min: float | None = None
    target_max: float | None = None


class Threshold(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _has_bound(self) -> Threshold:
        if self.min is None and self.max is None:
            raise ValueError("give 'min', 'max' or both")
        return self


class Champion(_Strict):
    """Challenger vs the version holding `alias`, on the same evaluation rows."""

    enabled: bool = True
    alias: str = "production"
    alpha: float = Field(default=0.05, gt=0.0, lt=0.5, description="One-sided significance level.")
    margin: float = Field(
        default=0.0,
        ge=0.0,
        description="Relative mean-loss increase tolerated (0.02 = 2%) before it counts as worse.",
    )
    resamples: int = Field(default=2000, ge=200, le=100_000)


class Gates(_Strict):
    metrics: dict[str, Threshold] = Field(default_factory=dict)
    champion: Champion = Field(default_factory=Champion)


class Invariance(_Strict):
    """Changing `feature` must move predictions by at most `tolerance`."""

    feature: str
    values: list[Any] | None = Field(
        default=None, description="Replace the column with each value."
    )
    noise: float | None = Field(
        default=None, gt=0.0, description="Relative noise on a numeric column."
    )
    tolerance: float = Field(gt=0.0)

    @model_validator(mode="after")
    def _one_perturbation(self) -> Invariance:
        if (self.values is None) == (self.noise is None):
            raise ValueError("set exactly one of 'values' or 'noise'")
        return self


class Directional(_Strict):
    """Raising `feature` by `delta` must move predictions in the `expect` direction."""

    feature: str
    delta: float
    expect: Literal["increase", "decrease"]
    min_fraction: Fraction = Field(
        default=1.0, description="Share of rows that must move that way."
    )
    class_: str | None = Field(
        default=None,
        alias="class",
        description="Multiclass: the class whose probability must move (required there).",
    )

    @field_validator("class_", mode="before")
    @classmethod
    def _class_as_text(cls, value: Any) -> Any:
        return value if value is None or isinstance(value, str) else category_text(value)


class Slice(_Strict):
    """A named subset (pandas query) with its own metric floor or ceiling."""

    name: str
    where: str
    metric: str
    min: float | None = None
    max: float | None = None


class Latency(_Strict):
    budget_ms: float = Field(
        default=50.0, gt=0.0,
        description="Most milliseconds of CPU time one one-row prediction may take, on one "
        "thread (the wall clock is reported too; a busy machine does not fail a fast model).",
    )  # fmt: skip
    percentile: float = Field(default=95.0, gt=0.0, le=100.0, description="Which percentile.")
    calls: int = Field(default=200, ge=10, le=100_000, description="Predictions timed.")


class Behaviour(_Strict):
    tests: str | None = Field(
        default=None,
        description="Your own pytest folder (relative to the spec), run with the built-in "
        "behaviour tests; unset: the built-in tests alone. Installed pytest plugins are not "
        "loaded on their own: name the ones your tests need in `pytest_plugins` of their "
        "conftest.py.",
    )
    invariance: list[Invariance] = Field(default_factory=list)
    directional: list[Directional] = Field(default_factory=list)
    slices: list[Slice] = Field(default_factory=list)
    latency: Latency = Field(default_factory=Latency)


class Tolerance(_Strict):
    """Allowed |export - scikit-learn| per row: atol + rtol * |scikit-learn|."""

    rtol: float = Field(default=1e-5, ge=0.0)
    atol: float = Field(default=1e-5, ge=0.0)


class Package(_Strict):
    """How the model is exported and proven before it can be served."""

    tolerance: Tolerance = Field(default_factory=Tolerance)
    pmml: bool = Field(
        default=False, description="Also export PMML (needs Java and the pmml extra), proven too."
    )


class AwsHosts(_Strict):
    """EC2 hosts of an `aws` environment, found by tags with the amazon.aws.aws_ec2 inventory."""

    region: str | None = Field(
        default=None, description="AWS region of the hosts; default: the AWS chain's region."
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="Instance tags a host must also carry, beside modelyard:model and "
        "modelyard:environment.",
    )
    address: str = Field(
        default="private_ip_address",
        description="Instance attribute Ansible connects to: private_ip_address (from inside "
        "the VPC), public_ip_address, public_dns_name or private_dns_name.",
    )
    compose: dict[str, str] = Field(
        default_factory=dict,
        description="Host variables from instance attributes (the plugin's `compose`: Jinja "
        "expressions such as \"tags['ssh_user']\").",
    )
    vars: dict[str, Any] = Field(
        default_factory=dict,
        description="Variables for every host (ansible_user, model_service_port, ...).",
    )


class CanaryChecks(_Strict):
    """What the new version must show over each bake window, read from Prometheus per slot."""

    success_rate: Fraction = Field(
        default=0.99, description="Share of its prediction requests answered without a server "
        "error, less the share it refuses (4xx) beyond the baseline's, at least (a failing "
        "baseline excuses nothing).",
    )  # fmt: skip
    latency_budget_ms: float | None = Field(
        default=None, gt=0.0,
        description="Its p99 serving latency, at most (beyond chance at 99 %: a small window's "
        "one slow request does not fail it); default: monitoring.latency_budget_ms, else "
        "behaviour.latency.budget_ms.",
    )  # fmt: skip
    latency_ratio: float = Field(
        default=1.5,
        ge=1.0,
        description="Its p99, at most this many times the baseline's (beyond chance at 99 %).",
    )
    psi: float = Field(
        default=0.25, gt=0.0,
        description="PSI of its predictions against the baseline's over the window, at most "
        "(when the bin counts differ beyond chance at 99 %).",
    )  # fmt: skip
    min_requests: int = Field(
        default=100, ge=1,
        description="Fewer prediction requests than this on either slot: the window is "
        "inconclusive and the bake goes on (up to `timeout`), never a pass.",
    )  # fmt: skip
    cost_ratio: float | None = Field(
        default=None, ge=1.0,
        description="CPU one row costs its model, at most this many times the baseline's "
        "(each server measures it at start on the bundle's example, on its own CPU clock, so a "
        "busy host does not inflate it). Off by default: set it where other work on the hosts "
        "makes p99 a poor witness of a heavier model, or to guard their capacity.",
    )  # fmt: skip


class ShadowChecks(CanaryChecks):
    """A shadow's own checks, plus how closely its answers follow the serving version's on the
    same requests."""

    agreement: Fraction = Field(
        default=0.95, description="Classifiers: share of requests whose predicted class is the "
        "serving version's, at least.",
    )  # fmt: skip
    max_mean_abs_diff: float | None = Field(
        default=None, ge=0.0,
        description="Regressors (required there): mean |new - serving| prediction, at most, in "
        "the target's units.",
    )  # fmt: skip


class AllAtOnce(_Strict):
    """Every host's traffic moves to the new version once it passes its checks on the host."""

    kind: Literal["all_at_once"] = "all_at_once"


class CanaryStrategy(_Strict):
    """Traffic moves in steps, each judged against the baseline before the next."""

    kind: Literal["canary"]
    steps: list[int] = Field(
        default_factory=lambda: [5, 25, 50, 100], min_length=1,
        description="Percent of requests on the new version at each step, increasing, ending "
        "at 100.",
    )  # fmt: skip
    bake: int = Field(default=300, ge=10, description="Seconds each step runs before it is judged.")
    checks: CanaryChecks = Field(default_factory=CanaryChecks)
    max_failures: int = Field(
        default=1, ge=0,
        description="Failed analyses tolerated over the rollout (the step is judged again after "
        "another bake); one more sends all traffic back to the baseline at once.",
    )  # fmt: skip
    timeout: int = Field(
        default=7200, ge=10,
        description="Seconds the whole rollout may take, inconclusive bakes included; then it is "
        "rolled back.",
    )  # fmt: skip

    @field_validator("steps")
    @classmethod
    def _steps_climb_to_all(cls, steps: list[int]) -> list[int]:
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError(f"each step is a percent of traffic, 1 to 100; got {steps}")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"steps must increase; got {steps}")
        if steps[-1] != 100:
            raise ValueError(f"the last step must be 100 (all traffic); got {steps}")
        return steps

    @model_validator(mode="after")
    def _time_for_every_step(self) -> CanaryStrategy:
        if self.timeout < self.bake * len(self.steps):
            raise ValueError(
                f"timeout: {self.timeout} s cannot hold {len(self.steps)} steps of bake "
                f"{self.bake} s; raise it to at least {self.bake * len(self.steps)}"
            )
        return self


class ShadowStrategy(_Strict):
    """The new version gets copies of live requests; clients only see the serving version.
    A shadow that passes is then switched in as `all_at_once` does."""

    kind: Literal["shadow"]
    sample: float = Field(
        default=0.1, gt=0.0, le=1.0, description="Share of live requests copied to it (0-1]."
    )
    duration: int = Field(default=600, ge=10, description="Seconds it receives copies.")
    checks: ShadowChecks = Field(default_factory=ShadowChecks)
    mirror_timeout: float = Field(
        default=1.0, gt=0.0, le=60.0,
        description="Seconds a copy may take before nginx drops it; copies never delay an answer "
        "by more than this.",
    )  # fmt: skip
    timeout: int = Field(
        default=7200, ge=10,
        description="Seconds the shadow may run: a `duration` with too few compared requests "
        "to judge runs again, up to this; then the shadow is stopped and nothing moves.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _time_for_one_duration(self) -> ShadowStrategy:
        if self.timeout < self.duration:
            raise ValueError(
                f"timeout: {self.timeout} s is shorter than the shadow's duration "
                f"{self.duration} s; raise it to at least {self.duration}"
            )
        return self


STRATEGY_KINDS = ("all_at_once", "canary", "shadow")
Strategy = Annotated[
    AllAtOnce | CanaryStrategy | ShadowStrategy,
    Field(discriminator="kind"),
]


class RateLimit(_Strict):
    """How many requests one client may send through the front door (nginx's limit_req: a
    leaky bucket per client). Over it, a request is answered 429 with Retry-After at once and
    costs the model nothing; other clients are not slowed. Health probes and /version are not
    counted."""

    per_second: float = Field(
        gt=0.0, le=100_000.0, description="Requests a second one client may keep sending."
    )
    burst: int | None = Field(
        default=None, ge=0, le=1_000_000,
        description="Requests beyond that rate a client may send at once before it is refused; "
        "default: one second's worth.",
    )  # fmt: skip
    by: Literal["address", "key"] = Field(
        default="address",
        description="Who a client is: address, its IP as nginx sees it; key, its "
        "X-Modelyard-Key header (its address when it sends none). A client can send any key: "
        "use `key` only behind a gateway that sets the header.",
    )

    @property
    def burst_requests(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.per_second))


class Environment(_Strict):
    """Where and how one environment (staging, production, ...) serves the model."""

    target: Literal["local", "ssh", "aws"] = Field(
        default="local",
        description="local: this machine; ssh: the hosts of `inventory`; aws: EC2 instances "
        "tagged for the model and environment (see `aws`).",
    )
    inventory: str | None = Field(
        default=None,
        description="Ansible inventory (relative to the spec) whose `model_hosts` group serves; "
        "required for ssh targets.",
    )
    runtime: Literal["container", "process"] = Field(
        default="container",
        description="container: the serving image on the host's Docker engine; process: the "
        "bundle in a virtualenv under supervisord, for hosts without Docker.",
    )
    port: int = Field(
        default=8080, ge=1, le=65533,
        description="Front-door port on each host (hosts may override it with "
        "`model_service_port`); the two slots use the next two ports.",
    )  # fmt: skip
    batch: int | str = Field(
        default=1, description="Hosts updated at a time (Ansible `serial`): a count or '25%'."
    )
    max_fail_percentage: Fraction = Field(
        default=0.0,
        description="Share of hosts (0-1) that may fail before the rollout stops and reverts.",
    )
    approval: bool | None = Field(
        default=None,
        description="Wait for a person's approval before deploying here; default: every "
        "environment but the first.",
    )
    approvers: list[str] = Field(
        default_factory=list, description="Who may approve; empty: anyone with access."
    )
    aws: AwsHosts | None = Field(
        default=None, description="For `target: aws`: which EC2 instances serve, by tags."
    )
    rate_limit: RateLimit | None = Field(
        default=None,
        description="Requests per client at the front door (`per_second`, `burst`, `by`); "
        "default: no limit.",
    )
    strategy: Strategy = Field(
        default_factory=AllAtOnce,
        description="How traffic moves to a new version: `kind` all_at_once (default), canary "
        "or shadow, with that kind's fields.",
    )

    @field_validator("strategy", mode="before")
    @classmethod
    def _kind_alone(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value  # `strategy: canary`

    @model_validator(mode="after")
    def _inventory_for_ssh(self) -> Environment:
        if self.target == "ssh" and not self.inventory:
            raise ValueError("an ssh target needs `inventory`: the path of an Ansible inventory")
        if self.aws is not None and self.target != "aws":
            raise ValueError("`aws` applies to `target: aws` only")
        return self


class Deploy(_Strict):
    environments: dict[str, Environment] = Field(
        default_factory=dict,
        description="Environments in rollout order, e.g. staging then production.",
    )
    approval_timeout: int = Field(
        default=86400, ge=1, description="Seconds to wait for an approval before giving up."
    )


class Monitoring(_Strict):
    """How a deployed version is watched, and when drift sends the model back to training."""

    drift_threshold: float = Field(
        default=0.25, gt=0.0,
        description="PSI above which an input or the prediction counts as drifted (0.1 is a "
        "moderate shift, 0.25 a large one).",
    )  # fmt: skip
    window: int = Field(
        default=3600, ge=60, description="Seconds of live traffic each drift check compares."
    )
    min_rows: int = Field(
        default=200, ge=1, description="Fewer live rows than this in the window: no verdict."
    )
    interval: int = Field(default=900, ge=60, description="Seconds between scheduled drift checks.")
    cooldown: int = Field(
        default=86400, ge=0,
        description="Seconds after a drift-triggered retraining before drift may trigger another.",
    )  # fmt: skip
    retrain: bool = Field(default=True, description="Start the pipeline when drift is found.")
    environments: list[str] | None = Field(
        default=None,
        description="Environments checked on a schedule; default: the last in rollout order "
        "(production).",
    )
    latency_budget_ms: float | None = Field(
        default=None, gt=0.0,
        description="p99 serving latency that raises an alert; default: behaviour.latency."
        "budget_ms.",
    )  # fmt: skip


class Spec(_Strict):
    """A whole `modelyard.yaml`."""

    name: str = Field(description="Registered model name.")
    description: str = ""
    task: Task
    dataset: Dataset
    features: list[Feature] = Field(min_length=1)
    target: str
    positive_label: str | None = Field(
        default=None,
        description="binary_classification with a target of two text labels (yes/no): the "
        "label that is 1, the event whose probability the model gives.",
    )
    estimator: Estimator
    split: Split = Field(default_factory=Split)
    expectations: Expectations = Field(default_factory=Expectations)
    gates: Gates = Field(default_factory=Gates)
    behaviour: Behaviour = Field(default_factory=Behaviour)
    package: Package = Field(default_factory=Package)
    deploy: Deploy = Field(default_factory=Deploy)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    # Folder of the spec file; relative paths in the spec resolve against it. Not part of hashes.
    source_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("positive_label", mode="before")
    @classmethod
    def _label_as_text(cls, value: Any) -> Any:
        return value if value is None or isinstance(value, str) else category_text(value)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use letters, digits, '_', '-' or '.', starting with a letter")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        names = [f.name for f in self.features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"features: duplicate names {duplicates}")
        if self.target in names:
            raise ValueError(f"target {self.target!r} is also listed as a feature; remove it there")
        if self.positive_label is not None and self.task != "binary_classification":
            raise ValueError(
                "positive_label names the event of a binary_classification target; "
                f"remove it for {self.task}"
            )
        _check_estimator_task(self.estimator, self.task)
        for metric in self.gates.metrics:
            _check_metric(f"gates.metrics.{metric}", metric, self.task)
        for i, sl in enumerate(self.behaviour.slices):
            _check_metric(f"behaviour.slices[{i}].metric", sl.metric, self.task)
        for env, where in self.deploy.environments.items():
            _check_shadow_task(f"deploy.environments.{env}.strategy", where.strategy, self.task)
        for env in self.monitoring.environments or []:
            if env not in self.deploy.environments:
                raise ValueError(
                    f"monitoring.environments: {env!r} is not under deploy.environments "
                    f"({list(self.deploy.environments)})"
                )
        for i, rule in enumerate(self.behaviour.directional):
            if (rule.class_ is None) == (self.task == "multiclass_classification"):
                raise ValueError(
                    f"behaviour.directional[{i}].class: name the class whose probability must "
                    "move for a multiclass model, and only there"
                )
        known = set(names)
        for kind in ("invariance", "directional"):
            for i, rule in enumerate(getattr(self.behaviour, kind)):
                if rule.feature not in known:
                    raise ValueError(
                        f"behaviour.{kind}[{i}].feature: {rule.feature!r} is not a feature; "
                        f"features are {names}"
                    )
        return self

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def feature(self, name: str) -> Feature:
        return next(f for f in self.features if f.name == name)

    @property
    def stratify(self) -> bool:
        default = self.task != "regression"
        return default if self.split.stratify is None else self.split.stratify

    def resolve(self, relative: str) -> Path:
        return (self.source_dir / relative).resolve()

    def digest(self, *sections: str) -> str:
        """SHA-256 of the canonical JSON of the whole spec or of the named sections."""
        data = self.model_dump(mode="json", by_alias=True)
        if sections:
            data = {key: data[key] for key in sections}
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def monitored_environments(self) -> list[str]:
        if self.monitoring.environments is not None:
            return list(self.monitoring.environments)
        return list(self.deploy.environments)[-1:]

    @property
    def training_digest(self) -> str:
        """What the fitted model depends on; the train stage's cache is keyed on it."""
        return self.digest("task", "dataset", "features", "target", "estimator", "split")


def _takes_any_keyword(cls: type) -> bool:
    parameters = inspect.signature(cls).parameters.values()  # the constructor's
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _check_estimator_task(estimator: Estimator, task: str) -> None:
    from sklearn.base import is_classifier, is_regressor

    instance = resolve_estimator(estimator.class_)(**estimator.params)
    name = estimator.class_.rpartition(".")[2]
    if task == "regression" and not is_regressor(instance):
        raise ValueError(f"estimator.class: {name} is not a regressor; task is {task}")
    if task != "regression" and not is_classifier(instance):
        raise ValueError(f"estimator.class: {name} is not a classifier; task is {task}")
    if task != "regression" and not hasattr(instance, "predict_proba"):
        raise ValueError(
            f"estimator: {name} with these params gives no probabilities (predict_proba), which "
            "the gates and serving need; for SVC set params.probability: true, for "
            "SGDClassifier params.loss: log_loss or modified_huber"
        )


def _check_shadow_task(field: str, strategy: Strategy, task: str) -> None:
    """A shadow compares answers as the task's predictions allow: classes agree or not, numbers
    differ by an amount only the user can say is too much."""
    if not isinstance(strategy, ShadowStrategy):
        return
    limit = strategy.checks.max_mean_abs_diff
    if task == "regression" and limit is None:
        raise ValueError(
            f"{field}.checks.max_mean_abs_diff: a regression model's shadow needs it, the largest "
            "mean |new - serving| prediction to accept, in the target's units"
        )
    if task != "regression" and limit is not None:
        raise ValueError(
            f"{field}.checks.max_mean_abs_diff: applies to regression; a {task} model's shadow is "
            "judged by `agreement`"
        )


def _check_metric(field: str, metric: str, task: str) -> None:
    if metric not in METRICS[task]:
        raise ValueError(
            f"{field}: {metric!r} is not a {task} metric; choose from {sorted(METRICS[task])}"
        )


def resolve_estimator(path: str) -> type:
    """Import an estimator class from 'package.module.Class', with an error that says how to fix."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{path!r} is not an import path; write e.g. sklearn.linear_model.Ridge")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"cannot import {path!r} ({exc}); use a full import path such as "
            "sklearn.linear_model.LinearRegression"
        ) from exc
    if not (isinstance(cls, type) and hasattr(cls, "fit") and hasattr(cls, "get_params")):
        raise ValueError(f"{path!r} is not a scikit-learn estimator class (needs fit/get_params)")
    return cls


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; every problem is reported at once, each with its field."""
    file = Path(path)
    if not file.is_file():
        raise SpecError(f"spec file {file} does not exist; pass --spec PATH to a modelyard.yaml")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{file} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{file} must hold a mapping of fields (name, task, dataset, ...)")
    try:
        return Spec.model_validate({**raw, "source_dir": file.resolve().parent})
    except ValidationError as exc:
        raise SpecError(format_validation_error(file, exc)) from None


def format_validation_error(file: Path, exc: ValidationError) -> str:
    """One line for one problem; a list, one problem a line, for more."""
    problems = [_problem(err) for err in exc.errors(include_url=False)]
    head = f"{file} is invalid ({len(problems)} problem(s)):"
    if len(problems) == 1:
        return f"{head} {problems[0]}"
    return "\n".join([head, *(f"  - {p}" for p in problems)])


def _problem(err: Any) -> str:
    message = err["msg"].removeprefix("Value error, ")
    given = err.get("input")
    shown = "" if isinstance(given, dict | list) or given is None else f" (got {given!r})"
    shown = _without_passwords(shown)  # a refused database URL is echoed; its password is not
    if err["type"] == "missing":
        shown = ""
    if err["type"] == "extra_forbidden":
        message = "unknown field; check the spelling against docs/spec.md"
    if err["type"] == "union_tag_not_found":
        message = f"`kind` is missing; set it to one of {', '.join(STRATEGY_KINDS)}"
    field = _field_path(err["loc"])
    # A whole-spec check names its fields in the message (`estimator.class: ...`).
    return f"{field}: {message}{shown}" if field else f"{message}{shown}"


def _without_passwords(text: str) -> str:
    text = re.sub(r"(://[^/@\s:]*):[^/@\s]*@", r"\1:***@", text)
    return re.sub(r"(?i)(password[^=&\s]*=)[^&\s']*", r"\1***", text)


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if i and loc[i - 1] == "strategy" and part in STRATEGY_KINDS:
            continue  # pydantic's own step into the union's member: not a field the user wrote
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
