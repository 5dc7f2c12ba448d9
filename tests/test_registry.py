"""The registry against an in-process SQLite MLflow: a model logged, registered, aliased and
loaded back through a client of its own, with nothing left process-wide afterwards."""

from __future__ import annotations

import os

import pandas as pd
from mlflow.tracking._model_registry import utils as registry_uri
from mlflow.tracking._tracking_service import utils as tracking_uri
from sklearn.linear_model import LogisticRegression

from modelyard import registry
from modelyard.config import Settings


def test_a_model_goes_in_and_comes_back_and_nothing_global_changes(local_settings: Settings):
    environ, uris = dict(os.environ), (tracking_uri._tracking_uri, registry_uri._registry_uri)
    client = registry.connect(local_settings)
    frame = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "y": [1.0, 0.0, 1.0, 0.0]})
    model = LogisticRegression().fit(frame[["x", "y"]], [0, 0, 1, 1])
    experiment = registry.ensure_experiment(client, "e", local_settings)
    run_id = registry.start_run(client, experiment, "r", {"git_commit": "abc"})
    uri = registry.log_training(
        client, run_id, model, {"C": "1.0"}, {"accuracy": 1.0}, frame.head(2),
        model.predict(frame.head(2)), files=[],
    )  # fmt: skip
    version = registry.register(client, uri, "logged", {"git_commit": "abc"})
    registry.set_alias(client, "logged", registry.CANDIDATE, version)
    registry.end_run(client, run_id)

    assert (version, registry.aliases(client, "logged")) == ("1", {"candidate": "1"})
    champion = registry.load_alias(client, "logged", registry.CANDIDATE)
    assert champion is not None and champion.input_columns == ["x", "y"]
    assert list(champion.model.predict(frame[["x", "y"]])) == [0, 0, 1, 1]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert registry.load_alias(client, "logged", "production") is None
    # No global MLflow URI and no environment variable was left set by any of it.
    assert (tracking_uri._tracking_uri, registry_uri._registry_uri) == uris
    assert dict(os.environ) == environ
