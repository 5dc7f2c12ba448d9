"""The AWS target against moto in server mode on 127.0.0.1 (S3, ECR, EC2, IAM): artifacts in S3
read back through the MLflow server, the image's ECR repository created with scan-on-push and
immutable tags, the image itself pushed to the real local registry (moto stores no images) and
pulled by digest at deploy. No request ever leaves loopback: moto's endpoints are the only AWS
the tests know, and its instances' private addresses are never connected to."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mlflow import MlflowClient

from modelyard.bundle import MANIFEST, decrypt, from_tarball
from modelyard.config import Settings, runtime
from modelyard.package.push import push_image
from modelyard.ports import free_ports
from modelyard.stack import ensure_bucket
from tests.conftest import ROOT, Project
from tests.hosts import (
    SshHosts,
    remove_image,
    start_ssh_hosts,
    stop_services,
    stop_ssh_hosts,
    version_at,
)
from tests.stacks import Stack

pytestmark = pytest.mark.docker
REGION = "eu-west-1"
SECRET = "aws-secret-7c1e4b9d2a"  # the access key's secret: must show nowhere
BUCKET = "modelyard-aws-artifacts"
SERVE_TOKEN = "serve-token-5d8a1f0e9c7b"
SIGNING_KEY = (
    Ed25519PrivateKey.generate()
    .private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    .decode()
)


@pytest.fixture(scope="module")
def aws(moto: str) -> dict[str, str]:
    """The standard AWS chain, pointed at moto: every client modelyard makes finds it."""
    return {"AWS_ACCESS_KEY_ID": "AKIAMODELYARDTEST", "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": moto,
            "MLFLOW_S3_ENDPOINT_URL": moto}  # fmt: skip


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, empty_prefect_db: Path, aws: dict
) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("aws") / "workspace", wheelhouse, empty_prefect_db)
    # Bundles sealed with a data key of their own from KMS: the model is readable nowhere else.
    kms_key = client("kms", aws).create_key()["KeyMetadata"]["Arn"]
    # And MLflow's artifacts in S3 written with SSE-KMS (another key: each has its own use).
    artifacts_key = client("kms", aws).create_key()["KeyMetadata"]["Arn"]
    stack.env |= aws | {"MODELYARD_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
                        "MODELYARD_ARTIFACTS_KMS_KEY": artifacts_key,
                        # moto takes no Condition into account: a deny-unencrypted statement
                        # refuses every put there (checked on a bucket of its own below).
                        "MODELYARD_ARTIFACTS_BUCKET_POLICY": "leave",
                        "MODELYARD_SERVE_TOKEN": SERVE_TOKEN, "MODELYARD_SIGNING_KEY": SIGNING_KEY,
                        "MODELYARD_BUNDLE_KMS_KEY": kms_key}  # fmt: skip
    up = stack.cli("stack", "up", "prefect", "mlflow", "registry")
    assert up.returncode == 0, up.stdout + up.stderr
    # Images go to ECR's API for the repository and the token, and to the real local registry
    # for the bytes (moto has no image store).
    stack.env |= {"MODELYARD_IMAGE_REGISTRY": "ecr",
                  "MODELYARD_IMAGE_PUSH_HOST": stack.url("registry").removeprefix("http://")}  # fmt: skip
    yield stack
    stack.cli("stack", "down")
    stop_services(stack.workspace)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """ad_clicks with a local staging and an EC2 production (its hosts described below)."""
    return Project(tmp_path_factory.mktemp("aws-repo"), "ad_clicks", "aws-ads")


@pytest.fixture(scope="module")
def registered(stack: Stack, project: Project) -> tuple[subprocess.CompletedProcess, int]:
    """Version 1 run through the pipeline (image built, validated, pushed); a local staging."""
    port = free_ports(3)
    project.write_spec(project.spec() | {"deploy": {"environments": {
        "staging": {"target": "local", "port": port}}}}, "deploy")  # fmt: skip
    run = stack.cli("run", "--no-deploy", "--spec", str(project.spec_path),
                    MODELYARD_BUILD_IMAGE="always")  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run, port


def client(service: str, aws: dict) -> object:
    return boto3.client(service, endpoint_url=aws["AWS_ENDPOINT_URL"], region_name=REGION,
                        aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=SECRET)  # fmt: skip


def test_pipeline_keeps_artifacts_in_s3_and_images_in_ecr_and_deploy_pulls_by_digest(
    stack, aws, project, registered, tmp_path
):
    model = project.spec()["name"]
    run, port = registered
    spec = str(project.spec_path)

    # S3: the bundle and every artifact, in a bucket with versioning and encryption, readable
    # back through the MLflow server.
    s3 = client("s3", aws)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(k.endswith(".bundle.tar.gz") for k in keys)
    assert s3.get_bucket_versioning(Bucket=BUCKET)["Status"] == "Enabled"
    # Every artifact was put with SSE-KMS and the key, and the bucket encrypts with it by
    # default; the policy that refuses other puts is checked on a bucket of its own.
    artifacts_key = stack.env["MODELYARD_ARTIFACTS_KMS_KEY"]
    heads = [s3.head_object(Bucket=BUCKET, Key=k) for k in keys]
    assert {(h.get("ServerSideEncryption"), h.get("SSEKMSKeyId")) for h in heads} == {
        ("aws:kms", artifacts_key)}  # fmt: skip
    (rule,) = s3.get_bucket_encryption(Bucket=BUCKET)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms", "KMSMasterKeyID": artifacts_key}  # fmt: skip
    _check_kms_only_policy(s3, aws, artifacts_key)
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
    remove_image(tags)
    deployed = stack.cli("deploy", "staging", "--version", "1", "--spec", spec)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    assert version_at(f"http://127.0.0.1:{port}") == "1"
    ids = subprocess.run(["docker", "ps", "-q", "--filter", f"label=io.modelyard.service={model}-staging"],
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    started = subprocess.run(["docker", "inspect", "--format", "{{.Config.Image}}", *ids],
                             capture_output=True, text=True).stdout.split()  # fmt: skip
    assert started == [tags["image_ref"]]  # the live slot runs the image by digest

    # The stack's own registry, chosen by name, receives the same image under the same digest.
    settings = runtime(Settings(workspace=stack.workspace, image_registry="stack"))
    again = push_image(settings, tags["image_ref"], model, "1", tags["bundle_digest"], print)
    assert again.ref == tags["image_ref"]

    # The AWS secret shows in no output, version tag or ledger record, nor in the image.
    history = stack.cli("history", model, "--json")
    for text in (run.stdout, run.stderr, deployed.stdout, deployed.stderr, history.stdout,
                 repr(tags), _image_config(tags["image_ref"])):  # fmt: skip
        assert SECRET not in text


def _check_kms_only_policy(s3: object, aws: dict, key: str) -> None:
    """`stack up`'s policy for a bucket that must hold SSE-KMS objects only: AWS's documented
    pair of deny statements, added beside the policy's other statements. moto stores it but,
    as its docs say, takes no Condition into account (it would deny every put): AWS enforces
    it, so here the statements are checked, not the refusal."""
    bucket = "modelyard-kms-only"
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    theirs = {"Sid": "TeamReadOnly", "Effect": "Allow", "Principal": {"AWS": "*"},
              "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}  # fmt: skip
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17",
                                                           "Statement": [theirs]}))  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        for name, value in aws.items():
            env.setenv(name, value)
        for _ in range(2):  # a second `stack up` replaces its statements, adds none
            ensure_bucket(f"s3://{bucket}/mlflow", key)
    policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    assert policy["Statement"][0] == theirs
    denied = {json.dumps(st["Condition"], sort_keys=True) for st in policy["Statement"][1:]
              if st["Effect"] == "Deny" and st["Action"] == "s3:PutObject"}  # fmt: skip
    assert (
        denied
        == {
            '{"StringNotEquals": {"s3:x-amz-server-side-encryption": "aws:kms"}}',
            '{"Null": {"s3:x-amz-server-side-encryption": "true"}}',
        }
        and len(policy["Statement"]) == 3
    )
    (rule,) = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"]["KMSMasterKeyID"] == key


def _image_config(ref: str) -> str:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True,
                          text=True).stdout  # fmt: skip


@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshHosts]:
    hosts = start_ssh_hosts(tmp_path_factory.mktemp("ssh"), 2)
    yield hosts
    stop_ssh_hosts(hosts)


def test_ec2_hosts_found_by_tags_receive_the_deploy(
    stack, aws, project, registered, ssh_hosts, tmp_path
):
    """Test fixture, not a product feature: moto's instances have private addresses that exist
    nowhere, so each instance carries `test:*` tags naming a loopback sshd and a front-door
    port, and the environment's `aws.compose` maps them to ansible_host/ansible_port. The
    product's default connects to `private_ip_address`; nothing here ever does."""
    model = project.spec()["name"]
    ec2 = client("ec2", aws)
    fronts = {h.name: free_ports(3) for h in ssh_hosts.hosts}
    chosen = {}
    for host in ssh_hosts.hosts:
        chosen[host.name] = _instance(ec2, model, "production", {
            "Name": f"{model}-{host.name}", "test:ssh_port": str(host.port),
            "test:front_port": str(fronts[host.name]), "test:root": str(tmp_path / host.name)})  # fmt: skip
    other_environment = _instance(ec2, model, "staging", {})
    other_model = _instance(ec2, "someone-else", "production", {})
    stopped = _instance(ec2, model, "production", {})
    ec2.stop_instances(InstanceIds=[stopped])
    mapping = {"ansible_host": "'127.0.0.1'", "ansible_port": "tags['test:ssh_port'] | int",
               "model_service_port": "tags['test:front_port'] | int",
               "model_service_root": "tags['test:root']"}  # fmt: skip
    connection = {
        "ansible_user": ssh_hosts.user,
        "ansible_ssh_private_key_file": str(ssh_hosts.key),
        "ansible_ssh_common_args": f"-o UserKnownHostsFile={ssh_hosts.known_hosts} -o IdentitiesOnly=yes",
        "ansible_python_interpreter": "/usr/bin/python3",
        "model_service_docker_host": os.environ.get("DOCKER_HOST", ""),
    }  # fmt: skip
    spec = project.spec()
    spec["deploy"]["environments"]["production"] = {
        "target": "aws", "approval": False, "batch": 2,  # both hosts at once
        "aws": {"region": REGION, "compose": mapping, "vars": connection},
    }  # fmt: skip
    project.write_spec(spec, "production on EC2")

    planned = stack.cli("aws", "plan", "production", "--json", "--spec", str(project.spec_path))
    assert planned.returncode == 0, planned.stderr
    hosts = {h["name"]: h for h in json.loads(planned.stdout)}
    assert set(hosts) == set(chosen.values())
    assert not {other_environment, other_model, stopped} & set(hosts)
    by_port = {h["tags"]["test:ssh_port"]: h for h in hosts.values()}
    for host in ssh_hosts.hosts:
        assert by_port[str(host.port)]["address"] == f"127.0.0.1:{host.port}"

    try:
        deployed = stack.cli("deploy", "production", "--version", "1", "--spec",
                             str(project.spec_path))  # fmt: skip
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        for host in ssh_hosts.hosts:
            assert version_at(f"http://127.0.0.1:{fronts[host.name]}") == "1"
    finally:
        stop_services(tmp_path)  # the hosts' services live under the test's folder
    history = json.loads(stack.cli("history", model, "--env", "production", "--json").stdout)
    assert set(history[0]["hosts"].split(",")) == set(chosen.values())
    assert SECRET not in deployed.stdout + deployed.stderr
    inventory = stack.workspace / "inventories" / f"{model}-production"
    assert SECRET not in "".join(p.read_text() for p in inventory.rglob("*.yml"))


def _instance(ec2: object, model: str, environment: str, tags: dict[str, str]) -> str:
    tags = {"modelyard:model": model, "modelyard:environment": environment, **tags}
    made = ec2.run_instances(  # type: ignore[attr-defined]
        ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.small",
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )  # fmt: skip
    return made["Instances"][0]["InstanceId"]


# --- least-privilege IAM -------------------------------------------------------------------------

POLICIES = ROOT / "infra" / "aws"
PLACEHOLDERS = {"${ACCOUNT_ID}": "123456789012", "${REGION}": REGION, "${BUCKET}": BUCKET,
                "${GITHUB_REPOSITORY}": "acme/models",
                "${KMS_KEY_ID}": "1234abcd-12ab-34cd-56ef-1234567890ab"}  # fmt: skip
# IAM actions whose names differ from the API operation they authorise.
ACTION_OF = {
    "s3:HeadBucket": "s3:ListBucket",
    "s3:PutBucketEncryption": "s3:PutEncryptionConfiguration",
}
# (SSE-KMS puts and gets by the MLflow server need kms:GenerateDataKey and kms:Decrypt on the
# artifacts' key: the same two actions the bundles' envelope keys need.)
# Calls made by other programs on modelyard's behalf: MLflow's S3 artifact store, a Docker push
# to ECR, the aws_ec2 inventory plugin; and the tag ECR's CreateRepository sets.
CALLED_ELSEWHERE = {
    "pipeline": {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                 "ecr:BatchCheckLayerAvailability", "ecr:InitiateLayerUpload",
                 "ecr:UploadLayerPart", "ecr:CompleteLayerUpload", "ecr:PutImage",
                 "ecr:TagResource", "ec2:DescribeInstances"},
    "host": {"ecr:GetAuthorizationToken", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer",
             "ecr:BatchCheckLayerAvailability"},
}  # fmt: skip


def _policy(name: str) -> dict:
    text = (POLICIES / name).read_text()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    assert "${" not in text, f"{name} has a placeholder docs/aws.md does not list"
    return json.loads(text)


def _actions(policy: dict) -> set[str]:
    found = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and "NotAction" not in statement
        actions = statement["Action"]
        found |= {actions} if isinstance(actions, str) else set(actions)
    return found


def _calls_in_code() -> set[str]:
    """Every AWS API operation modelyard's own code calls, as IAM actions (each module talks
    to one service; EC2 is read by the inventory plugin, listed in CALLED_ELSEWHERE)."""
    actions = set()
    for module, service in (("stack.py", "s3"), ("package/push.py", "ecr"),
                            ("package/sealing.py", "kms")):  # fmt: skip
        called = set(re.findall(r"\.([a-z_]+)\(", (ROOT / "src/modelyard" / module).read_text()))
        mapping = boto3.client(service, region_name=REGION).meta.method_to_api_mapping
        for method in called & set(mapping):
            action = f"{service}:{mapping[method]}"
            actions.add(ACTION_OF.get(action, action))
    return actions


def test_policies_grant_exactly_what_modelyard_calls_and_load_in_iam(aws):
    pipeline, host = _policy("pipeline-policy.json"), _policy("host-policy.json")
    needed = _calls_in_code() | CALLED_ELSEWHERE["pipeline"]
    assert {"ecr:CreateRepository", "s3:PutBucketVersioning", "kms:GenerateDataKey"} <= needed
    granted = _actions(pipeline)
    assert needed <= granted, f"the pipeline policy lacks {sorted(needed - granted)}"
    assert granted <= needed | {"s3:GetBucketLocation", "s3:GetBucketVersioning",
                                "s3:GetEncryptionConfiguration", "ecr:BatchGetImage",
                                "ecr:GetDownloadUrlForLayer"}, "the policy grants more than is used"  # fmt: skip
    assert _actions(host) == CALLED_ELSEWHERE["host"]
    for policy in (pipeline, host):  # no wildcard actions; "*" resources only where IAM has no ARN
        for statement in policy["Statement"]:
            actions = (
                statement["Action"]
                if isinstance(statement["Action"], list)
                else [statement["Action"]]
            )
            assert not any("*" in a for a in actions)
            if statement["Resource"] == "*":
                assert set(actions) <= {"ecr:GetAuthorizationToken", "ec2:DescribeInstances"}
    iam = client("iam", aws)
    for role, trust, policy in (("modelyard-pipeline", "pipeline-trust-github.json", pipeline),
                                ("modelyard-host", "host-trust.json", host)):  # fmt: skip
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(_policy(trust)))
        arn = iam.create_policy(PolicyName=role, PolicyDocument=json.dumps(policy))["Policy"]["Arn"]
        iam.attach_role_policy(RoleName=role, PolicyArn=arn)
        attached = iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]
        assert [p["PolicyArn"] for p in attached] == [arn]


# --- secrets ----------------------------------------------------------------------------------------


def test_no_secret_and_no_plaintext_model_appears_anywhere(
    stack, aws, project, registered, tmp_path
):
    """The AWS secret key, the serving token, the signing key (its PEM body) and the bundle's
    data key, and the ONNX model in the clear, searched for in every place a run leaves
    something: the workspace's files and logs (stack servers, Ansible runs, bundles, the
    deployed service's folder, databases), MLflow tags, params and artifacts of every run and
    version (the release ledger included), Prefect's flow runs and artifacts, and the image's
    layers. The bundle was sealed with a KMS data key: only unwrapped, here, does it open."""
    # Served on this machine (the deploy is a no-op if the other test did it): the host's disk.
    deployed = stack.cli("deploy", "staging", "--version", "1", "--spec", str(project.spec_path))
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    assert version_at(f"http://127.0.0.1:{registered[1]}") == "1"
    onnx, data_key = _opened_model(stack, aws, tmp_path)
    secrets = {"AWS secret key": SECRET, "serving token": SERVE_TOKEN,
               "signing key": "".join(SIGNING_KEY.splitlines()[1:-1]),
               "bundle key": base64.b64encode(data_key).decode()}  # fmt: skip
    places: dict[str, bytes] = {}
    for path in stack.workspace.rglob("*"):
        if path.is_file() and path.suffix != ".whl" and path.stat().st_size < 200_000_000:
            places[f"file {path.relative_to(stack.workspace)}"] = path.read_bytes()
    mlflow = MlflowClient(stack.url("mlflow"), stack.url("mlflow"))
    for experiment in mlflow.search_experiments():
        for run in mlflow.search_runs([experiment.experiment_id]):
            places[f"MLflow run {run.info.run_id}"] = repr(
                (run.data.tags, run.data.params)
            ).encode()
            folder = Path(
                mlflow.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id))
            )
            for artifact in folder.rglob("*"):
                if artifact.is_file():
                    places[f"artifact {artifact.relative_to(tmp_path)}"] = artifact.read_bytes()
    for model in mlflow.search_registered_models():
        for version in mlflow.search_model_versions(f"name = '{model.name}'"):
            places[f"version {model.name}/{version.version}"] = repr(version.tags).encode()
    prefect = stack.url("prefect") + "/api"
    for route in ("flow_runs/filter", "artifacts/filter", "task_runs/filter"):
        places[f"Prefect {route}"] = httpx.post(f"{prefect}/{route}", json={}, timeout=30).content
    image = mlflow.get_model_version("aws-ads", "1").tags["image_ref"]
    places[f"image {image}"] = subprocess.run(["docker", "save", image], capture_output=True,
                                              check=True).stdout  # fmt: skip
    assert len(places) > 50 and any(k.startswith("artifact") for k in places)

    # Pieces of the model's bytes (its weights and trees, not the generic ONNX header).
    pieces = {f"model bytes at {at}": onnx[at : at + 48] for at in
              (len(onnx) // 4, len(onnx) // 2, 3 * len(onnx) // 4, len(onnx) - 48)}  # fmt: skip
    wanted = {name: secret.encode() for name, secret in secrets.items()} | pieces

    def leaks(where: dict[str, bytes]) -> list[str]:
        return [f"{name} in {place}" for place, data in where.items()
                for name, secret in wanted.items() if secret in data]  # fmt: skip

    assert leaks({"planted": f"token={SERVE_TOKEN}".encode()}) == ["serving token in planted"]
    assert leaks({"planted": b"x" + onnx}) == [f"{p} in planted" for p in pieces]
    assert not leaks(places), leaks(places)


def _opened_model(stack: Stack, aws: dict, tmp_path: Path) -> tuple[bytes, bytes]:
    """Version 1's ONNX model in the clear and its data key, as KMS unwraps it."""
    mlflow = MlflowClient(stack.url("mlflow"), stack.url("mlflow"))
    artifact = mlflow.get_model_version("aws-ads", "1").tags["bundle_artifact"]
    run_id, path = artifact.removeprefix("runs:/").split("/", 1)
    archive = Path(mlflow.download_artifacts(run_id, path, str(tmp_path / "sealed")))
    folder = from_tarball(archive.read_bytes(), tmp_path / "bundle")
    sealed = json.loads((folder / MANIFEST).read_text())["encryption"]
    assert sealed["kms_key"] == stack.env["MODELYARD_BUNDLE_KMS_KEY"]
    key = client("kms", aws).decrypt(CiphertextBlob=base64.b64decode(sealed["wrapped_key"]))
    model = decrypt((folder / "model.onnx").read_bytes(), "model.onnx", key["Plaintext"])
    assert model[:200].count(b"onnx") and len(model) > 1000  # an ONNX model, opened
    return model, key["Plaintext"]
