"""The rebuild's verdicts, in process: the same model, another model, and library versions
(a whole rebuild from a registered version's lineage: test_deploy.py)."""

from __future__ import annotations

import pytest

from modelyard import rebuild as rebuilds
from modelyard.lineage import library_tags
from modelyard.package.onnx import export_onnx
from tests.serving import Built, build_example


@pytest.fixture(scope="module")
def ads(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_example("ad_clicks", tmp_path_factory.mktemp("ads"))


def _registered(built: Built) -> rebuilds._Registered:
    folder = built.bundle.path
    return rebuilds._Registered(*((folder / n).read_bytes()
                                  for n in ("model.onnx", "schema.json", "metadata.json")))  # fmt: skip


def test_the_same_model_is_identical_and_another_differs(ads, tmp_path):
    frame = ads.prepared.splits.eval
    same = rebuilds.Rebuild("ads", "7")
    rebuilds._compare(same, ads.spec, frame, export_onnx(ads.trained.model, ads.spec),
                      _registered(ads))  # fmt: skip
    assert (same.outcome, same.matched) == ("identical", True), same.detail
    other = build_example("ad_clicks", tmp_path, estimator={
        "class": "sklearn.linear_model.LogisticRegression", "params": {"C": 0.01}})  # fmt: skip
    differs = rebuilds.Rebuild("ads", "7")
    rebuilds._compare(differs, ads.spec, frame, export_onnx(other.trained.model, ads.spec),
                      _registered(ads))  # fmt: skip
    assert (differs.outcome, differs.matched) == ("differs", False)
    assert f"on {len(frame)} evaluation rows" in differs.detail and "tolerance" in differs.detail
    with pytest.raises(Exception, match="rebuild of ads v7 differs: largest difference"):
        rebuilds.require(differs)


def test_every_library_whose_version_differs_is_named():
    running = library_tags()
    recorded = running | {"lib.numpy": "1.0.0", "lib.made-up": "2"}
    recorded.pop("lib.scikit-learn")
    found = rebuilds._library_differences(recorded)
    assert f"numpy: 1.0.0 → {running['lib.numpy']}" in found
    assert "made-up: 2 → not installed" in found
    assert f"scikit-learn: not recorded → {running['lib.scikit-learn']}" in found
    assert len(found) == 3
    assert rebuilds._library_differences(running) == []
