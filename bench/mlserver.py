"""MLServer (Seldon) as a peer in the serving benchmark: pinned, in a virtualenv of its own.

Its scikit-learn runtime serves the same fitted pipeline MLflow registered (saved with joblib, as
the runtime loads it), with one parallel inference worker per core. MLServer 1.7.1's parallel
workers need `uvloop<0.21`; its runtime hands the model a DataFrame only when the request says
`content_type: pd`. scikit-learn, LightGBM, numpy and pandas are pinned to modelyard's own
versions, so the pickled pipeline loads as it was fitted.
"""

from __future__ import annotations

import json
import os
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

from modelyard.ports import free_ports

MLSERVER = ("mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop<0.21")
SAME_AS_OURS = ("scikit-learn", "lightgbm", "numpy", "pandas", "joblib", "scipy")
_V2_TYPES = {"float": "FP64", "int": "FP64", "str": "BYTES"}


def environment(cache: Path, uv: Path) -> Path:
    """The virtualenv's `mlserver` command, made once under `cache`."""
    venv = cache / "mlserver-1.7.1"
    done = venv / ".installed"
    if not done.is_file():
        subprocess.run([str(uv), "venv", "--quiet", "--python", "3.11", str(venv)], check=True)
        pins = [f"{name}=={version(name)}" for name in SAME_AS_OURS]
        subprocess.run([str(uv), "pip", "install", "--quiet", "--python", str(venv / "bin/python"),
                        *MLSERVER, *pins], check=True)  # fmt: skip
        done.touch()
    return venv / "bin" / "mlserver"


def model_folder(workspace: Path, tracking_uri: str, name: str, model_version: str) -> Path:
    """A model repository of one model: the registered pipeline as `model.joblib`, its
    model-settings.json, and the server's settings.json (ports chosen here)."""
    import joblib
    import mlflow.sklearn

    folder = workspace / "mlserver" / name
    folder.mkdir(parents=True)
    mlflow.set_tracking_uri(tracking_uri)
    joblib.dump(mlflow.sklearn.load_model(f"models:/{name}/{model_version}"),
                folder / "model.joblib")  # fmt: skip
    (folder / "model-settings.json").write_text(json.dumps({
        "name": name, "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": model_version},
    }))  # fmt: skip
    http = free_ports(3)
    grpc, metrics = http + 1, http + 2
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": http, "grpc_port": grpc, "metrics_port": metrics,
        "parallel_workers": os.cpu_count() or 1, "debug": False,
        "metrics_dir": str(folder / "metrics"),
    }))  # fmt: skip
    return folder


def port(folder: Path) -> int:
    port_number: int = json.loads((folder / "settings.json").read_text())["http_port"]
    return port_number


def v2_request(split: dict[str, Any]) -> dict[str, Any]:
    """A `dataframe_split` as an Open Inference Protocol request, one tensor per column, that
    MLServer's runtime turns into the DataFrame the pipeline was fitted on."""
    columns = list(zip(*split["data"], strict=True))
    inputs = []
    for name, values in zip(split["columns"], columns, strict=True):
        kinds = {type(v).__name__ for v in values if v is not None}
        datatype = _V2_TYPES[kinds.pop()] if len(kinds) == 1 else "BYTES"
        inputs.append({"name": name, "shape": [len(values)], "datatype": datatype,
                       "data": list(values)})  # fmt: skip
    return {"parameters": {"content_type": "pd"}, "inputs": inputs}


def predictions(answer: dict[str, Any]) -> list[Any]:
    """The `predict` output of MLServer's answer."""
    data: list[Any] = answer["outputs"][0]["data"]
    return data
