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
from modelyard import bundle as bundles
from modelyard.config import Settings
from modelyard.data import features_of
from modelyard.evaluation import scores
from modelyard.package.onnx import export_onnx
from modelyard.package.parity import ParityError, ParityReport, compare
from modelyard.package.pmml import export_pmml, prove_pmml
from modelyard.serve import codecs
from modelyard.serve.runtime import Runtime
from modelyard.spec import Spec

EXAMPLE_ROWS = 5


@dataclass(frozen=True)
class BuiltBundle:
    path: Path
    tarball: Path
    digest: str
    key_id: str
    parity: ParityReport
    pmml_parity: ParityReport | None = None


def signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The configured key, else a dev key generated into the workspace (mode 0600)."""
    if settings.signing_key is not None:
        return bundles.load_private_key(settings.signing_key.get_secret_value().encode())
    if settings.signing_key_file is not None:
        return bundles.load_private_key(settings.signing_key_file.read_bytes())
    return bundles.load_or_create_key(settings.dev_key_path)


def trusted_keys(settings: Settings) -> str:
    """Public keys a local server trusts: the configured ones plus this workspace's signer."""
    own = bundles.public_key_text(signing_key(settings).public_key())
    return ",".join(k for k in (settings.trusted_keys, own) if k)


def schema_of(spec: Spec, eval_frame: pd.DataFrame, eval_scores: np.ndarray) -> dict[str, Any]:
    inputs = [
        {
            "name": f.name,
            "type": f.type,
            "nullable": f.max_missing > 0,
            "categories": f.categories,
            "min": f.min,
            "max": f.max,
        }
        for f in spec.features
    ]
    quantiles = (
        np.quantile(eval_scores, np.linspace(0.05, 0.95, 10)) if spec.task == "regression" else []
    )
    return {
        "task": spec.task,
        "target": spec.target,
        "inputs": inputs,
        "outputs": ["predict"]
        + (["predict_proba"] if spec.task == "binary_classification" else []),
        "prediction_buckets": sorted({float(q) for q in quantiles}),
        "example": frame_columns(eval_frame.loc[:, spec.feature_names].dropna().head(EXAMPLE_ROWS)),
    }


def frame_columns(frame: pd.DataFrame) -> dict[str, list[Any]]:
    """A DataFrame as the JSON columns a client would send: NaN becomes null."""
    return {
        c: [None if isinstance(v, float) and np.isnan(v) else v for v in frame[c].tolist()]
        for c in frame.columns
    }


def prove_onnx(
    spec: Spec, model: Any, verified: bundles.VerifiedBundle, eval_frame: pd.DataFrame
) -> ParityReport:
    runtime = Runtime(verified)
    features = eval_frame.loc[:, spec.feature_names]
    feeds, _ = codecs.to_feeds(frame_columns(features), runtime.columns, max_rows=len(features) + 1)
    prediction = runtime.predict(feeds)
    got = prediction.probabilities if prediction.probabilities is not None else prediction.values
    expected = scores(model, features_of(eval_frame, spec), spec.task)
    tolerance = spec.package.tolerance
    return compare("onnx", expected, got, features, tolerance.rtol, tolerance.atol)


def assemble(
    spec: Spec,
    model: Any,
    onnx_bytes: bytes,
    eval_frame: pd.DataFrame,
    out_dir: Path,
    key: Ed25519PrivateKey,
    metadata: dict[str, Any],
    pmml_bytes: bytes | None = None,
) -> BuiltBundle:
    """Write, seal, verify and prove the bundle; a failed proof leaves no bundle behind."""
    folder = out_dir / "bundle"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    eval_scores = scores(model, features_of(eval_frame, spec), spec.task)
    (folder / "model.onnx").write_bytes(onnx_bytes)
    if pmml_bytes is not None:
        (folder / "model.pmml").write_bytes(pmml_bytes)
    _write_json(folder / "schema.json", schema_of(spec, eval_frame, eval_scores))
    _write_json(
        folder / "metadata.json",
        {
            "model_name": spec.name,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "modelyard_version": modelyard.__version__,
            **metadata,
        },
    )
    digest = bundles.seal(folder, key)
    verified = bundles.verify(folder, [key.public_key()])
    reports = [prove_onnx(spec, model, verified, eval_frame)]
    if pmml_bytes is not None:
        reports.append(prove_pmml(pmml_bytes, spec, model, eval_frame))
    _write_json(out_dir / "parity.json", {r.export: r.to_dict() for r in reports})
    failed = [r for r in reports if not r.passed]
    if failed:
        shutil.rmtree(folder)
        raise ParityError("\n".join(r.describe() for r in failed))
    report = reports[0]
    tarball = out_dir / f"{spec.name}-{metadata.get('model_version', 'candidate')}.bundle.tar.gz"
    tarball.write_bytes(bundles.to_tarball(folder))
    pmml_report = reports[1] if len(reports) > 1 else None
    return BuiltBundle(folder, tarball, digest, verified.key_id, report, pmml_report)


def build_bundle(
    spec: Spec,
    model: Any,
    eval_frame: pd.DataFrame,
    out_dir: Path,
    key: Ed25519PrivateKey,
    metadata: dict[str, Any],
) -> BuiltBundle:
    pmml = export_pmml(model, spec) if spec.package.pmml else None
    return assemble(spec, model, export_onnx(model, spec), eval_frame, out_dir, key, metadata, pmml)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
