"""The data gate: a Great Expectations suite built from the spec, run on both splits.

The suite is derived from the feature declarations (schema, nulls, ranges, categories) and the
table-level expectations, so the spec stays the single source of truth. Data Docs (HTML) are built
into `out_dir/data_docs` for the MLflow run.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from modelyard.checks.report import Check, GateReport
from modelyard.config import disable_telemetry
from modelyard.data import Splits
from modelyard.spec import Spec


def build_expectations(spec: Spec, rows_share: float) -> list[Any]:
    """Expectations for one split; `rows_share` scales the row-count floor to the split's size."""
    import great_expectations as gx

    ex = gx.expectations
    columns = [*spec.feature_names, spec.target]
    out: list[Any] = [
        ex.ExpectTableColumnsToMatchSet(column_set=columns, exact_match=True),
        ex.ExpectTableRowCountToBeBetween(
            min_value=math.ceil(spec.expectations.min_rows * rows_share),
            max_value=spec.expectations.max_rows,
        ),
    ]
    for feature in spec.features:
        kind = "float64" if feature.type == "numeric" else "object"
        out.append(ex.ExpectColumnValuesToBeOfType(column=feature.name, type_=kind))
        out.append(
            ex.ExpectColumnValuesToNotBeNull(column=feature.name, mostly=1.0 - feature.max_missing)
        )
        if feature.min is not None or feature.max is not None:
            out.append(
                ex.ExpectColumnValuesToBeBetween(
                    column=feature.name, min_value=feature.min, max_value=feature.max
                )
            )
        if feature.categories is not None:
            out.append(
                ex.ExpectColumnValuesToBeInSet(column=feature.name, value_set=feature.categories)
            )
    out.extend(_target_expectations(spec))
    return out


def _target_expectations(spec: Spec) -> list[Any]:
    import great_expectations as gx

    ex = gx.expectations
    target = spec.target
    out: list[Any] = [ex.ExpectColumnValuesToNotBeNull(column=target)]
    if spec.task == "binary_classification":
        # Both classes must be present: a one-class target cannot train a classifier.
        out.append(ex.ExpectColumnDistinctValuesToEqualSet(column=target, value_set=[0.0, 1.0]))
    elif spec.task == "multiclass_classification":
        # Two classes are a binary task; fewer cannot train a classifier at all.
        out.append(ex.ExpectColumnUniqueValueCountToBeBetween(column=target, min_value=3))
    elif spec.expectations.target_min is not None or spec.expectations.target_max is not None:
        out.append(
            ex.ExpectColumnValuesToBeBetween(
                column=target,
                min_value=spec.expectations.target_min,
                max_value=spec.expectations.target_max,
            )
        )
    return out


def check_data(spec: Spec, splits: Splits, out_dir: Path) -> GateReport:
    """Run the suite on the train and eval splits; Data Docs land in `out_dir/data_docs`."""
    disable_telemetry()
    import great_expectations as gx

    total = len(splits.train) + len(splits.eval)
    report = GateReport(gate="data")
    with tempfile.TemporaryDirectory(prefix="modelyard-gx-") as root:
        site = Path(root) / "data_docs"
        context = _context(gx, site)
        source = context.data_sources.add_pandas("modelyard")
        for name, frame in (("train", splits.train), ("eval", splits.eval)):
            expectations = build_expectations(spec, len(frame) / max(total, 1))
            # Given whole: adding them one by one would store the suite again for each.
            suite = context.suites.add(
                gx.ExpectationSuite(name=f"{spec.name}.{name}", expectations=expectations)
            )
            batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=name, data=batch, suite=suite)
            )
            checkpoint = context.checkpoints.add(
                gx.Checkpoint(
                    name=f"{name}-checkpoint",
                    validation_definitions=[definition],
                    result_format="SUMMARY",
                )
            )
            result = checkpoint.run(batch_parameters={"dataframe": frame})
            for validation in result.run_results.values():
                report.checks.extend(_checks_from(name, validation))
        context.build_data_docs()  # once, for both splits
        _copy_docs(site, out_dir / "data_docs")
    report.data = {"rows": {"train": len(splits.train), "eval": len(splits.eval)}}
    return report


def _context(gx: Any, site: Path) -> Any:
    """An in-memory Great Expectations context whose Data Docs site is `site`: a file context
    would write its config and re-read it on every variable it looks up (a second per run)."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    docs = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites={"local_site": docs},
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _checks_from(split_name: str, validation: Any) -> list[Check]:
    checks = []
    for item in validation.results:
        config = item.expectation_config
        column = config.kwargs.get("column")
        name = f"{split_name}: {config.type}" + (f"({column})" if column else "")
        checks.append(
            Check(name=name, passed=bool(item.success), detail=_describe(item.result, item.success))
        )
    return checks


def _describe(result: dict[str, Any], success: bool) -> str:
    if "observed_value" in result:
        return f"observed {result['observed_value']!r}"
    count = result.get("unexpected_count")
    if count is None:
        return ""
    text = f"{count} unexpected of {result.get('element_count')}"
    examples = result.get("partial_unexpected_list") or []
    if examples and not success:
        text += f", e.g. {_short(examples)}"
    return text


def _short(values: list[Any]) -> str:
    shown = [v for v in values[:5] if not (isinstance(v, float) and math.isnan(v))]
    return repr(shown) if shown else "nulls"


def _copy_docs(site: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    if site.is_dir():
        shutil.copytree(site, dest)
    os.makedirs(dest, exist_ok=True)
