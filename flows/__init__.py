"""Prefect flows: wiring, retries, caching and artifacts around the core stages."""

import os
from pathlib import Path

# Without a server, Prefect keeps its database in PREFECT_HOME (the workspace's `prefect`
# folder, `Settings.orchestrator_env`). Prefect makes that folder when first imported, but not
# its parents: in a new user's first run, before anything made the workspace, the embedded
# server then cannot open its database and the run fails after the start timeout. Every flow
# import comes through here, before Prefect's.
if os.environ.get("PREFECT_HOME"):
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
