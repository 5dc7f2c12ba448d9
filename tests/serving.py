"""Helpers shared by the serving tests: build a signed bundle, run `modelyard serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelyard import stages
from modelyard.bundle import Encryption, load_or_create_key, public_key_text
from modelyard.package.build import BuiltBundle, build_bundle
from modelyard.spec import Estimator, Spec, load_spec
from tests.conftest import ROOT, free_port, wait_for

TOKEN = "test-token-" + "x" * 20


@dataclass
class Built:
    spec: Spec
    prepared: stages.Prepared
    trained: stages.TrainResult
    bundle: BuiltBundle
    public_key: str
    key_file: Path  # the signing key


def build_example(
    example: str,
    out: Path,
    estimator: dict[str, Any] | None = None,
    key_file: Path | None = None,
    encryption: Encryption | None = None,
) -> Built:
    """The example trained (with `estimator` instead of its own, given as the spec's
    `estimator` field) and sealed with the key at `key_file` (default: a new one in `out`)."""
    spec = load_spec(ROOT / "examples" / example / "modelyard.yaml")
    if estimator is not None:
        spec = spec.model_copy(update={"estimator": Estimator.model_validate(estimator)})
    prepared = stages.prepare(spec)
    trained = stages.train(spec, prepared.splits)
    key_file = key_file or out / "signing.pem"
    key = load_or_create_key(key_file)
    bundle = build_bundle(spec, trained.model, prepared.splits.eval, out, key,
                          {"model_version": "7", "git_commit": "0" * 40}, encryption)  # fmt: skip
    return Built(spec, prepared, trained, bundle, public_key_text(key.public_key()), key_file)


# Run by a serving environment's own python with a bundle's path: which of the installed
# distributions serving leaves unimported once its app is built and warm and its HTTP layer and
# event loop are loaded (the last line printed, as JSON).
SERVING_IMPORTS = """
import json, sys
from importlib.metadata import distributions, packages_distributions
from pathlib import Path
import uvloop
import modelyard.serve.http
from modelyard.serve.server import ServeConfig, build_app
build_app(ServeConfig.from_env(Path(sys.argv[1]))).start()
owners = packages_distributions()
def norm(name):
    return name.lower().replace("_", "-")
imported = {norm(d) for m in list(sys.modules) for d in owners.get(m.split(".")[0], [])}
installed = {norm(d.metadata["Name"]) for d in distributions()}
print(json.dumps({"unused": sorted(installed - imported), "installed": sorted(installed)}))
"""


def unused_distributions(printed: str) -> list[str]:
    """What `SERVING_IMPORTS` found installed and never imported, from its output."""
    report = json.loads(printed.strip().splitlines()[-1])
    assert "modelyard" in report["installed"], report
    unused: list[str] = report["unused"]
    return unused


def children_of(pid: int | str) -> list[int]:
    """The processes `pid` forked that still run (a server's workers, nginx's)."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


class Server:
    """`modelyard serve` as a subprocess on a free loopback port."""

    def __init__(
        self, bundle: Path, public_key: str, workers: int = 2, port: int = 0, **env: str
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).with_name("modelyard")
        self.process = subprocess.Popen(
            [str(exe), "serve", str(bundle), "--port", str(self.port), "--workers", str(workers)],
            env={**os.environ, "MODELYARD_TRUSTED_KEYS": public_key, "MODELYARD_SERVE_TOKEN": TOKEN,
                 "MODELYARD_WORKSPACE": str(bundle.parent / "ws"), **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def start(self) -> Server:
        wait_for(f"{self.url}/health/ready", timeout=60)
        return self

    def stop(self) -> str:
        self.process.terminate()
        out, _ = self.process.communicate(timeout=30)
        return out
