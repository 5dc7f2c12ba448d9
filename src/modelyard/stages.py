"""The pipeline's stages as plain functions: what each does, independent of any orchestrator.

`flows/pipeline.py` wires these into a Prefect flow (retries, caching, artifacts); anything else,
a test or another orchestrator, can call them directly in the same order.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import sklearn
from mlflow import MlflowClient

import modelyard
from modelyard import registry
from modelyard.bundle import bundle_key_id, from_tarball
from modelyard.checks.behaviour import BUILTIN as BUILTIN_TESTS
from modelyard.checks.behaviour import run_model_tests
from modelyard.checks.model import check_model
from modelyard.checks.report import GateReport
from modelyard.config import Settings
from modelyard.data import Splits, features_of, fingerprint, load_with_source, split
from modelyard.deploy import approvals, card
from modelyard.lineage import GitInfo, library_tags, spec_in_repository
from modelyard.outcomes import PipelineOutcome
from modelyard.package import image, push, sealing
from modelyard.package.build import (
    assemble,
    frame_columns,
    pack,
    seal_bundle,
    write_parity,
)
from modelyard.package.image import ImageResult, image_build_skipped
from modelyard.package.keys import signing_key, trusted_keys
from modelyard.package.onnx import export_onnx
from modelyard.package.parity import ParityError
from modelyard.package.pmml import pmml_for
from modelyard.package.validate import infra_validate
from modelyard.spec import Spec
from modelyard.train import TrainResult, fit_and_evaluate

INFRA_SAMPLE_ROWS = 200


@dataclass(frozen=True)
class Prepared:
    """The dataset, split, with the fingerprint every cache key and lineage tag starts from."""

    frame: pd.DataFrame
    splits: Splits
    fingerprint: str
    source: str  # what was read (file, S3 object version, query hash); no secret

    @property
    def detail(self) -> str:
        return f"{len(self.frame)} rows from {self.source}, fingerprint {self.fingerprint[:12]}"


@dataclass(frozen=True)
class RunContext:
    spec: Spec
    settings: Settings
    git: GitInfo
    experiment_id: str
    run_id: str
    data_fingerprint: str
    spec_path: Path
    data_source: str = ""

    @property
    def run_url(self) -> str:
        return registry.run_url(self.settings, self.experiment_id, self.run_id)

    @property
    def lineage(self) -> dict[str, str]:
        return lineage_tags(self.git, self.data_fingerprint, self.data_source, self.spec)

    @cached_property
    def client(self) -> MlflowClient:
        """The run's MLflow client, built once (a frozen dataclass may cache in its __dict__)."""
        return registry.connect(self.settings)


def lineage_tags(git: GitInfo, fingerprint: str, source: str, spec: Spec) -> dict[str, str]:
    """Where a model came from, as the training run and the registered version both record it:
    what `registry.existing_version` compares to reuse a version, and what a rebuild reads."""
    return {
        "git_commit": git.commit,
        "git_branch": git.branch,
        "git_dirty": str(git.dirty).lower(),
        "data_fingerprint": fingerprint,
        "data_source": source,
        "spec_hash": spec.digest(),
    }


@dataclass
class DataGateResult:
    report: GateReport
    docs: bytes = field(repr=False)  # Data Docs site as .tar.gz, so a cached result carries it


@contextmanager
def _scratch(prefix: str) -> Iterator[Path]:
    """A temporary working folder, removed when the stage is done with it."""
    with tempfile.TemporaryDirectory(
        prefix=f"modelyard-{prefix}-", ignore_cleanup_errors=True
    ) as folder:
        yield Path(folder)


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def prepare(spec: Spec) -> Prepared:
    frame, source = load_with_source(spec)
    return Prepared(frame, split(frame, spec), fingerprint(frame), str(source))


# --- cache keys: everything a stage's result depends on, nothing it does not -------------------


def data_gate_key(spec: Spec, data_fingerprint: str) -> str:
    sections = spec.digest("task", "features", "target", "expectations", "split")
    return _sha(
        "data",
        data_fingerprint,
        sections,
        importlib.metadata.version("great-expectations"),
        modelyard.__version__,
    )


def train_key(spec: Spec, data_fingerprint: str, git: GitInfo) -> str:
    # The commit is part of the key: lineage tags must name the commit the model was trained at.
    return _sha(
        "train",
        data_fingerprint,
        spec.training_digest,
        git.commit,
        str(git.dirty),
        sklearn.__version__,
        modelyard.__version__,
    )


def behaviour_key(spec: Spec, trained_key: str) -> str:
    own = spec.behaviour.tests
    folders = [BUILTIN_TESTS, *([spec.resolve(own)] if own is not None else [])]
    return _sha("behaviour", trained_key, spec.digest("behaviour"), *map(_folder_digest, folders))


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*.py")) if folder.is_dir() else []:
        digest.update(str(file.relative_to(folder)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


# --- stages ----------------------------------------------------------------------------------


def open_run(
    spec: Spec,
    spec_path: Path,
    settings: Settings,
    git: GitInfo,
    data: Prepared,
    extra_tags: dict[str, str],
) -> RunContext:
    client = registry.connect(settings)
    experiment_id = registry.ensure_experiment(client, spec.name, settings)
    tags = {
        **lineage_tags(git, data.fingerprint, data.source, spec),
        **library_tags(),
        "spec_path": spec_in_repository(spec_path) if spec_path.is_file() else "",
        "modelyard_version": modelyard.__version__,
        "mlflow.source.git.commit": git.commit,
        **extra_tags,
    }
    run_id = registry.start_run(client, experiment_id, f"{spec.name}-{git.short}", tags)
    registry.log_json(client, run_id, spec.model_dump(mode="json", by_alias=True), "spec/spec.json")
    if spec_path.is_file():
        registry.log_files(client, run_id, [spec_path], "spec")
    return RunContext(spec, settings, git, experiment_id, run_id, data.fingerprint, spec_path,
                      data.source)  # fmt: skip


def data_gate(spec: Spec, splits: Splits) -> DataGateResult:
    # Great Expectations takes ~3 s to import: only a run whose data gate is not cached pays it,
    # not every flow process at start.
    from modelyard.checks.data import check_data

    with _scratch("data-gate") as work:
        report = check_data(spec, splits, work)
        return DataGateResult(report=report, docs=_pack(work / "data_docs"))


def log_data_gate(ctx: RunContext, result: DataGateResult) -> None:
    with _scratch("data-docs") as work:
        _unpack(result.docs, work / "data_docs")
        registry.log_gate(ctx.client, ctx.run_id, result.report, extra=work / "data_docs")


def train(spec: Spec, splits: Splits) -> TrainResult:
    return fit_and_evaluate(spec, splits)


def log_training(ctx: RunContext, splits: Splits, trained: TrainResult) -> str:
    """Log the training outcome to the run; returns the logged model's URI."""
    spec = ctx.spec
    with _scratch("plots") as work:
        from modelyard import plots  # matplotlib: half a second a flow process need not pay

        files = plots.render(
            spec.task, splits.eval[spec.target].to_numpy(), trained.eval_scores, work,
            trained.classes,
        )  # fmt: skip
        example = features_of(splits.eval, spec).dropna().head(5)
        return registry.log_training(
            ctx.client,
            ctx.run_id,
            trained.model,
            trained.params,
            trained.metrics,
            example=example,
            example_scores=trained.model.predict(example),
            files=files,
        )


def model_gate(ctx: RunContext, splits: Splits, trained: TrainResult) -> GateReport:
    spec = ctx.spec
    champion = None
    if spec.gates.champion.enabled:
        client = ctx.client
        champion = registry.load_alias(client, spec.name, spec.gates.champion.alias)
    return check_model(
        spec, splits.eval, trained.metrics, trained.eval_scores, champion, trained.classes
    )


def behaviour_gate(spec: Spec, splits: Splits, trained: TrainResult) -> GateReport:
    with _scratch("behaviour") as work:
        return run_model_tests(spec, trained.model, splits.eval, work)


def register(
    ctx: RunContext, model_uri: str, reports: list[GateReport], extra_tags: dict[str, str]
) -> tuple[str, bool]:
    """Register the candidate, or reuse the version of an identical earlier run.

    Returns (version, reused). Only called when every gate passed.
    """
    client = ctx.client
    tags = {
        **ctx.lineage,
        **library_tags(),
        "spec_path": spec_in_repository(ctx.spec_path) if ctx.spec_path.is_file() else "",
        "mlflow_run_id": ctx.run_id,
        **{f"gate.{r.gate}": r.verdict for r in reports},
        **extra_tags,
    }
    existing = registry.existing_version(client, ctx.spec.name, tags)
    if existing is not None:
        return existing.version, True
    version = registry.register(
        client, model_uri, ctx.spec.name, tags | {"mlflow_run_url": ctx.run_url}
    )
    return version, False


def promote_candidate(ctx: RunContext, version: str) -> None:
    """The last step of a successful run: only a fully packaged version becomes `candidate`."""
    client = ctx.client
    registry.set_alias(client, ctx.spec.name, registry.CANDIDATE, version)


def withdraw(ctx: RunContext, version: str) -> None:
    registry.withdraw(ctx.client, ctx.spec.name, version)


def log_gate(ctx: RunContext, report: GateReport) -> None:
    registry.log_gate(ctx.client, ctx.run_id, report)


def close_run(ctx: RunContext, failure: str | None = None) -> None:
    """End the training run: FINISHED, or FAILED with why."""
    registry.end_run(ctx.client, ctx.run_id, failure=failure)


def registered(
    ctx: RunContext, version: str, reused: bool, trained: TrainResult, cached: list[str],
    flow_run_id: str, bundle: dict[str, str],
) -> PipelineOutcome:  # fmt: skip
    """Record on the training run what it registered, and say so to the caller."""
    registry.set_run_tags(
        ctx.client, ctx.run_id, {"registered_version": version, "cached_stages": ",".join(cached)}
    )
    return PipelineOutcome(
        model=ctx.spec.name, version=version, reused_version=reused, mlflow_run_id=ctx.run_id,
        mlflow_run_url=ctx.run_url,
        mlflow_version_url=registry.version_url(ctx.settings, ctx.spec.name, version),
        flow_run_id=flow_run_id, metrics=dict(trained.metrics), cached_stages=cached,
        bundle=bundle,
    )  # fmt: skip


def model_card(
    ctx: RunContext, version: str, splits: Splits, trained: TrainResult, measured: bool
) -> card.Card:
    """The version's model card, after its gates: what the record lacks is measured once
    (unless `measured`: a reused version's run has it), then the card is rendered from the
    record and kept with the version."""
    if not measured:
        facts = card.measure(ctx.spec, splits, trained.model, trained.eval_scores, trained.classes)
        registry.log_json(ctx.client, ctx.run_id, facts, card.FACTS)
    return card.publish(ctx.settings, ctx.spec.name, version)


def approval_request(
    ctx: RunContext, environment: str, outcome: PipelineOutcome, serving: list[str]
) -> str:
    """What an approver of `environment` is shown for the version this run registered."""
    version = ctx.client.get_model_version(ctx.spec.name, outcome.version)
    links = {"MLflow version": outcome.mlflow_version_url, "training run": outcome.mlflow_run_url,
             "model card": f"{outcome.mlflow_run_url} → artifacts card/card.html"}  # fmt: skip
    return approvals.request(
        ctx.spec, environment, outcome.version, outcome.metrics, version.tags, links, serving
    )


@dataclass(frozen=True)
class Export:
    """The exports, proven on the whole evaluation split; `parity` has one report per export."""

    onnx: bytes = field(repr=False)
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)
    pmml: bytes | None = field(default=None, repr=False)


def export(ctx: RunContext, splits: Splits, trained: TrainResult) -> Export:
    """Export to ONNX (and PMML) and prove it, before anything is registered."""
    onnx = export_onnx(trained.model, ctx.spec)
    pmml, pmml_skipped = pmml_for(trained.model, ctx.spec)
    with _scratch("export") as work:
        try:
            built = assemble(
                ctx.spec, onnx, splits.eval, trained.eval_scores, work, signing_key(ctx.settings),
                {"model_version": "unregistered"}, pmml, trained.classes,
                sealing.encryption(ctx.settings),
            )  # fmt: skip
        except ParityError:
            worst = [work / "parity.json"]  # the rows that broke parity
            registry.log_files(ctx.client, ctx.run_id, worst, "package")
            raise
    parity = {r.export: r.to_dict() for r in (built.parity, built.pmml_parity) if r}
    if pmml_skipped:
        parity["pmml"] = {"skipped": pmml_skipped}
    registry.log_json(ctx.client, ctx.run_id, parity, "package/parity.json")
    return Export(onnx=onnx, parity=parity, pmml=pmml)


def package(
    ctx: RunContext, version: str, splits: Splits, trained: TrainResult, exported: Export
) -> dict[str, str]:
    """Seal the bundle for a registered version, log it to its run and tag the version.

    The exports inside are the bytes `export` proved, so the proof is carried, not repeated.
    """
    out = registry.bundle_folder(ctx.settings, ctx.spec.name, version)
    metadata = {
        "model_version": version,
        "git_commit": ctx.git.commit,
        "git_dirty": ctx.git.dirty,
        "data_fingerprint": ctx.data_fingerprint,
        "spec_hash": ctx.spec.digest(),
        "metrics": trained.metrics,
        "mlflow_run_id": ctx.run_id,
    }
    encryption = sealing.encryption(ctx.settings)
    verified = seal_bundle(
        ctx.spec, exported.onnx, exported.pmml, splits.eval, trained.eval_scores,
        out / "bundle", signing_key(ctx.settings), metadata, trained.classes, encryption,
    )  # fmt: skip
    tarball = pack(verified, out)
    sealed = [tarball, write_parity(out, exported.parity)]
    registry.log_files(ctx.client, ctx.run_id, sealed, "bundle")
    tags = {
        "bundle_digest": verified.digest,
        "bundle_key_id": verified.key_id,
        "bundle_artifact": f"runs:/{ctx.run_id}/bundle/{tarball.name}",
        # Whether large batches of a tree ensemble go through the tree kernel, or why not.
        "tree_kernel": verified.read_json("metadata.json")["tree_kernel"],
        # Which key opens it (never the key): the settings' key id, and KMS's key when wrapped.
        **({"bundle_encryption_key_id": bundle_key_id(encryption.key),
            "bundle_encryption": "kms" if encryption.kms_key else "key"} if encryption else {}),
    }  # fmt: skip
    registry.tag_version(ctx.client, ctx.spec.name, version, tags)
    return tags | {"bundle_path": str(verified.path)}


def version_bundle(ctx: RunContext, version: str) -> tuple[dict[str, str], str]:
    """A registered version's tags and its verified bundle folder, unpacked from its tarball
    (here or in MLflow) when this workspace has no copy: a rerun that reuses a version may
    still have its image to build."""
    client = ctx.client
    tags = dict(client.get_model_version(ctx.spec.name, version).tags)
    folder = registry.bundle_folder(ctx.settings, ctx.spec.name, version) / "bundle"
    if not (folder / "manifest.json").is_file():
        archive = registry.bundle_archive(ctx.settings, ctx.spec.name, version, tags)
        from_tarball(archive.read_bytes(), folder)
    return tags, str(folder)


def image_skipped(ctx: RunContext) -> str | None:
    return image_build_skipped(ctx.settings)


def build_image(ctx: RunContext, version: str, bundle_path: str) -> ImageResult:
    """Build the serving image, log its SBOM and tag the version with the image."""
    built = image.build_image(ctx.settings, Path(bundle_path), trusted_keys(ctx.settings), _log)
    registry.log_json(ctx.client, ctx.run_id, built.sbom, "image/sbom.cdx.json")
    tags = {"image_ref": built.ref, "image_id": built.image_id,
            "image_size_mb": f"{built.size_bytes / 1e6:.0f}"}  # fmt: skip
    registry.tag_version(ctx.client, ctx.spec.name, version, tags)
    return built


def push_image(ctx: RunContext, version: str, built: ImageResult) -> dict[str, str]:
    """Push the validated image to the configured registry; the version's `image_ref`
    becomes its reference by digest, which is what every host pulls."""
    bundle_digest = built.labels.get("io.modelyard.bundle.digest", "")
    pushed = push.push_image(
        ctx.settings, built.ref, ctx.spec.name, version, bundle_digest, _log
    )  # fmt: skip
    tags = {"image_ref": pushed.ref, "image_local_ref": built.ref,
            "image_repository": pushed.repository, "image_tag": pushed.tag,
            "image_digest": pushed.digest}  # fmt: skip
    registry.tag_version(ctx.client, ctx.spec.name, version, tags)
    return tags


def note_image_skipped(ctx: RunContext, version: str, reason: str) -> None:
    client = ctx.client
    registry.tag_version(client, ctx.spec.name, version, {"image_skipped": reason})


def infra_gate(
    ctx: RunContext, version: str, built: ImageResult, bundle_path: str, splits: Splits
) -> GateReport:
    sample = frame_columns(splits.eval.loc[:, ctx.spec.feature_names].head(INFRA_SAMPLE_ROWS))
    report = infra_validate(ctx.settings, built.ref, Path(bundle_path), trusted_keys(ctx.settings),
                            sample, _log)  # fmt: skip
    registry.log_gate(ctx.client, ctx.run_id, report)
    client = ctx.client
    registry.tag_version(client, ctx.spec.name, version, {"gate.infra": report.verdict})
    return report


def _log(message: str) -> None:
    logging.getLogger("modelyard").info(message)


def failures(reports: list[GateReport]) -> list[str]:
    """Failed checks; prefixed with their gate only when more than one gate failed."""
    failed = [r for r in reports if not r.passed]
    if len(failed) == 1:
        return failed[0].failures
    return [f"{r.gate}: {f}" for r in failed for f in r.failures]


def _pack(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        if folder.is_dir():
            tar.add(folder, arcname=".")
    return buffer.getvalue()


def _unpack(blob: bytes, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
