"""Load the dataset a spec names, give it a content fingerprint, split it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from modelyard.errors import DataError
from modelyard.readers import Source, read_s3, read_sql, read_table
from modelyard.spec import Spec
from modelyard.values import category_text


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    eval: pd.DataFrame


def load_dataset(spec: Spec) -> pd.DataFrame:
    """Rows of the spec's feature and target columns, with declared types applied."""
    return load_with_source(spec)[0]


def load_with_source(spec: Spec) -> tuple[pd.DataFrame, Source]:
    """The typed rows and what was read. Every source's rows are typed the same way, so the
    same table read from a file, S3 or a database has the same fingerprint."""
    frame, source = _read(spec)
    return conform(frame, spec), source


def conform(frame: pd.DataFrame, spec: Spec) -> pd.DataFrame:
    """Select the spec's columns and give them one canonical dtype each, or say what is wrong."""
    wanted = [*spec.feature_names, spec.target]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DataError(
            f"dataset lacks column(s) {missing} named in the spec; it has {list(frame.columns)}"
        )
    if frame.empty:
        raise DataError(
            f"the dataset has no rows ({spec.dataset.describe()}); "
            f"training needs at least expectations.min_rows ({spec.expectations.min_rows})"
        )
    out = frame.loc[:, wanted].reset_index(drop=True)
    for feature in spec.features:
        out[feature.name] = _cast(out[feature.name], feature.type, feature.name)
    if spec.task == "multiclass_classification":
        out[spec.target] = class_labels(out[spec.target], spec.target)
    elif spec.positive_label is not None:
        out[spec.target] = positive_or_not(out[spec.target], spec.target, spec.positive_label)
    else:  # a number, or the 0/1 of a binary target
        out[spec.target] = _cast(out[spec.target], "numeric", spec.target)
    return out


def class_labels(column: pd.Series, name: str) -> pd.Series:
    """A multiclass target: integers where every label is a whole number (the model then
    answers with integers), else text written the way categories are."""
    if column.isna().any():
        raise DataError(
            f"target {name!r} has {int(column.isna().sum())} missing labels; drop those rows"
        )
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.notna().all() and (numbers == numbers.round()).all():
        return numbers.astype("int64")
    return pd.Series([category_text(v) for v in column], index=column.index, dtype=object,
                     name=column.name)  # fmt: skip


def positive_or_not(column: pd.Series, name: str, positive: str) -> pd.Series:
    """A binary target of two labels as 1 (the positive label) and 0 (the other one)."""
    labels = sorted({category_text(v) for v in column.dropna()})
    if positive not in labels or len(labels) != 2:
        raise DataError(
            f"target {name!r} has the labels {labels[:10]}; positive_label {positive!r} must be "
            "one of exactly two (recode the others, or use multiclass_classification)"
        )
    is_positive = [category_text(v) == positive if known else np.nan
                   for v, known in zip(column, column.notna(), strict=True)]  # fmt: skip
    return pd.Series(is_positive, index=column.index, name=column.name, dtype="float64")


def _cast(column: pd.Series, kind: str, name: str) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(column) or looks_like_dates(column):
        raise DataError(
            f"column {name!r} holds dates or times, which modelyard does not expand into "
            "features: derive numbers from it in your data (day of week, hour, days since an "
            "event) and declare those instead, or leave it out of features"
        )
    if kind == "categorical":
        # object dtype with NaN for missing: what scikit-learn's encoders and imputers expect.
        values = [
            category_text(v) if known else np.nan
            for v, known in zip(column, column.notna(), strict=True)
        ]
        return pd.Series(values, index=column.index, dtype=object, name=column.name)
    converted = pd.to_numeric(column, errors="coerce")
    bad = column.notna() & converted.isna()
    if bad.any():
        examples = column[bad].astype(str).unique()[:3].tolist()
        raise DataError(
            f"column {name!r} is declared {kind} but holds non-numeric values such as {examples}; "
            "fix the data or declare the feature categorical"
        )
    return converted.astype("float64")


def looks_like_dates(column: pd.Series) -> bool:
    """Text that is mostly ISO dates or timestamps (a CSV does not type its columns)."""
    if not (column.dtype == object or pd.api.types.is_string_dtype(column)):
        return False
    sample = column.dropna().astype(str).head(50)
    if sample.empty or not sample.str.match(r"^\d{4}-\d{2}-\d{2}").all():
        return False
    return bool(pd.to_datetime(sample, errors="coerce", format="ISO8601").notna().all())


def _read(spec: Spec) -> tuple[pd.DataFrame, Source]:
    dataset = spec.dataset
    if dataset.sql is not None:
        return read_sql(dataset.sql)
    if dataset.generator is not None:
        return _generate(spec), Source(f"generator {dataset.generator}",
                                       f"rows {dataset.rows}, seed {dataset.seed}")  # fmt: skip
    location = dataset.path or ""  # the spec checked that exactly one source is given
    if location.startswith("s3://"):
        return read_s3(location)
    path = spec.resolve(location)
    if not path.is_file():
        raise DataError(f"dataset.path {path} does not exist; fix dataset.path in the spec")
    return read_table(path), Source(location)


def _generate(spec: Spec) -> pd.DataFrame:
    module_name, _, func_name = (spec.dataset.generator or "").partition(":")
    module = _import_beside(spec.source_dir, module_name)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise DataError(f"dataset.generator: {module_name} has no function {func_name!r}")
    frame = func(rows=spec.dataset.rows, seed=spec.dataset.seed)
    if not isinstance(frame, pd.DataFrame):
        raise DataError(
            f"dataset.generator {spec.dataset.generator} must return a pandas DataFrame"
        )
    return frame


def _import_beside(folder: Path, dotted: str) -> ModuleType:
    """Import a module from the spec's folder under a unique name, so two specs never clash."""
    path = folder.joinpath(*dotted.split(".")).with_suffix(".py")
    if not path.is_file():
        raise DataError(f"dataset.generator: module file {path} does not exist")
    unique = "modelyard_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(unique, path)
    assert module_spec and module_spec.loader
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def fingerprint(frame: pd.DataFrame) -> str:
    """SHA-256 of the content: column names, dtypes and every value, in row order."""
    digest = hashlib.sha256()
    schema = [[str(c), str(t)] for c, t in frame.dtypes.items()]
    digest.update(json.dumps(schema).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def split(frame: pd.DataFrame, spec: Spec) -> Splits:
    """Deterministic train/eval split, stratified on the target for classification."""
    strata = frame[spec.target].astype(str) if spec.stratify else None
    try:
        train, evaluation = train_test_split(
            frame, test_size=spec.split.test_size, random_state=spec.split.seed, stratify=strata
        )
    except ValueError as exc:
        raise DataError(
            f"cannot split {len(frame)} rows with split.test_size={spec.split.test_size}: {exc}"
        ) from exc
    return Splits(train=train.reset_index(drop=True), eval=evaluation.reset_index(drop=True))


def features_of(frame: pd.DataFrame, spec: Spec) -> pd.DataFrame:
    return model_input(frame.loc[:, spec.feature_names])


def model_input(features: pd.DataFrame) -> pd.DataFrame:
    """What the model sees: a missing category is the empty string, its own level.

    Strings cannot be NaN in ONNX, so the same convention holds in training, in the exported
    model and in the serving codecs; numeric gaps stay NaN and are imputed inside the model.
    """
    text = [c for c in features.columns if features[c].dtype == object]
    if not text:
        return features
    return features.assign(**{c: features[c].fillna("") for c in text})
