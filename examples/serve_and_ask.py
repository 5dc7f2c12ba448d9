"""The demo's last step: serve the newest ad-clicks bundle and ask it one question, like a client.

Usage: python examples/serve_and_ask.py [WORKSPACE]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PORT = int(os.environ.get("DEMO_PORT", "8089"))
VISITOR = {"age": 29, "gender": "female", "pages_viewed": 41, "previous_clicks": 4,
           "time_on_site": 17.5, "device": "desktop"}  # fmt: skip


def newest_bundle(workspace: Path) -> Path:
    bundles = sorted(
        (workspace / "bundles" / "ad_clicks").glob("*/bundle"), key=lambda p: int(p.parent.name)
    )
    if not bundles:
        sys.exit(f"no ad_clicks bundle under {workspace}; run `make demo` first")
    return bundles[-1]


def ask(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def main() -> None:
    workspace = Path(sys.argv[1] if len(sys.argv) > 1 else ".modelyard")
    bundle = newest_bundle(workspace)
    modelyard = Path(sys.executable).with_name("modelyard")
    command = [str(modelyard), "serve", str(bundle), "--port", str(PORT), "--workers", "1"]
    # The workspace's dev signing key is the one `modelyard serve` must trust.
    server = subprocess.Popen(command, env={**os.environ, "MODELYARD_WORKSPACE": str(workspace)})
    try:
        for _ in range(100):
            if server.poll() is not None:
                sys.exit(f"the server exited with code {server.returncode}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        mlflow_style = ask(f"http://127.0.0.1:{PORT}/invocations", {"dataframe_records": [VISITOR]})
        v2_inputs = [
            {
                "name": k,
                "shape": [1],
                "datatype": "BYTES" if isinstance(v, str) else "FP32",
                "data": [v],
            }
            for k, v in VISITOR.items()
        ]
        v2 = ask(f"http://127.0.0.1:{PORT}/v2/models/ad_clicks/infer", {"inputs": v2_inputs})
        proba = next(o["data"][1] for o in v2["outputs"] if o["name"] == "predict_proba")
        print(f"\nServed {bundle}:")
        print(f"  visitor {VISITOR}")
        print(f"  /invocations → {mlflow_style}   (1 = will click)")
        print(f"  /v2/models/ad_clicks/infer → click probability {proba:.3f}")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
