"""`make demo`: both examples through the whole pipeline, approvals included, then a question
to the production service, like a client would ask it.

Each `modelyard run` deploys its candidate to staging and pauses for approval before
production; this script plays the person and approves from the terminal, as
`modelyard approve RUN` does it for anyone.

Usage: python examples/demo.py [WORKSPACE]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELYARD = str(Path(sys.executable).with_name("modelyard"))
EXAMPLES = ("house_prices", "ad_clicks")
WAITING = re.compile(r"`modelyard approve ([0-9a-f-]{36})`")
VISITOR = {"age": 29, "gender": "female", "pages_viewed": 41, "previous_clicks": 4,
           "time_on_site": 17.5, "device": "desktop"}  # fmt: skip


def run_and_approve(example: str) -> None:
    spec = ROOT / "examples" / example / "modelyard.yaml"
    run = subprocess.Popen([MODELYARD, "run", "--spec", str(spec)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert run.stdout is not None
    for line in run.stdout:
        print(line, end="")
        waiting = WAITING.search(line)
        if waiting:
            print(f"\n>>> the demo approves run {waiting.group(1)} (a person would, in the UI)\n")
            subprocess.run([MODELYARD, "approve", waiting.group(1), "--comment", "make demo"],
                           check=True)  # fmt: skip
    if run.wait() != 0:
        sys.exit(f"modelyard run on {example} failed (exit {run.returncode})")


def production_port() -> int:
    import yaml

    spec = yaml.safe_load((ROOT / "examples" / "ad_clicks" / "modelyard.yaml").read_text())
    return int(spec["deploy"]["environments"]["production"]["port"])


def ask(url: str, body: dict, token: str) -> dict:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def ask_production(workspace: Path) -> None:
    url = f"http://127.0.0.1:{production_port()}"
    token = (workspace / "serve-token").read_text().strip()
    with urllib.request.urlopen(f"{url}/version", timeout=5) as response:
        version = json.load(response)["model_version"]
    mlflow_style = ask(f"{url}/invocations", {"dataframe_records": [VISITOR]}, token)
    v2_inputs = [
        {
            "name": k,
            "shape": [1],
            "datatype": "BYTES" if isinstance(v, str) else "FP32",
            "data": [v],
        }
        for k, v in VISITOR.items()
    ]
    v2 = ask(f"{url}/v2/models/ad_clicks/infer", {"inputs": v2_inputs}, token)
    proba = next(o["data"][1] for o in v2["outputs"] if o["name"] == "predict_proba")
    print(f"\nProduction ({url}) serves ad_clicks v{version}:")
    print(f"  visitor {VISITOR}")
    print(f"  /invocations → {mlflow_style}   (1 = will click)")
    print(f"  /v2/models/ad_clicks/infer → click probability {proba:.3f}")


def main() -> None:
    workspace = Path(sys.argv[1] if len(sys.argv) > 1 else ".modelyard")
    for example in EXAMPLES:
        run_and_approve(example)
    subprocess.run([MODELYARD, "models"], check=True)
    subprocess.run([MODELYARD, "history"], check=True)
    ask_production(workspace)


if __name__ == "__main__":
    main()
