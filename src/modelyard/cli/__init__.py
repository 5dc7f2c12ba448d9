"""The `modelyard` command: the same operations for people and for CI.

One module per command group; each registers its commands on the shared `app`:
- `pipeline`: validate-spec, init, run, models, monitor
- `releases`: deploy, rollback, history, approve, reject
- `serving`: serve
- `orchestration`: pipelines, trigger, worker, webhook, hooks
- `operations`: stack, doctor, aws

Commands parse arguments, call the core and print; decisions are the core's. A
`ModelyardError` becomes one red line and its exit code (`common.reports_errors`).
"""

import atexit
import gc

from modelyard.cli import operations, orchestration, pipeline, releases, serving
from modelyard.cli.common import app

# Registered first, so it runs last of the exit handlers: the interpreter's final collections
# then skip the objects MLflow, Prefect and scikit-learn leave (a second of every command's
# exit, each time it imported the pipeline). Nothing in them is waited for: the handlers that
# flush run before it, and files are closed as their last references go, not by the collector.
atexit.register(gc.freeze)

__all__ = ["app", "operations", "orchestration", "pipeline", "releases", "serving"]
