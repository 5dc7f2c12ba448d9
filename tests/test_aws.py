"""The AWS target against moto in server mode on 127.0.0.1 (S3, ECR, EC2, IAM): artifacts in S3
read back through the MLflow server, the image's ECR repository created with scan-on-push and
immutable tags, the image itself pushed to the real local registry (moto stores no images) and
pulled by digest at deploy. No request ever leaves loopback: moto's endpoints are the only AWS
the tests know, and its instances' private addresses are never connected to."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from mlflow import MlflowClient

from tests.conftest import Project
from tests.hosts import free_ports
from tests.test_deploy import _stop_services, version_at
from tests.test_triggers import Stack

pytestmark = pytest.mark.docker
REGION = "eu-west-1"
SECRET = "aws-secret-7c1e4b9d2a"  # the access key's secret: must show nowhere
BUCKET = "modelyard-aws-artifacts"


@pytest.fixture(scope="module")
def aws(moto: str) -> dict[str, str]:
    """The standard AWS chain, pointed at moto: every client modelyard makes finds it."""
    return {"AWS_ACCESS_KEY_ID": "AKIAMODELYARDTEST", "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": moto,
            "MLFLOW_S3_ENDPOINT_URL": moto}  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, aws: dict) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("aws") / "workspace", wheelhouse)
    stack.env |= aws | {"MODELYARD_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow"}
    up = stack.cli("stack", "up", "prefect", "mlflow", "registry")
    assert up.returncode == 0, up.stdout + up.stderr
    # Images go to ECR's API for the repository and the token, and to the real local registry
    # for the bytes (moto has no image store).
    stack.env |= {"MODELYARD_IMAGE_REGISTRY": "ecr",
                  "MODELYARD_IMAGE_PUSH_HOST": stack.url("registry").removeprefix("http://")}  # fmt: skip
    yield stack
    stack.cli("stack", "down")
    _stop_services(stack.workspace)


def client(service: str, aws: dict) -> object:
    return boto3.client(service, endpoint_url=aws["AWS_ENDPOINT_URL"], region_name=REGION,
                        aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=SECRET)  # fmt: skip


def test_pipeline_keeps_artifacts_in_s3_and_images_in_ecr_and_deploy_pulls_by_digest(
    stack, aws, tmp_path
):
    model = "aws-ads"
    project = Project(tmp_path / "repo", "ad_clicks", model)
    port = free_ports(3)
    project.write_spec(project.spec() | {"deploy": {"environments": {
        "staging": {"target": "local", "port": port}}}}, "deploy")  # fmt: skip
    spec = str(project.spec_path)
    run = stack.cli("run", "--no-deploy", "--spec", spec, MODELYARD_BUILD_IMAGE="always")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # S3: the bundle and every artifact, in a bucket with versioning and encryption, readable
    # back through the MLflow server.
    s3 = client("s3", aws)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(k.endswith(".bundle.tar.gz") for k in keys)
    assert s3.get_bucket_versioning(Bucket=BUCKET)["Status"] == "Enabled"
    mlflow = MlflowClient(stack.url("mlflow"), stack.url("mlflow"))
    tags = mlflow.get_model_version(model, "1").tags
    run_id = tags["bundle_artifact"].removeprefix("runs:/").split("/")[0]
    back = Path(mlflow.download_artifacts(run_id, "bundle", str(tmp_path / "back")))
    assert any(p.name.endswith(".bundle.tar.gz") for p in back.iterdir())

    # ECR: the repository made to modelyard's settings.
    ecr = client("ecr", aws)
    repository = ecr.describe_repositories(repositoryNames=[f"modelyard/{model}"])["repositories"][
        0
    ]
    assert repository["imageTagMutability"] == "IMMUTABLE"
    assert repository["imageScanningConfiguration"]["scanOnPush"] is True
    assert repository["encryptionConfiguration"]["encryptionType"] == "AES256"

    # The version names its image by digest, and the registry holds exactly that manifest.
    registry = stack.url("registry").removeprefix("http://")
    assert tags["image_ref"] == f"{registry}/modelyard/{model}@{tags['image_digest']}"
    assert tags["image_tag"] == f"1-{tags['bundle_digest'][:12]}"
    manifest = httpx.head(
        f"{stack.url('registry')}/v2/modelyard/{model}/manifests/{tags['image_tag']}",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"}, timeout=10,
    )  # fmt: skip
    assert manifest.headers["Docker-Content-Digest"] == tags["image_digest"]

    # Deploy pulls by digest: the image is gone from the engine before the deploy.
    _remove_image(tags)
    deployed = stack.cli("deploy", "staging", "--version", "1", "--spec", spec)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    assert version_at(f"http://127.0.0.1:{port}") == "1"
    ids = subprocess.run(["docker", "ps", "-q", "--filter", f"label=io.modelyard.service={model}-staging"],
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    started = subprocess.run(["docker", "inspect", "--format", "{{.Config.Image}}", *ids],
                             capture_output=True, text=True).stdout.split()  # fmt: skip
    assert started == [tags["image_ref"]]  # the live slot runs the image by digest

    # The AWS secret shows in no output, version tag or ledger record, nor in the image.
    history = stack.cli("history", model, "--json")
    for text in (run.stdout, run.stderr, deployed.stdout, deployed.stderr, history.stdout,
                 repr(tags), _image_config(tags["image_ref"])):  # fmt: skip
        assert SECRET not in text


def _remove_image(tags: dict[str, str]) -> None:
    refs = [tags["image_local_ref"], f"{tags['image_repository']}:{tags['image_tag']}",
            tags["image_ref"]]  # fmt: skip
    subprocess.run(["docker", "rmi", "--force", *refs], capture_output=True)
    gone = subprocess.run(["docker", "image", "inspect", tags["image_ref"]], capture_output=True)
    assert gone.returncode != 0, "the image is still on the engine; the deploy would not pull"


def _image_config(ref: str) -> str:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True,
                          text=True).stdout  # fmt: skip
