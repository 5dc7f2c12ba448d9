"""Optional PMML export (sklearn2pmml, needs Java), proven with an independent evaluator
(JPMML-Evaluator through jpmml_evaluator), for teams that score with a JVM.

sklearn2pmml checks the scikit-learn version it was built for: 0.133 supports up to 1.9.0,
which is why constraints.txt pins scikit-learn 1.9.0 (docs/serving.md).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from modelyard import estimators
from modelyard.data import features_of
from modelyard.package.onnx import ExportError
from modelyard.package.parity import ParityReport, compare
from modelyard.spec import Spec

# The converter is a JVM run for a second, and the evaluator's (JPype's, in this process) scores
# a few hundred rows: serial GC and the client compiler only, not G1's threads and C2. Measured:
# 1.3 s of CPU per export against 2.7 s (0.96 s wall against 1.6 s); a first proof in a process
# 1.8 s of CPU against 5.0 s (1.4 s wall against 3.0 s).
_JVM_OPTIONS = ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"]


def _require_java() -> None:
    if shutil.which("java") is None:
        raise ExportError(
            "package.pmml is on but no Java runtime is installed; install one "
            "(apt-get install default-jre-headless) or set package.pmml: false"
        )


def pmml_for(model: Any, spec: Spec) -> tuple[bytes | None, str | None]:
    """The PMML export the spec asks for, or why there is none: not asked for, or an estimator
    whose scores PMML cannot reproduce (then skipped, the reason recorded with the parity)."""
    if not spec.package.pmml:
        return None, None
    gap = estimators.pmml_gap(spec.estimator.class_)
    if gap is not None:
        return None, f"PMML skipped for {spec.estimator.class_}: {gap}"
    return export_pmml(model, spec), None


def export_pmml(model: Any, spec: Spec) -> bytes:
    _require_java()
    try:
        from sklearn2pmml import make_pmml_pipeline, sklearn2pmml
    except ImportError as exc:
        raise ExportError(
            "package.pmml needs the pmml extra: pip install 'modelyard[pmml]'"
        ) from exc
    pipeline = make_pmml_pipeline(
        model, active_fields=spec.feature_names, target_fields=[spec.target]
    )
    with tempfile.TemporaryDirectory(prefix="modelyard-pmml-") as tmp:
        target = Path(tmp) / "model.pmml"
        try:
            sklearn2pmml(pipeline, str(target), java_opts=_JVM_OPTIONS)
        except RuntimeError as exc:
            raise ExportError(
                f"sklearn2pmml cannot export {spec.estimator.class_} ({exc}); check that the "
                "installed scikit-learn is one sklearn2pmml supports, or set package.pmml: false"
            ) from exc
        return target.read_bytes()


def prove_pmml(
    pmml: bytes,
    spec: Spec,
    eval_frame: pd.DataFrame,
    expected: np.ndarray,
    classes: list | None = None,
) -> ParityReport:
    """`expected`: scikit-learn's scores on `eval_frame` (evaluation.scores)."""
    from jpmml_evaluator import make_evaluator

    features = features_of(eval_frame, spec)
    with tempfile.TemporaryDirectory(prefix="modelyard-pmml-") as tmp:
        path = Path(tmp) / "model.pmml"
        path.write_bytes(pmml)
        _start_jvm()
        evaluator = make_evaluator(str(path), backend="jpype").verify()
        result = evaluator.evaluateAll(features)
    got = _scores_of(result, spec, classes)
    tolerance = spec.package.tolerance
    return compare(
        "pmml", expected, got, eval_frame.loc[:, spec.feature_names], tolerance.rtol, tolerance.atol
    )


def _start_jvm() -> None:
    """JPype's JVM, once per process, with `_JVM_OPTIONS` and the evaluator's own classpath
    (jpmml_evaluator would start it with the JVM's defaults)."""
    import jpype
    from jpmml_evaluator import _classpath

    if not jpype.isJVMStarted():
        jpype.startJVM(*_JVM_OPTIONS, classpath=_classpath([]))


def _scores_of(result: pd.DataFrame, spec: Spec, classes: list | None) -> np.ndarray:
    if spec.task == "regression":
        return result[spec.target].to_numpy(dtype=float)
    if spec.task == "multiclass_classification":
        columns = [f"probability({c})" for c in classes or []]
        lacking = [c for c in columns if c not in result.columns]
        if lacking:
            raise ExportError(
                f"the PMML of {spec.estimator.class_} gives no {lacking[0]} (it gives "
                f"{list(result.columns)}), so it cannot be proven; set package.pmml: false"
            )
        return result[columns].to_numpy(dtype=float)
    positive = [c for c in result.columns if c.startswith("probability(") and float(c[12:-1]) == 1]
    if not positive:
        raise ExportError(
            f"the PMML of {spec.estimator.class_} gives no probability of class 1 (it gives "
            f"{list(result.columns)}), so it cannot be proven; set package.pmml: false"
        )
    return result[positive[0]].to_numpy(dtype=float)
