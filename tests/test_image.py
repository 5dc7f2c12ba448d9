"""The serving image in a real Docker engine: built offline, small, labelled, validated."""

from __future__ import annotations

import json
import shutil

import docker
import httpx
import pytest

from modelyard.config import Settings
from modelyard.package.build import frame_columns
from modelyard.package.image import build_image, docker_client
from modelyard.package.validate import infra_validate
from modelyard.ports import free_port
from tests.conftest import wait_for
from tests.serving import SERVING_IMPORTS, TOKEN, Built, build_example, unused_distributions
from tests.test_serve import AUTH, BAD, expected_values, sample, v2_request

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return Settings(workspace=tmp_path_factory.mktemp("image-ws"), build_image="always")


@pytest.fixture(scope="module")
def ads(tmp_path_factory) -> Built:
    return build_example("ad_clicks", tmp_path_factory.mktemp("ads"))


@pytest.fixture(scope="module")
def image(settings: Settings, ads: Built):
    return build_image(settings, ads.bundle.path, ads.public_key, lambda _: None)


@pytest.fixture(scope="module")
def container_url(settings: Settings, image):
    client = docker_client(settings)
    port = free_port()
    container = client.containers.run(
        image.ref, detach=True, network_mode="host",
        environment={"MODELYARD_SERVE_HOST": "127.0.0.1", "MODELYARD_SERVE_PORT": str(port),
                     "MODELYARD_SERVE_WORKERS": "2", "MODELYARD_SERVE_TOKEN": TOKEN,
                     "MODELYARD_SERVE_MAX_BODY_BYTES": "65536", "MODELYARD_SERVE_MAX_ROWS": "500"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health/ready", timeout=120)
    except TimeoutError:
        container.reload()
        logs = container.logs().decode(errors="replace")[-3000:]
        container.remove(force=True)
        pytest.fail(f"the container never became ready ({container.status}):\n{logs}")
    yield url
    container.remove(force=True)


def test_image_is_small_labelled_non_root_with_healthcheck(settings: Settings, image, ads: Built):
    assert image.size_bytes < 300e6, f"{image.size_bytes / 1e6:.0f} MB"
    labels = image.labels
    assert labels["org.opencontainers.image.title"] == "ad_clicks"
    assert labels["org.opencontainers.image.version"] == "7"
    assert labels["org.opencontainers.image.revision"] == "0" * 40
    assert labels["io.modelyard.bundle.digest"] == ads.bundle.digest
    client = docker_client(settings)
    config = client.images.get(image.ref).attrs["Config"]
    assert config["User"] == "10001:10001"
    assert "/health/ready" in " ".join(config["Healthcheck"]["Test"])
    # The bundle is the last layer: a new model version rebuilds only that.
    last = next(h for h in client.images.get(image.ref).history() if h["Size"] > 0)
    assert "COPY" in last["CreatedBy"] and "/srv/modelyard/bundle/" in last["CreatedBy"]
    # No training stack inside.
    listed = {c["name"].lower() for c in image.sbom["components"]}
    assert {"onnxruntime", "numpy", "modelyard"} <= listed
    assert not listed & {"scikit-learn", "pandas", "mlflow", "prefect", "pip"}


def test_the_image_holds_only_what_serving_imports(settings: Settings, image):
    """Every distribution in the image's environment is imported by the server: none of the
    serving dependencies' own dependencies it never loads (onnxruntime's protobuf), no pip."""
    printed = docker_client(settings).containers.run(
        image.ref, entrypoint=["python3", "-c", SERVING_IMPORTS, "/srv/modelyard/bundle"],
        network_mode="none", remove=True,
    )  # fmt: skip
    assert unused_distributions(printed.decode()) == []


def test_the_image_carries_a_tree_kernel_it_can_load(settings: Settings, image):
    """The wheel built on this host brings the compiled tree kernel (hatch_build.py), and the
    image's Python loads it: tree ensembles' large batches are not left to ONNX Runtime."""
    check = "from modelyard.serve import forest; print(forest.kernel() is not None)"
    printed = docker_client(settings).containers.run(
        image.ref, entrypoint=["python3", "-c", check], network_mode="none", remove=True
    )
    assert printed.decode().strip() == "True"


def test_sbom_is_cyclonedx_with_hashes(image):
    sbom = image.sbom
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.5"
    assert sbom["metadata"]["component"]["version"] == image.image_id
    onnxruntime = next(c for c in sbom["components"] if c["name"] == "onnxruntime")
    assert onnxruntime["purl"].startswith("pkg:pypi/onnxruntime@")
    assert len(onnxruntime["hashes"][0]["content"]) == 64


def test_container_answers_both_protocols_like_scikit_learn(ads: Built, container_url: str):
    import numpy as np

    features, _ = sample(ads, 50)
    expected = expected_values(ads, features)
    columns = frame_columns(features)
    response = httpx.post(f"{container_url}/invocations", json={"inputs": columns}, headers=AUTH)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["predictions"], expected)
    response = httpx.post(
        f"{container_url}/v2/models/ad_clicks/infer", json=v2_request(features), headers=AUTH
    )
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    np.testing.assert_allclose(outputs["predict"], expected)


@pytest.mark.parametrize(("case", "method", "path", "body", "headers", "status", "field", "text"), BAD,
                         ids=[b[0] for b in BAD])  # fmt: skip
def test_container_rejects_bad_input_cleanly(
    container_url, case, method, path, body, headers, status, field, text
):
    kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
    response = httpx.request(method, container_url + path, headers=AUTH | headers, **kwargs)
    assert response.status_code == status, response.text
    if field:
        assert response.json()["field"] == field
    assert httpx.get(f"{container_url}/health/live").status_code == 200


def test_infra_validation_passes_a_good_image(settings: Settings, image, ads: Built):
    sample_columns = frame_columns(
        ads.prepared.splits.eval.loc[:, ads.spec.feature_names].head(200)
    )
    report = infra_validate(
        settings, image.ref, ads.bundle.path, ads.public_key, sample_columns, lambda _: None
    )
    assert report.passed, report.to_markdown()
    names = {c.name for c in report.checks}
    assert {
        "ready",
        "evaluation sample via V2 infer",
        "Docker HEALTHCHECK healthy",
        "runs as non-root",
    } <= names
    # This run's container only: a pipeline on another worker may be validating at once.
    assert report.data["container"].startswith("modelyard-infraval-")
    with pytest.raises(docker.errors.NotFound):
        docker_client(settings).containers.get(report.data["container"])


def test_image_with_a_tampered_bundle_refuses_to_start(settings: Settings, ads: Built, tmp_path):
    tampered = tmp_path / "bundle"
    shutil.copytree(ads.bundle.path, tampered)
    schema = json.loads((tampered / "schema.json").read_text())
    schema["inputs"][0]["nullable"] = True
    (tampered / "schema.json").write_text(json.dumps(schema))
    meta = json.loads((tampered / "metadata.json").read_text())
    (tampered / "metadata.json").write_text(json.dumps(meta | {"model_version": "tampered"}))
    bad = build_image(settings, tampered, ads.public_key, lambda _: None)
    client = docker_client(settings)
    container = client.containers.run(bad.ref, detach=True, network_mode="host",
                                      environment={"MODELYARD_SERVE_PORT": str(free_port())})  # fmt: skip
    try:
        assert container.wait(timeout=60)["StatusCode"] == 3
        logs = container.logs().decode()
        assert "refusing to serve" in logs and "altered" in logs
    finally:
        container.remove(force=True)
    sample_columns = frame_columns(ads.prepared.splits.eval.loc[:, ads.spec.feature_names].head(5))
    with pytest.raises(Exception, match="altered"):  # the host refuses it before even starting it
        infra_validate(settings, bad.ref, tampered, ads.public_key, sample_columns, lambda _: None)
