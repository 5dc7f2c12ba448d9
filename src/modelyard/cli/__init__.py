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

from modelyard.cli import operations, orchestration, pipeline, releases, serving
from modelyard.cli.common import app

__all__ = ["app", "operations", "orchestration", "pipeline", "releases", "serving"]
