"""train → validate → register → deploy to staging → approval → production, as a Prefect flow.

This module only wires `modelyard.stages`: each stage is a task with a clear name, retries where a
failure is transient (talking to MLflow), a cache where reuse is sound, and a Prefect artifact that
says what it decided. Caches: the data gate is keyed on the data fingerprint and the expectations;
training on data, the training sections of the spec, the commit and library versions; the
behaviour gate on the trained model's key and the tests. The model gate is never cached: the
champion it compares against can change between runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_client, get_run_logger, tags, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.context import TaskRunContext
from prefect.exceptions import FlowPauseTimeout, ObjectNotFound
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.states import State
from pydantic import Field

from flows import logs
from flows.locks import release_lock
from flows.process import run_settings
from flows.retries import TRANSIENT
from modelyard import source, stages
from modelyard.checks.report import GateReport
from modelyard.config import Settings
from modelyard.deploy import approvals, card, progressive, release
from modelyard.errors import DeployFailed, GateFailed, ModelyardError
from modelyard.lineage import GitInfo, git_info, model_from_tags, run_name, run_tags, slug
from modelyard.outcomes import PipelineOutcome, Released, StageRow, table
from modelyard.rollout import Analysis
from modelyard.spec import Spec, load_spec

T = TypeVar("T")
# The core's progress (wheelhouse, image steps, pushed layers) is INFO on the `modelyard` logger;
# Prefect's root logger is at WARNING, which would drop it before the UI or the console saw it.
logging.getLogger("modelyard").setLevel(logging.INFO)
logs.install()


def _by_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return parameters["cache_key"]


@task(name="checkout", cache_policy=NONE, persist_result=False, retries=2, retry_delay_seconds=5)
def checkout_task(settings: Settings, repository: str, commit: str, spec_path: str) -> str:
    return str(source.checkout(settings, repository, commit) / spec_path)


@task(name="load-spec", cache_policy=NONE, persist_result=False)
def load_spec_task(spec_path: str) -> Spec:
    return load_spec(spec_path)


@task(name="load-data", cache_policy=NONE, persist_result=False)
def load_data_task(spec: Spec) -> stages.Prepared:
    return stages.prepare(spec)


@task(name="open-mlflow-run", cache_policy=NONE, persist_result=False, **TRANSIENT)
def open_run_task(
    spec: Spec,
    spec_path: str,
    settings: Settings,
    git: GitInfo,
    data: stages.Prepared,
    tags: dict[str, str],
) -> stages.RunContext:
    return stages.open_run(spec, Path(spec_path), settings, git, data, tags)


@task(name="validate-data", cache_key_fn=_by_cache_key, persist_result=True)
def data_gate_task(spec: Spec, splits: stages.Splits, cache_key: str) -> stages.DataGateResult:
    return stages.data_gate(spec, splits)


@task(name="train", cache_key_fn=_by_cache_key, persist_result=True)
def train_task(spec: Spec, splits: stages.Splits, cache_key: str) -> stages.TrainResult:
    return stages.train(spec, splits)


@task(name="log-training", cache_policy=NONE, persist_result=False, **TRANSIENT)
def log_training_task(
    ctx: stages.RunContext, splits: stages.Splits, trained: stages.TrainResult
) -> str:
    return stages.log_training(ctx, splits, trained)


@task(name="validate-model", cache_policy=NONE, persist_result=False, **TRANSIENT)
def model_gate_task(
    ctx: stages.RunContext, splits: stages.Splits, trained: stages.TrainResult
) -> GateReport:
    return stages.model_gate(ctx, splits, trained)


@task(name="validate-behaviour", cache_key_fn=_by_cache_key, persist_result=True)
def behaviour_gate_task(
    spec: Spec, splits: stages.Splits, trained: stages.TrainResult, cache_key: str
) -> GateReport:
    return stages.behaviour_gate(spec, splits, trained)


@task(name="register", cache_policy=NONE, persist_result=False, **TRANSIENT)
def register_task(
    ctx: stages.RunContext, model_uri: str, reports: list[GateReport], tags: dict[str, str]
) -> tuple[str, bool]:
    return stages.register(ctx, model_uri, reports, tags)


@task(name="export", cache_policy=NONE, persist_result=False, **TRANSIENT)
def export_task(
    ctx: stages.RunContext, splits: stages.Splits, trained: stages.TrainResult
) -> stages.Export:
    return stages.export(ctx, splits, trained)


@task(name="package", cache_policy=NONE, persist_result=False, **TRANSIENT)
def package_task(
    ctx: stages.RunContext,
    version: str,
    splits: stages.Splits,
    trained: stages.TrainResult,
    exported: stages.Export,
) -> dict[str, str]:
    return stages.package(ctx, version, splits, trained, exported)


# An engine restart mid-build drops the build; the retry waits for the engine to come back.
@task(
    name="build-image",
    cache_policy=NONE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=[10, 30],
)
def build_image_task(ctx: stages.RunContext, version: str, bundle_path: str) -> stages.ImageResult:
    return stages.build_image(ctx, version, bundle_path)


@task(
    name="push-image",
    cache_policy=NONE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=[5, 15],
)
def push_image_task(
    ctx: stages.RunContext, version: str, built: stages.ImageResult
) -> dict[str, str]:
    return stages.push_image(ctx, version, built)


@task(name="model-card", cache_policy=NONE, persist_result=False, **TRANSIENT)
def model_card_task(
    ctx: stages.RunContext,
    version: str,
    splits: stages.Splits,
    trained: stages.TrainResult,
    measured: bool,
) -> str:
    made = stages.model_card(ctx, version, splits, trained, measured)
    create_markdown_artifact(
        markdown=card.markdown(made), key=f"{slug(ctx.spec.name)}-card",
        description=f"{ctx.spec.name} v{version}: model card (also in the MLflow run's card/)",
    )  # fmt: skip
    return made.version


@task(name="validate-infra", cache_policy=NONE, persist_result=False)
def infra_gate_task(
    ctx: stages.RunContext,
    version: str,
    built: stages.ImageResult,
    bundle_path: str,
    splits: stages.Splits,
) -> GateReport:
    return stages.infra_gate(ctx, version, built, bundle_path, splits)


class _Stages:
    """Runs tasks, timing each and noting whether Prefect served it from cache."""

    def __init__(self) -> None:
        self.rows: list[StageRow] = []
        self.logger = get_run_logger()

    def run(
        self, label: str, task_fn: Any, *args: Any, refresh: bool = False, **kwargs: Any
    ) -> Any:
        if refresh:
            task_fn = task_fn.with_options(refresh_cache=True)
        self.logger.info("%s: started", label)
        started = time.perf_counter()
        state: State = task_fn(*args, return_state=True, **kwargs)
        seconds = round(time.perf_counter() - started, 2)
        cached = state.name == "Cached"
        if state.is_failed():
            self.rows.append(StageRow(label, "error", seconds, cached, state.message or ""))
        result = state.result()  # raises the task's exception when it failed
        outcome = str(
            getattr(result, "verdict", None)
            or getattr(getattr(result, "report", None), "verdict", "done")
        )
        detail = getattr(result, "detail", "")  # what a stage says of itself: the data's source
        self.rows.append(StageRow(label, outcome, seconds, cached, detail))
        if cached:
            self.logger.info("%s: reused the cached result (same inputs as an earlier run)", label)
        return result


def _publish_gate(spec: Spec, report: GateReport) -> None:
    create_markdown_artifact(
        report.to_markdown(),
        key=f"{slug(spec.name)}-{report.gate}-gate",
        description=f"{spec.name}: {report.gate} gate {report.verdict}",
    )


def _publish_bundle(
    spec: Spec, version: str, bundle: dict[str, str], exported: stages.Export
) -> None:
    parity = exported.parity["onnx"]
    create_markdown_artifact(
        f"## {spec.name} v{version}: bundle sealed\n\n"
        f"- digest `{bundle['bundle_digest']}` (signing key `{bundle['bundle_key_id']}`)\n"
        f"- ONNX parity on {parity['rows']} evaluation rows: "
        f"max |diff| {parity['max_abs_diff']:.3g} "
        f"(atol {parity['atol']:g}, rtol {parity['rtol']:g})\n"
        f"- artifact `{bundle['bundle_artifact']}`\n",
        key=f"{slug(spec.name)}-bundle",
        description=f"{spec.name} v{version}: signed bundle",
    )


def _run_name() -> str:
    params = flow_run.parameters
    # Triggered runs carry their model in a tag (the deployment's name); others name the folder.
    return run_name(
        params["spec_path"],
        params.get("commit"),
        params.get("repository"),
        Settings(),  # naming needs only the declared commit and branch: no I/O
        model_from_tags(flow_run.tags),
    )


@flow(name="modelyard-pipeline", flow_run_name=_run_name, log_prints=True)
def pipeline(
    spec_path: str = "modelyard.yaml",
    commit: str | None = None,
    branch: str | None = None,
    trigger: str = "manual",
    refresh_cache: bool = False,
    deploy: bool = True,
    repository: str | None = None,
) -> PipelineOutcome:
    """Train, validate, register and deploy the model a spec describes.

    A failed gate fails the run with nothing registered; environments after the first wait for
    a person's approval. `deploy=False` stops after registering the candidate. With a
    `repository` (URL or path) the run trains `commit` of it, `spec_path` being relative to its
    root: how pushes reach workers on any machine.
    """
    settings = run_settings()
    runner = _Stages()
    if repository:
        if not commit:
            raise ModelyardError("a run from a repository needs the commit to train")
        spec_path = runner.run("checkout", checkout_task, settings, repository, commit, spec_path)
    spec = runner.run("load-spec", load_spec_task, spec_path)
    overrides = settings.model_copy(
        update={
            "git_commit": commit or settings.git_commit,
            "git_branch": branch or settings.git_branch,
        }
    )
    git = git_info(spec.source_dir, overrides)
    prepared: stages.Prepared = runner.run("load-data", load_data_task, spec)
    runner.logger.info("Data: %s", prepared.detail)
    tags = {"trigger": trigger, "prefect_flow_run_id": str(flow_run.id)}
    # What serves now: the champion this run is judged against and what an approver is asked to
    # replace. A release moves an environment only if it still serves the same version.
    serving = release.serving_versions(settings, spec) if deploy else {}
    ctx: stages.RunContext = runner.run(
        "open-mlflow-run", open_run_task, spec, spec_path, settings, git, prepared, tags
    )
    runner.logger.info("MLflow run: %s", ctx.run_url)
    try:
        try:
            outcome = _gates_and_register(runner, ctx, prepared, refresh_cache, tags)
        except Exception as exc:
            stages.close_run(ctx, failure=str(exc))
            raise
        # The training run is done either way; a failed rollout fails the flow run, not it.
        stages.close_run(ctx)
        releases = _release(runner, ctx, outcome, serving) if deploy else []
    finally:
        create_table_artifact(
            table(runner.rows),
            key=f"{slug(spec.name)}-stages",
            description=f"{spec.name}@{git.short}: stages, outcomes and cache use",
        )
    return replace(outcome, releases=releases, stages=runner.rows)


def run_tagged(model: str, commit: str, branch: str, trigger: str, **parameters: Any) -> State:
    """Run the flow here, tagged like a triggered run: the UI filters and names both alike."""
    with tags("modelyard", *run_tags(model, commit, branch, trigger)):
        return pipeline(
            commit=commit, branch=branch, trigger=trigger, return_state=True, **parameters
        )


class Approval(RunInput):
    """The form the Prefect UI shows while a run waits to go to the next environment."""

    approve: bool = Field(description="Deploy this version to the next environment?")
    approver: str = Field(min_length=1, description="Your name, recorded in the release ledger.")
    comment: str = Field(default="", description="Why; recorded in the release ledger.")


@task(name="deploy", cache_policy=NONE, persist_result=False)
def deploy_task(
    settings: Settings,
    spec: Spec,
    environment: str,
    version: str,
    action: str,
    approval: Approval | None,
    expected: str,
    asking: str | None = None,
) -> Released:
    """`asking`: the approval request, when the approval comes at a canary's or a shadow's
    last step (the run pauses there, as it does before an environment otherwise)."""
    logger = get_run_logger()

    kind = spec.deploy.environments[environment].strategy.kind

    def publish(analysis: Analysis) -> None:
        title = f"{spec.name} v{version} {kind} in {environment}"
        create_markdown_artifact(analysis.to_markdown(title),
                                 key=f"{slug(spec.name)}-{slug(environment)}-canary",
                                 description=f"{title}: {analysis.describe()[:200]}")  # fmt: skip

    decisions: list[Approval | None] = []

    def approve() -> bool:
        assert asking is not None
        decision = _wait_for_approval(settings, spec, environment, version, asking)
        decisions.append(decision)
        if decision is None or not decision.approve:
            _record_rejection(settings, spec, environment, version, decision)
            return False
        approvals.approve(settings, spec, environment, version, decision.approver,
                          decision.comment or "approved at the last step")  # fmt: skip
        return True

    try:
        record = progressive.deploy(
            settings, spec, environment, version, logger.info, action,
            reason=approval.comment if approval else "",
            actor=approval.approver if approval else None,
            expected=expected, lock=release_lock(settings), on_analysis=publish,
            approve=approve if asking is not None else None,
        )  # fmt: skip
    except DeployFailed:
        if decisions and not (decisions[-1] and decisions[-1].approve):
            return Released(environment, version, "rejected")  # the rejection is in the ledger
        raise
    return Released(environment, version, record.outcome)


def _release(
    runner: _Stages, ctx: stages.RunContext, outcome: PipelineOutcome, serving: dict[str, str]
) -> list[Released]:
    """Deploy through the spec's environments in order, asking a person where the spec says:
    before the release, or at a canary's or a shadow's last step."""
    spec, version = ctx.spec, outcome.version
    if not spec.deploy.environments:
        runner.logger.info("no deploy.environments in the spec: v%s stays the candidate", version)
    done: list[Released] = []
    for index, environment in enumerate(spec.deploy.environments):
        approval, asking = None, None
        if approvals.needs_approval(spec, environment):
            asking = stages.approval_request(ctx, environment, outcome,
                                             [d.environment for d in done])  # fmt: skip
        if asking is not None and not approvals.at_last_step(spec, environment):
            approval = _wait_for_approval(ctx.settings, spec, environment, version, asking)
            if approval is None or not approval.approve:
                _record_rejection(ctx.settings, spec, environment, version, approval)
                runner.rows.append(_rejected_row(environment, approval, spec))
                return done
            label = f"approved by {approval.approver}"
            runner.rows.append(StageRow(f"approve-{environment}", label, 0.0, False))
            asking = None
        action = "deploy" if index == 0 else "promote"
        step = (ctx.settings, spec, environment, version, action, approval, serving[environment],
                asking)  # fmt: skip
        released = runner.run(f"deploy-{environment}", deploy_task, *step)
        if released.outcome == "rejected":  # at the last step: traffic went back
            runner.rows.append(StageRow(f"approve-{environment}", "rejected", 0.0, False,
                                        "rejected at the last step"))  # fmt: skip
            return done
        done.append(released)
    return done


def _rejected_row(environment: str, approval: Approval | None, spec: Spec) -> StageRow:
    why = approval.comment if approval else f"no decision within {spec.deploy.approval_timeout} s"
    return StageRow(f"approve-{environment}", "rejected", 0.0, False, why)


def _record_rejection(
    settings: Settings, spec: Spec, environment: str, version: str, approval: Approval | None
) -> None:
    """A rejection or a timeout: the ledger says so and the environment keeps what it serves."""
    who = approval.approver if approval else "timeout"
    why = approval.comment if approval else f"no decision within {spec.deploy.approval_timeout} s"
    approvals.reject(settings, spec, environment, version, who, why or "rejected")
    get_run_logger().warning("%s v%s not deployed to %s: %s", spec.name, version, environment,
                             why)  # fmt: skip


def _wait_for_approval(
    settings: Settings, spec: Spec, environment: str, version: str, description: str
) -> Approval | None:
    """Pause until a person answers (UI form or `modelyard approve`); None on timeout. From a
    task too (a canary's last step): Prefect pauses the task's flow run."""
    deadline = time.monotonic() + spec.deploy.approval_timeout
    get_run_logger().info(
        "waiting for approval to deploy %s v%s to %s: approve in the Prefect UI, or run "
        "`modelyard approve %s` / `modelyard reject %s`",
        spec.name, version, environment, flow_run.id, flow_run.id,
    )  # fmt: skip
    attempt = 0
    while (left := int(deadline - time.monotonic())) > 0:
        attempt += 1
        try:
            decision = pause_flow_run(
                wait_for_input=Approval.with_initial_data(description=description, approve=False),
                timeout=left,
                poll_interval=2,
                key=f"approve-{environment}-{attempt}",
            )
        except FlowPauseTimeout:
            return None
        if approvals.may_decide(spec, environment, decision.approve, decision.approver):
            return decision
        approvers = spec.deploy.environments[environment].approvers
        get_run_logger().warning(
            "%s may not approve %s (allowed: %s); recorded in the ledger, asking again",
            decision.approver, environment, ", ".join(approvers),
        )  # fmt: skip
        approvals.refuse(settings, spec, environment, version, decision.approver)
    return None


def _state_once_settled(flow_run_id: Any, run_id: str, wait: float = 30) -> State | None:
    """The run's state; a run still running gets a moment to reach its pause (an answer typed
    right after the 'waiting for approval' line would otherwise race the pause)."""
    deadline = time.monotonic() + wait
    with get_client(sync_client=True) as client:
        while True:
            try:
                state = client.read_flow_run(flow_run_id).state
            except ObjectNotFound:
                raise ModelyardError(f"no flow run {run_id} in this Prefect") from None
            if state is None or not state.is_running() or time.monotonic() > deadline:
                return state
            time.sleep(1)


def answer_approval(run_id: str, approve: bool, approver: str, comment: str) -> None:
    """Resume a run paused for approval with a decision (what `modelyard approve` calls)."""
    from uuid import UUID

    try:
        flow_run_id = UUID(run_id)
    except ValueError:
        raise ModelyardError(f"{run_id!r} is not a flow run id (a UUID)") from None
    state = _state_once_settled(flow_run_id, run_id)
    if state is None or not state.is_paused():
        now = state.name if state else "unknown"
        raise ModelyardError(f"flow run {run_id} is not waiting for approval (it is {now})")
    decision = {"approve": approve, "approver": approver, "comment": comment}
    resume_flow_run(flow_run_id, run_input=decision)


def _image_and_infra_gate(
    runner: _Stages,
    ctx: stages.RunContext,
    version: str,
    bundle: dict[str, str],
    splits: stages.Splits,
) -> None:
    skipped = stages.image_skipped(ctx)
    if skipped:
        runner.logger.warning("serving image not built: %s", skipped)
        runner.rows.append(StageRow("build-image", "skipped", 0.0, False, skipped))
        stages.note_image_skipped(ctx, version, skipped)
        return
    built = runner.run("build-image", build_image_task, ctx, version, bundle["bundle_path"])
    report = runner.run(
        "validate-infra", infra_gate_task, ctx, version, built, bundle["bundle_path"], splits
    )
    _publish_gate(ctx.spec, report)
    if not report.passed:
        raise GateFailed("infra", report.failures)
    if ctx.settings.image_registry:  # only a validated image reaches the registry
        runner.run("push-image", push_image_task, ctx, version, built)


def _gates_and_register(
    runner: _Stages,
    ctx: stages.RunContext,
    prepared: stages.Prepared,
    refresh: bool,
    tags: dict[str, str],
) -> PipelineOutcome:
    spec, splits = ctx.spec, prepared.splits
    data_result = runner.run(
        "validate-data",
        data_gate_task,
        spec,
        splits,
        refresh=refresh,
        cache_key=stages.data_gate_key(spec, prepared.fingerprint),
    )
    stages.log_data_gate(ctx, data_result)
    _publish_gate(spec, data_result.report)
    if not data_result.report.passed:
        raise GateFailed("data", data_result.report.failures)

    trained_key = stages.train_key(spec, prepared.fingerprint, ctx.git)
    trained = runner.run("train", train_task, spec, splits, cache_key=trained_key, refresh=refresh)
    model_uri = runner.run("log-training", log_training_task, ctx, splits, trained)
    model_report = runner.run("validate-model", model_gate_task, ctx, splits, trained)
    behaviour_report = runner.run(
        "validate-behaviour",
        behaviour_gate_task,
        spec,
        splits,
        trained,
        cache_key=stages.behaviour_key(spec, trained_key),
        refresh=refresh,
    )
    reports = [data_result.report, model_report, behaviour_report]
    for report in reports[1:]:
        stages.log_gate(ctx, report)
        _publish_gate(spec, report)
    failed = [r for r in reports if not r.passed]
    if failed:
        raise GateFailed(" and ".join(r.gate for r in failed), stages.failures(failed))

    exported = runner.run("export", export_task, ctx, splits, trained)
    version, reused = runner.run("register", register_task, ctx, model_uri, reports, tags)
    bundle: dict[str, str] = {}
    if not reused:
        try:
            bundle = runner.run("package", package_task, ctx, version, splits, trained, exported)
            _publish_bundle(spec, version, bundle, exported)
            _image_and_infra_gate(runner, ctx, version, bundle, splits)
        except Exception:
            stages.withdraw(ctx, version)  # a version that cannot ship must not stay registered
            raise
    else:
        tags, bundle_path = stages.version_bundle(ctx, version)
        if not tags.get("image_ref"):  # its first run could not build one (no engine then)
            _image_and_infra_gate(runner, ctx, version, {"bundle_path": bundle_path}, splits)
    runner.run("model-card", model_card_task, ctx, version, splits, trained, reused)
    stages.promote_candidate(ctx, version)
    cached = [row.stage for row in runner.rows if row.cached]
    return stages.registered(ctx, version, reused, trained, cached, str(flow_run.id), bundle)
