"""The scale-out set-up by settings alone: `modelyard stack up` with the Prefect and MLflow
servers on a real PostgreSQL (Debian's) and MLflow's artifacts in S3 (moto in server mode),
then a pipeline run through them."""

from __future__ import annotations

from pathlib import Path

import boto3
import httpx
import pytest
from mlflow import MlflowClient

from tests.conftest import Project
from tests.stacks import Stack

# Every test here needs a server: `make check` need not even import the module.
pytestmark = pytest.mark.integration

BUCKET = "modelyard-scale-out"


def test_stack_on_postgresql_and_s3_runs_the_pipeline(
    postgres, moto, tmp_path, wheelhouse, empty_prefect_db
):
    s3 = moto
    port, psql, password = postgres.port, postgres.psql, postgres.password
    for database in ("prefect", "mlflow"):
        psql(f"CREATE DATABASE {database} OWNER modelyard")
    stack = Stack(tmp_path / "workspace", wheelhouse, empty_prefect_db)
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": s3}  # fmt: skip
    stack.env |= aws | {
        "MODELYARD_PREFECT_DATABASE_URL":
            f"postgresql+asyncpg://modelyard:{password}@127.0.0.1:{port}/prefect",
        "MODELYARD_MLFLOW_BACKEND_STORE_URI":
            f"postgresql://modelyard:{password}@127.0.0.1:{port}/mlflow",
        "MODELYARD_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
        "MODELYARD_BUILD_IMAGE": "never",
    }  # fmt: skip
    up = stack.cli("stack", "up", "prefect", "mlflow")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        project = Project(tmp_path / "repo", "ad_clicks", "scale-out-ads")
        run = stack.cli("run", "--no-deploy", "--spec", str(project.spec_path))
        assert run.returncode == 0, run.stdout + run.stderr
        assert stack.url("prefect") in run.stdout  # the run went to the stack's Prefect

        # The runs, versions and flow runs live in PostgreSQL ...
        assert (
            psql("SELECT count(*) FROM model_versions WHERE name = 'scale-out-ads'", "mlflow")
            == "1"
        )
        assert int(psql("SELECT count(*) FROM flow_run", "prefect")) >= 1
        # ... the artifacts in S3, in a bucket made with versioning and encryption on ...
        client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]]
        assert any(k.startswith("mlflow/") and k.endswith(".bundle.tar.gz") for k in keys)
        assert client.get_bucket_versioning(Bucket=BUCKET)["Status"] == "Enabled"
        rules = client.get_bucket_encryption(Bucket=BUCKET)["ServerSideEncryptionConfiguration"]
        assert rules["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
        # ... and they read back through the MLflow server.
        # Both URIs: an earlier test in this process may have set a global registry URI.
        mlflow = MlflowClient(stack.url("mlflow"), stack.url("mlflow"))
        version = mlflow.get_model_version("scale-out-ads", "1")
        bundle = version.tags["bundle_artifact"]
        run_id = bundle.removeprefix("runs:/").split("/")[0]
        local = mlflow.download_artifacts(run_id, "bundle", str(tmp_path / "back"))
        assert any(p.name.endswith(".bundle.tar.gz") for p in Path(local).iterdir())
        health = httpx.get(stack.url("prefect") + "/api/health", timeout=10)
        assert health.status_code == 200

        # The database password is in no process's arguments and no stack log.
        for service in ("prefect", "mlflow"):
            state = (stack.workspace / "stack" / service / "state.json").read_text()
            pid = int(state.split('"pid": ')[1].split(",")[0])
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert password.encode() not in argv
            assert password not in (stack.workspace / "stack" / service / "log").read_text()
        assert password not in run.stdout + run.stderr
    finally:
        stack.cli("stack", "down")
