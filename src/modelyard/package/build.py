"""Assemble, seal and prove the model bundle.

The ONNX export is proven through the serving code itself: the sealed bundle is verified and
loaded by `modelyard.serve.runtime`, and the whole evaluation split goes through the same input
validation the server applies to requests. What passes here is what the server will compute.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import modelyard
from modelyard import bins as drift_bins
from modelyard import bundle as bundles
from modelyard.data import features_of
from modelyard.evaluation import classes_of, scores
from modelyard.package.forest import export_forest
from modelyard.package.onnx import export_onnx, onnx_input_names
from modelyard.package.parity import ParityError, ParityReport, compare
from modelyard.package.pmml import pmml_for, prove_pmml
from modelyard.serve import codecs
from modelyard.serve.forest import BUNDLE_FILE as FOREST
from modelyard.serve.runtime import Runtime
from modelyard.spec import Spec
from modelyard.values import category_text

EXAMPLE_ROWS = 5


@dataclass(frozen=True)
class BuiltBundle:
    path: Path
    tarball: Path
    digest: str
    key_id: str
    parity: ParityReport
    pmml_parity: ParityReport | None = None


def schema_of(
    spec: Spec,
    onnx_names: list[str],
    eval_frame: pd.DataFrame,
    eval_scores: np.ndarray,
    classes: list | None = None,
) -> dict[str, Any]:
    """`classes`: a multiclass model's labels, in its probability columns' order."""
    inputs = [
        {
            "name": f.name,
            "onnx_name": onnx_name,
            "type": f.type,
            "nullable": f.max_missing > 0,
            "categories": f.categories,
            "min": f.min,
            "max": f.max,
        }
        for f, onnx_name in zip(spec.features, onnx_names, strict=True)
    ]
    quantiles = (
        np.quantile(eval_scores, np.linspace(0.05, 0.95, 10)) if spec.task == "regression" else []
    )
    return {
        "task": spec.task,
        "target": spec.target,
        "inputs": inputs,
        "outputs": ["predict"] + (["predict_proba"] if spec.task != "regression" else []),
        **({"classes": classes} if spec.task == "multiclass_classification" else {}),
        "prediction_buckets": sorted({float(q) for q in quantiles}),
        "example": frame_columns(eval_frame.loc[:, spec.feature_names].dropna().head(EXAMPLE_ROWS)),
        "reference": reference_of(spec, eval_frame, eval_scores, classes),
        "monitoring": {
            "drift_threshold": spec.monitoring.drift_threshold,
            "drift_min_rows": spec.monitoring.min_rows,
            "latency_budget_seconds": (
                spec.monitoring.latency_budget_ms or spec.behaviour.latency.budget_ms
            )
            / 1000,
        },
    }


def reference_of(
    spec: Spec, eval_frame: pd.DataFrame, eval_scores: np.ndarray, classes: list | None = None
) -> dict[str, Any]:
    """Drift bins with the evaluation split's shares: what live traffic is compared against.

    The evaluation split is held out of fitting but drawn from the training data, and it is
    the split the predictions' reference (the model's scores on it) comes from. A multiclass
    model's predictions are binned by predicted class.
    """
    features = {}
    for f in spec.features:
        values = eval_frame[f.name].tolist()
        features[f.name] = (
            drift_bins.numeric_bins(values)
            if f.type == "numeric"
            else drift_bins.categorical_bins(values, f.categories)
        ).to_json()
    if spec.task == "multiclass_classification":
        texts = [category_text(c) for c in classes or []]
        predicted = [texts[i] for i in np.asarray(eval_scores).argmax(axis=1)]
        prediction = drift_bins.categorical_bins(predicted, texts)
    else:
        scores = [float(s) for s in eval_scores]
        edges = drift_bins.PROBABILITY_EDGES if spec.task == "binary_classification" else None
        prediction = drift_bins.numeric_bins(scores, edges)
    return {"features": features, "prediction": prediction.to_json()}


def frame_columns(frame: pd.DataFrame) -> dict[str, list[Any]]:
    """A DataFrame as the JSON columns a client would send: NaN becomes null."""
    return {
        c: [None if isinstance(v, float) and np.isnan(v) else v for v in frame[c].tolist()]
        for c in frame.columns
    }


def prove_onnx(
    spec: Spec, verified: bundles.VerifiedBundle, eval_frame: pd.DataFrame, expected: np.ndarray
) -> ParityReport:
    """`expected`: scikit-learn's scores on `eval_frame` (evaluation.scores)."""
    runtime = Runtime(verified)
    features = eval_frame.loc[:, spec.feature_names]
    feeds, _ = codecs.to_feeds(frame_columns(features), runtime.columns, max_rows=len(features) + 1)
    prediction = runtime.predict(feeds)
    got = prediction.probabilities if prediction.probabilities is not None else prediction.values
    # Multiclass: a row of probabilities per row, columns in the model's class order.
    tolerance = spec.package.tolerance
    return compare("onnx", expected, got, features, tolerance.rtol, tolerance.atol)


def seal_bundle(
    spec: Spec,
    onnx_bytes: bytes,
    pmml_bytes: bytes | None,
    eval_frame: pd.DataFrame,
    expected: np.ndarray,
    folder: Path,
    key: Ed25519PrivateKey,
    metadata: dict[str, Any],
    classes: list | None = None,
    encryption: bundles.Encryption | None = None,
) -> bundles.VerifiedBundle:
    """Write the bundle's files into `folder` (replacing it), sign the manifest, verify it.
    `classes`: a classifier's labels, in the order of its probability columns. With
    `encryption`, the model and its schema are written encrypted: never in the clear."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    schema = schema_of(spec, onnx_input_names(onnx_bytes), eval_frame, expected, classes)
    trees = export_forest(onnx_bytes)
    files = {
        "model.onnx": onnx_bytes,
        **({"model.pmml": pmml_bytes} if pmml_bytes is not None else {}),
        **({FOREST: trees.archive} if trees.archive is not None else {}),
        "schema.json": _json_bytes(schema),
        "metadata.json": _json_bytes({
            "model_name": spec.name,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "modelyard_version": modelyard.__version__,
            "tree_kernel": trees.note,
            **metadata,
        }),
    }  # fmt: skip
    sealed = [n for n in files if n in bundles.ENCRYPTED] if encryption else []
    for name, data in files.items():
        write = (
            bundles.encrypt(data, name, encryption.key) if encryption and name in sealed else data
        )
        (folder / name).write_bytes(write)
    extra = {"encryption": encryption.manifest_entry(sealed)} if encryption else None
    bundles.seal(folder, key, extra)
    return bundles.verify(folder, [key.public_key()], [encryption.key] if encryption else [])


def pack(verified: bundles.VerifiedBundle, out_dir: Path) -> Path:
    """The reproducible `<model>-<version>.bundle.tar.gz` beside the bundle folder."""
    meta = verified.read_json("metadata.json")
    tarball = (
        out_dir / f"{meta['model_name']}-{meta.get('model_version', 'candidate')}.bundle.tar.gz"
    )
    tarball.write_bytes(bundles.to_tarball(verified.path))
    return tarball


def write_parity(out_dir: Path, reports: dict[str, dict[str, Any]]) -> Path:
    path = out_dir / "parity.json"
    _write_json(path, reports)
    return path


def assemble(
    spec: Spec,
    onnx_bytes: bytes,
    eval_frame: pd.DataFrame,
    expected: np.ndarray,
    out_dir: Path,
    key: Ed25519PrivateKey,
    metadata: dict[str, Any],
    pmml_bytes: bytes | None = None,
    classes: list | None = None,
    encryption: bundles.Encryption | None = None,
) -> BuiltBundle:
    """Write, seal, verify and prove the bundle; a failed proof leaves no bundle behind.

    `expected`: scikit-learn's scores on `eval_frame`, which every export must reproduce;
    `classes`: a classifier's labels, in the order of its probability columns.
    """
    folder = out_dir / "bundle"
    verified = seal_bundle(
        spec, onnx_bytes, pmml_bytes, eval_frame, expected, folder, key, metadata, classes,
        encryption,
    )  # fmt: skip
    reports = [prove_onnx(spec, verified, eval_frame, expected)]
    if pmml_bytes is not None:
        reports.append(prove_pmml(pmml_bytes, spec, eval_frame, expected, classes))
    write_parity(out_dir, {r.export: r.to_dict() for r in reports})
    failed = [r for r in reports if not r.passed]
    if failed:
        shutil.rmtree(folder)
        raise ParityError("\n".join(r.describe() for r in failed))
    pmml_report = reports[1] if len(reports) > 1 else None
    return BuiltBundle(
        folder, pack(verified, out_dir), verified.digest, verified.key_id, reports[0], pmml_report
    )


def build_bundle(
    spec: Spec,
    model: Any,
    eval_frame: pd.DataFrame,
    out_dir: Path,
    key: Ed25519PrivateKey,
    metadata: dict[str, Any],
    encryption: bundles.Encryption | None = None,
) -> BuiltBundle:
    pmml, _ = pmml_for(model, spec)
    expected = scores(model, features_of(eval_frame, spec), spec.task)
    classes = None if spec.task == "regression" else classes_of(model)
    return assemble(
        spec, export_onnx(model, spec), eval_frame, expected, out_dir, key, metadata, pmml,
        classes, encryption,
    )  # fmt: skip


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_bytes(_json_bytes(payload))


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
