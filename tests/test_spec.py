"""An invalid spec fails before any work, naming the field, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from modelyard.errors import SpecError
from modelyard.spec import load_spec
from tests.conftest import ROOT, invoke_cli

HOUSE = ROOT / "examples" / "house_prices" / "modelyard.yaml"


def write(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(HOUSE.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value
    path = tmp_path / "modelyard.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"task": "clustering"},
            [
                "task:",
                "'regression', 'binary_classification' or 'multiclass_classification'",
                "'clustering'",
            ],
        ),
        (
            {"estimator__class": "sklearn.linear_model.LinearRegresion"},
            [
                "estimator:",
                "cannot import 'sklearn.linear_model.LinearRegresion'",
                "full import path",
            ],
        ),
        (
            {"estimator__params": {"alpah": 1}},
            ["estimator:", "no parameter(s) ['alpah']", "fit_intercept"],
        ),
        (
            {"features__0__type": "text"},
            ["features[0].type:", "'numeric' or 'categorical'", "'text'"],
        ),
        (
            {"gates__metrics": {"roc_auc": {"min": 0.8}}},
            ["'roc_auc' is not a regression metric", "r2"],
        ),
        ({"split__test_size": 1.5}, ["split.test_size:", "less than 1", "1.5"]),
        ({"dataset__path": "houses.csv"}, ["dataset:", "exactly one of 'path'"]),
        (
            {"behaviour__directional__0__feature": "size"},
            ["behaviour.directional[0].feature: 'size' is not a feature"],
        ),
        ({"colour": "blue"}, ["colour: unknown field"]),
        ({"target": "area"}, ["target 'area' is also listed as a feature"]),
        (
            {"features__1__min": 5, "features__1__max": 1},
            ["features[1]:", "min (5.0) is larger than max (1.0)"],
        ),
    ],
)
def test_invalid_spec_names_field_value_and_fix(tmp_path, changes, expected):
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, **changes))
    for text in expected:
        assert text in str(caught.value)


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, task="clustering", split__test_size=0))
    assert "2 problem(s)" in str(caught.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="does not exist; pass --spec"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_examples_are_valid_and_hash_is_stable():
    first, second = load_spec(HOUSE), load_spec(HOUSE)
    assert first.digest() == second.digest()
    assert (
        load_spec(ROOT / "examples" / "ad_clicks" / "modelyard.yaml").task
        == "binary_classification"
    )


def test_training_digest_ignores_gates_but_not_estimator(tmp_path):
    base = load_spec(HOUSE)
    gated = load_spec(write(tmp_path, gates__metrics={"r2": {"min": 0.1}}))
    assert gated.training_digest == base.training_digest and gated.digest() != base.digest()
    (tmp_path / "b").mkdir()
    tuned = load_spec(write(tmp_path / "b", estimator__params={"fit_intercept": False}))
    assert tuned.training_digest != base.training_digest


def test_cli_validate_spec_exit_codes(tmp_path):
    ok = invoke_cli("validate-spec", "--spec", str(HOUSE))
    assert ok.exit_code == 0 and "house_prices" in ok.stdout
    bad = invoke_cli("validate-spec", "--spec", str(write(tmp_path, task="clustering")))
    assert bad.exit_code == 2
    assert "task:" in bad.stderr and "'clustering'" in bad.stderr


def test_every_command_runs_as_python_m_modelyard_cli() -> None:
    """`python -m modelyard.cli CMD` is the CLI too, for every command (doctor and aws were
    registered after the module's __main__ block once, and were missing there)."""
    import subprocess
    import sys

    from modelyard.cli import app

    names = sorted(c.name or c.callback.__name__ for c in app.registered_commands)
    names += sorted(g.name for g in app.registered_groups)
    listed = subprocess.run([sys.executable, "-m", "modelyard.cli", "--help"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    missing = [n for n in names if n.replace("_", "-") not in listed]
    assert not missing and {"doctor", "aws", "init"} <= set(names), missing


def test_cli_run_rejects_bad_spec_before_any_work(tmp_path):
    workspace = tmp_path / "ws"
    result = invoke_cli(
        "run",
        "--spec",
        str(write(tmp_path, task="clustering")),
        env={"MODELYARD_WORKSPACE": str(workspace)},
    )
    assert result.exit_code == 2 and "task:" in result.stderr, result.output
    assert not workspace.exists()  # no database, no run, nothing started


def test_every_spec_field_is_documented():
    """docs/spec.md is the reference users read: a new field must land there too."""
    import inspect

    from pydantic import BaseModel

    from modelyard import spec as module

    doc = (ROOT / "docs" / "spec.md").read_text()
    models = [m for _, m in inspect.getmembers(module, inspect.isclass)
              if issubclass(m, BaseModel) and m.__module__ == module.__name__ and not m.__name__.startswith("_")]  # fmt: skip
    missing = [f"{m.__name__}.{f.alias or name}" for m in models for name, f in m.model_fields.items()
               if not f.exclude and f"`{f.alias or name}`" not in doc]  # fmt: skip
    assert not missing, f"document these in docs/spec.md: {missing}"


# --- deploy.environments.<env>.strategy ------------------------------------------------------
ADS = ROOT / "examples" / "ad_clicks" / "modelyard.yaml"


def _with_production(tmp_path: Path, field: str, value: object, example: Path = HOUSE) -> Path:
    """The example's spec with deploy.environments.production.<field> set to `value`."""
    data = yaml.safe_load(example.read_text())
    data["deploy"]["environments"]["production"][field] = value
    path = tmp_path / "modelyard.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _with_strategy(tmp_path: Path, strategy: object, example: Path = HOUSE) -> Path:
    return _with_production(tmp_path, "strategy", strategy, example)


def test_strategy_defaults_to_all_at_once_and_a_kind_alone_takes_its_defaults(tmp_path):
    spec = load_spec(HOUSE)
    assert spec.deploy.environments["production"].strategy.kind == "all_at_once"
    canary = load_spec(_with_strategy(tmp_path, "canary")).deploy.environments["production"]
    assert canary.strategy.kind == "canary" and canary.strategy.steps == [5, 25, 50, 100]


@pytest.mark.parametrize("seed", range(8))
def test_canary_steps_that_climb_to_100_are_taken_and_any_other_order_is_named(tmp_path, seed):
    import random

    pick = random.Random(seed)
    steps = [*sorted(pick.sample(range(1, 100), pick.randint(0, 5))), 100]
    strategy = {"kind": "canary", "steps": steps, "bake": 30}
    taken = load_spec(_with_strategy(tmp_path, strategy)).deploy.environments["production"]
    assert taken.strategy.steps == steps

    field = "deploy.environments.production.strategy.steps:"
    wrong = [
        ([s for s in steps if s < 99] + [99], "the last step must be 100"),
        ([*steps, 100], "steps must increase"),
        ([0, *steps], "percent of traffic, 1 to 100"),
    ]
    for bad, why in wrong:
        with pytest.raises(SpecError) as raised:
            load_spec(_with_strategy(tmp_path, {**strategy, "steps": bad}))
        assert field in str(raised.value) and why in str(raised.value), str(raised.value)


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ({"kind": "blue_green"}, ["strategy:", "'all_at_once', 'canary', 'shadow'"]),
        ({"steps": [50, 100]}, ["strategy: `kind` is missing", "all_at_once, canary, shadow"]),
        (
            {"kind": "canary", "bake": 600, "timeout": 1200},
            ["strategy: timeout: 1200 s", "at least 2400"],
        ),
        ({"kind": "canary", "sample": 0.5}, ["strategy.sample: unknown field"]),
        ({"kind": "shadow", "sample": 0}, ["strategy.sample:", "greater than 0"]),
        ({"kind": "shadow", "checks": {"agreement": 1.5}}, ["strategy.checks.agreement:"]),
        ({"kind": "canary", "checks": {"agreement": 0.9}}, ["strategy.checks.agreement: unknown"]),
        ({"kind": "shadow"}, ["strategy.checks.max_mean_abs_diff: a regression model's shadow"]),
        (
            {"kind": "shadow", "duration": 900, "timeout": 600, "checks": {"max_mean_abs_diff": 1}},
            ["strategy: timeout: 600 s is shorter than the shadow's duration", "at least 900"],
        ),
        ({"kind": "all_at_once", "bake": 10}, ["strategy.bake: unknown field"]),
    ],
)
def test_a_wrong_strategy_is_refused_naming_its_field(tmp_path, strategy, expected):
    with pytest.raises(SpecError) as raised:
        load_spec(_with_strategy(tmp_path, strategy))
    message = str(raised.value)
    assert "deploy.environments.production" in message
    assert all(part in message for part in expected), message


def test_a_shadow_is_judged_by_agreement_for_a_classifier_and_by_difference_for_a_regressor(
    tmp_path,
):
    shadow = {"kind": "shadow", "checks": {"max_mean_abs_diff": 5000.0}}
    house = load_spec(_with_strategy(tmp_path, shadow)).deploy.environments["production"]
    assert house.strategy.checks.max_mean_abs_diff == 5000.0
    ads = load_spec(_with_strategy(tmp_path, {"kind": "shadow"}, ADS))
    assert ads.deploy.environments["production"].strategy.checks.agreement == 0.95
    with pytest.raises(SpecError, match="max_mean_abs_diff: applies to regression"):
        load_spec(_with_strategy(tmp_path, shadow, ADS))


def _with_rate_limit(tmp_path: Path, limit: object) -> Path:
    return _with_production(tmp_path, "rate_limit", limit)


@pytest.mark.parametrize(
    ("limit", "nginx"),
    [
        # nginx counts in whole requests a minute: a fraction of one a second is kept.
        ({"per_second": 0.5}, {"rate": "30r/m", "burst": 1, "by": "address", "retry_after": 2}),
        (
            {"per_second": 200, "burst": 50, "by": "key"},
            {"rate": "12000r/m", "burst": 50, "by": "key", "retry_after": 1},
        ),
        ({"per_second": 2.5, "burst": 0}, {"rate": "150r/m", "burst": 0, "retry_after": 1}),
    ],
)
def test_a_rate_limit_becomes_nginxs_limit_req(tmp_path, limit, nginx):
    from modelyard.deploy.release import _rate_limit_vars

    env = load_spec(_with_rate_limit(tmp_path, limit)).deploy.environments["production"]
    assert _rate_limit_vars(env)["model_service_rate_limit"].items() >= nginx.items()
    assert _rate_limit_vars(load_spec(HOUSE).deploy.environments["production"]) == {
        "model_service_rate_limit": {}
    }


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        ({"per_second": 0}, "rate_limit.per_second: Input should be greater than 0"),
        ({"burst": 5}, "rate_limit.per_second: Field required"),
        ({"per_second": 5, "by": "token"}, "rate_limit.by: Input should be 'address' or 'key'"),
        ({"per_second": 5, "burst": -1}, "rate_limit.burst: Input should be greater than or"),
        ({"per_second": 5, "zone": "x"}, "rate_limit.zone: unknown field"),
    ],
)
def test_a_wrong_rate_limit_is_refused_naming_its_field(tmp_path, limit, expected):
    with pytest.raises(SpecError) as raised:
        load_spec(_with_rate_limit(tmp_path, limit))
    assert "deploy.environments.production" in str(raised.value)
    assert expected in str(raised.value), str(raised.value)
