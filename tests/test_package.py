"""Exports are proven before they are kept; bundles verify or are refused."""

from __future__ import annotations

import json
import re
import shutil

import onnx
import onnx.numpy_helper
import pytest

from modelyard import bundle as bundles
from modelyard import manifest
from modelyard.errors import SpecError
from modelyard.package.build import assemble
from modelyard.package.onnx import ExportError, export_onnx
from modelyard.package.parity import ParityError
from modelyard.spec import Estimator
from tests.serving import Built

# With test_serve: both read the house example that `built_house` builds once per worker.
pytestmark = pytest.mark.xdist_group("built-house")


@pytest.fixture(scope="module")
def house(built_house: Built) -> Built:
    return built_house


def test_bundle_holds_what_the_design_names(house: Built):
    folder = house.bundle.path
    assert {p.name for p in folder.iterdir()} == {
        "model.onnx", "model.pmml", "schema.json", "metadata.json", "manifest.json", "manifest.sig"}  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "model.pmml", "schema.json", "metadata.json"}
    assert manifest["files"]["model.onnx"] == bundles.sha256_file(folder / "model.onnx")
    schema = json.loads((folder / "schema.json").read_text())
    assert [i["name"] for i in schema["inputs"]] == house.spec.feature_names
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["model_name"] == "house_prices" and metadata["model_version"] == "7"
    assert house.bundle.parity.passed and house.bundle.parity.rows == len(
        house.prepared.splits.eval
    )


def test_tarball_is_reproducible_and_round_trips(house: Built, tmp_path):
    packed = bundles.to_tarball(house.bundle.path)
    assert packed == bundles.to_tarball(house.bundle.path)
    # Nothing of the moment either: gzip's header time (bytes 4-7) is zero, so a packing a
    # second later is the same too (two calls that straddled a second once failed CI).
    assert packed[4:8] == bytes(4)
    unpacked = bundles.from_tarball(house.bundle.tarball.read_bytes(), tmp_path / "x")
    key = bundles.parse_public_keys(house.public_key)
    assert bundles.verify(unpacked, key).digest == house.bundle.digest


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes() + b"\0"), "altered: ['model.onnx']"),
        (lambda d: (d / "metadata.json").unlink(), "missing: ['metadata.json']"),
        (lambda d: (d / "extra.py").write_text("print('hi')"), "unexpected: ['extra.py']"),
        (lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text().replace("modelyard", "m0delyard")), "signature does not verify"),
        (lambda d: (d / "manifest.sig").unlink(), "is not a bundle"),
    ],
    ids=["altered", "missing", "unexpected", "manifest-edited", "unsigned"],
)  # fmt: skip
def test_verify_refuses_any_change(house: Built, tmp_path, mutate, message):
    copy = tmp_path / "b"
    shutil.copytree(house.bundle.path, copy)
    mutate(copy)
    with pytest.raises(bundles.BundleError, match=message.replace("[", r"\[").replace("]", r"\]")):
        bundles.verify(copy, bundles.parse_public_keys(house.public_key))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "model.onnx").write_bytes(b"\0" + (d / "model.onnx").read_bytes()), "altered: ['model.onnx']"),
        (lambda d: (d / "schema.json").unlink(), "missing: ['schema.json']"),
        (lambda d: (d / "extra.py").write_text("print('hi')"), "unexpected: ['extra.py']"),
        (lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text() + " "), "changed after the bundle was verified"),
        (lambda d: bundles.seal(d, bundles.load_or_create_key(d.parent / "other.pem")), "changed after the bundle was verified"),
        (lambda d: (d / "manifest.json").unlink(), "changed after the bundle was verified"),
    ],
    ids=["altered", "missing", "unexpected", "manifest-edited", "re-signed", "no-manifest"],
)  # fmt: skip
def test_a_worker_checks_the_bundle_its_supervisor_verified_against_that_manifest(
    house: Built, tmp_path, mutate, message
):
    """A serving worker is handed the digest of the manifest its supervisor verified the
    signature of, and checks the bundle against it with hashlib alone: the same bundle passes
    as `verify` gives it; any change since, even one signed by a trusted key, is refused."""
    copy = tmp_path / "b"
    shutil.copytree(house.bundle.path, copy)
    verified = bundles.verify(copy, bundles.parse_public_keys(house.public_key))
    assert manifest.vouched(copy, verified.digest, verified.key_id) == verified
    mutate(copy)
    with pytest.raises(bundles.BundleError, match=message.replace("[", r"\[").replace("]", r"\]")):
        manifest.vouched(copy, verified.digest, verified.key_id)


def test_key_rotation_window_then_the_old_key_is_refused(house: Built, tmp_path):
    """Rotate the signing key: before, only the old key is trusted; during the window both
    (bundles of either verify, so every version stays deployable and rollback-able); after,
    only the new one, and a bundle the old key signed is refused, as a revoked key must be."""
    old_public = house.public_key
    new_key = bundles.load_or_create_key(tmp_path / "new.pem")
    new_public = bundles.public_key_text(new_key.public_key())
    assert (tmp_path / "new.pem").stat().st_mode & 0o777 == 0o600
    resigned = tmp_path / "resigned"
    shutil.copytree(house.bundle.path, resigned)
    bundles.seal(resigned, new_key)
    before, window, after = (bundles.parse_public_keys(k) for k in
                             (old_public, f"{old_public},{new_public}", new_public))  # fmt: skip
    with pytest.raises(bundles.BundleError, match="does not verify with any trusted key"):
        bundles.verify(resigned, before)
    for bundle in (house.bundle.path, resigned):
        assert bundles.verify(bundle, window).key_id == json.loads(
            (bundle / "manifest.json").read_text())["key_id"]  # fmt: skip
    assert bundles.verify(resigned, after)
    with pytest.raises(bundles.BundleError, match="does not verify with any trusted key"):
        bundles.verify(house.bundle.path, after)


def test_perturbed_export_fails_parity_with_the_worst_rows(house: Built, tmp_path):
    graph = onnx.load_from_string(export_onnx(house.trained.model, house.spec))
    product = next(n for n in graph.graph.node if n.op_type == "MatMul")  # X @ coefficients
    weights = next(i for i in graph.graph.initializer if i.name == product.input[1])
    perturbed = onnx.numpy_helper.to_array(weights).copy()
    perturbed.flat[0] *= 1.01  # a 1% error in one weight
    weights.CopyFrom(onnx.numpy_helper.from_array(perturbed, weights.name))
    key = bundles.load_or_create_key(tmp_path / "k.pem")
    with pytest.raises(ParityError) as caught:
        assemble(house.spec, graph.SerializeToString(), house.prepared.splits.eval, house.trained.eval_scores,
                 tmp_path / "out", key, {"model_version": "1"})  # fmt: skip
    message = str(caught.value)
    assert "onnx export:" in message and "differ from scikit-learn beyond atol" in message
    assert message.count("  row ") == 5 and "inputs {'area':" in message
    assert not (tmp_path / "out" / "bundle").exists()  # a failed proof keeps nothing
    assert json.loads((tmp_path / "out" / "parity.json").read_text())["onnx"]["passed"] is False


def test_unsupported_estimator_is_refused_before_training_with_the_fix(house: Built):
    spec = house.spec.model_copy(
        update={"estimator": Estimator(**{"class": "sklearn.kernel_ridge.KernelRidge"})}
    )
    from modelyard.train import build_pipeline, fit_and_evaluate

    with pytest.raises(SpecError, match=r"KernelRidge cannot be exported to ONNX .* use one of "
                       r"LinearRegression, Ridge, .*HistGradientBoostingRegressor"):  # fmt: skip
        fit_and_evaluate(spec, house.prepared.splits)
    # Past that check (as with a converter registered by hand that then fails), the export
    # error names the estimator and where the supported ones are listed.
    model = build_pipeline(spec).fit(
        house.prepared.splits.train[spec.feature_names], house.prepared.splits.train[spec.target]
    )
    with pytest.raises(ExportError, match=r"cannot export estimator .*KernelRidge .*docs/models"):
        export_onnx(model, spec)


def test_pmml_export_is_proven_by_an_independent_evaluator(house: Built, tmp_path):
    from modelyard.package.pmml import export_pmml, prove_pmml

    assert house.spec.package.pmml, "the house-prices example exports PMML"
    assert (house.bundle.path / "model.pmml").is_file()
    assert house.bundle.pmml_parity is not None and house.bundle.pmml_parity.passed
    assert house.bundle.pmml_parity.max_abs_diff < 1e-3  # double precision end to end

    pmml = export_pmml(house.trained.model, house.spec).decode()
    coefficient = re.search(
        r'<NumericPredictor name="standardScaler\(area\)" coefficient="([^"]+)"', pmml
    )
    perturbed = pmml.replace(coefficient.group(0), coefficient.group(0).replace(
        coefficient.group(1), str(float(coefficient.group(1)) * 1.01)))  # fmt: skip
    report = prove_pmml(
        perturbed.encode(), house.spec, house.prepared.splits.eval, house.trained.eval_scores
    )
    assert not report.passed and report.export == "pmml" and len(report.worst) == 5
