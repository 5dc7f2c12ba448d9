"""Monitoring end to end: a deployed version scraped by the stack's real Prometheus through the
deploy stage's file-based discovery, traffic from the reference distribution and then shifted
traffic, the drift recording rules and alert, the alert reaching a webhook and a mailbox through
the stack's Alertmanager, the monitor flow's PSI, MLflow record, Prefect artifact and exactly
one retraining run, and every Grafana panel's query returning data."""

from __future__ import annotations

import email
import json
import math
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from aiosmtpd.controller import Controller
from mlflow.tracking import MlflowClient

from modelyard.ports import free_port, free_ports
from tests.conftest import ROOT, Project, example_data
from tests.hosts import stop_services
from tests.stacks import Stack, wait_until

RULES = ROOT / "infra" / "prometheus"
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "modelyard-model.json"
ROWS_PER_REQUEST = 50


# --- the pieces on their own ---------------------------------------------------------------------


def test_promtool_rule_tests_pass_and_catch_a_broken_rule(tmp_path):
    done = subprocess.run(["promtool", "test", "rules", "rules.test.yml"], cwd=RULES,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # The same tests against a rule file whose drift floor is wrong must fail.
    broken = (RULES / "rules.yml").read_text().replace("0.0001", "0.01")
    (tmp_path / "rules.yml").write_text(broken)
    (tmp_path / "rules.test.yml").write_text((RULES / "rules.test.yml").read_text())
    failed = subprocess.run(["promtool", "test", "rules", "rules.test.yml"], cwd=tmp_path,
                            capture_output=True, text=True)  # fmt: skip
    assert failed.returncode != 0 and "modelyard:input_psi:15m" in failed.stdout + failed.stderr


# --- the loop, end to end ------------------------------------------------------------------------


WEBHOOK_TOKEN = "alert-hook-token-5e2c"
ON_CALL = "ml-oncall@example.com"


@pytest.fixture(scope="module")
def receivers() -> Iterator[tuple[Webhook, Mailbox]]:
    with Webhook() as webhook, Mailbox() as mailbox:
        yield webhook, mailbox


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    wheelhouse: Path,
    empty_prefect_db: Path,
    receivers: tuple[Webhook, Mailbox],
) -> Iterator[Stack]:
    webhook, mailbox = receivers
    stack = Stack(tmp_path_factory.mktemp("monitoring") / "workspace", wheelhouse, empty_prefect_db)
    # The shipped routes, as a team's own file (MODELYARD_ALERT_ROUTES) that sends a new group
    # after a second instead of 30: the drift alert is the point, not the wait.
    routes = yaml.safe_load((RULES / "alertmanager.yml").read_text())
    routes["route"]["group_wait"] = "1s"
    (stack.workspace.parent / "routes.yml").write_text(yaml.safe_dump(routes))
    stack.env |= {
        "MODELYARD_ALERT_ROUTES": str(stack.workspace.parent / "routes.yml"),
        "MODELYARD_PROMETHEUS_INTERVAL": "1",  # scrape and evaluate every second
        # Alerts to a person: a webhook that wants a token, and mail through a relay here.
        "MODELYARD_ALERT_WEBHOOK_URL": webhook.url,
        "MODELYARD_ALERT_WEBHOOK_TOKEN": WEBHOOK_TOKEN,
        "MODELYARD_ALERT_EMAIL_TO": ON_CALL,
        "MODELYARD_ALERT_SMTP_RELAY": mailbox.relay,
        "MODELYARD_ALERT_SMTP_TLS": "false",
    }
    up = stack.cli("stack", "up", "prefect", "mlflow", "prometheus", "alertmanager")
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"alertmanager: alerts go to a webhook and mail to {ON_CALL}" in up.stdout
    assert WEBHOOK_TOKEN not in up.stdout + up.stderr
    yield stack
    stack.cli("stack", "down")
    stop_services(stack.workspace)


pytestmark = pytest.mark.docker


def test_drift_fires_the_alert_and_retrains_once(stack, receivers, tmp_path):
    model = "drift-ads"
    project = Project(tmp_path / "work", "ad_clicks", model)
    port = free_ports(3)
    monitoring = {"window": 900, "min_rows": 200, "drift_threshold": 0.25, "cooldown": 3600}
    project.write_spec(project.spec() | {
        "deploy": {"environments": {"staging": {"target": "local", "port": port}}},
        "monitoring": monitoring,
    }, "deploy and monitor")  # fmt: skip
    spec = str(project.spec_path)

    applied = stack.cli("pipelines", "apply", spec, "--pool", "drift-pool")
    assert applied.returncode == 0, applied.stderr
    assert f"modelyard-monitor/{model}-staging: scheduled drift check" in applied.stdout
    scheduled = httpx.post(f"{stack.url('prefect')}/api/deployments/filter", timeout=10,
                           json={"deployments": {"name": {"any_": [f"{model}-staging"]}}}).json()  # fmt: skip
    assert scheduled[0]["schedules"][0]["schedule"]["interval"] == 900.0
    assert scheduled[0]["parameters"]["monitoring"]["drift_threshold"] == 0.25
    trained = stack.cli("run", "--spec", spec, "--no-deploy", MODELYARD_BUILD_IMAGE="always")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    deployed = stack.cli("deploy", "staging", "--version", "1", "--spec", spec)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    # The deploy stage listed the live slot for Prometheus (the first deploy's is blue, on the
    # front door's port + 1), labelled for dashboards, alerts and a canary's analysis.
    targets = json.loads((stack.workspace / "stack/prometheus/targets" /
                          f"{model}-staging.json").read_text())  # fmt: skip
    assert targets == [{"targets": [f"127.0.0.1:{port + 1}"], "labels": {
        "model": model, "environment": "staging", "version": "1", "host": "localhost",
        "slot": "blue"}}]  # fmt: skip
    prometheus = Prometheus(stack.url("prometheus"))
    selector = f'model="{model}",environment="staging"'
    wait_until("Prometheus scraping the service",
               lambda: prometheus.values(f"up{{{selector}}}") == [1.0], timeout=60)  # fmt: skip

    client = Client(f"http://127.0.0.1:{port}", (stack.workspace / "serve-token").read_text())
    reference = _rows(seed=101)
    client.predict(reference[:1000])
    client.bad_requests()
    psi_now = f"max(modelyard:input_psi:15m{{{selector}}})"
    # The score over all 1,000 rows, not over a scrape that landed mid-way (a PSI from a few
    # hundred rows is noisy enough to cross 0.1 now and then).
    rows = f"sum(modelyard_predicted_rows_total{{{selector}}})"
    wait_until("Prometheus to scrape all reference rows",
               lambda: (prometheus.values(rows) or [0.0])[0] >= 1000, timeout=60)  # fmt: skip
    scraped = time.time()
    scored = f"min(timestamp(modelyard:input_psi:15m{{{selector}}}))"
    wait_until("a drift score over all of them",
               lambda: (prometheus.values(scored) or [0.0])[0] > scraped, timeout=60)  # fmt: skip
    calm = prometheus.values(psi_now)
    assert calm[0] < 0.1, f"reference traffic scored PSI {calm}"
    quiet = stack.cli("monitor", "--spec", spec, "--environment", "staging")
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert "no drift" in quiet.stdout and "retraining" not in quiet.stdout

    # Shifted traffic: older visitors, all on tablets, reading three times as many pages.
    shifted = [dict(row, age=min(row["age"] + 25, 99) if row["age"] is not None else None,
                    device="tablet", pages_viewed=row["pages_viewed"] * 3)
               for row in _rows(seed=202)]  # fmt: skip
    client.predict(shifted)
    wait_until("the drift score to rise",
               lambda: (prometheus.values(psi_now) or [0])[0] > 0.25, timeout=60)  # fmt: skip
    alert = f'ALERTS{{alertname="ModelyardInputDrift",alertstate="firing",{selector}}}'
    # Every panel of the Grafana dashboard, and its deploy annotation, returns series (but the
    # shadow's, which has data only while one runs: tests/test_deploy.py's shadow test).
    for title, expr in dashboard_queries(model, shadow=False):
        assert prometheus.query(expr), f"dashboard panel {title!r} has no data: {expr}"

    first = stack.cli("monitor", "--spec", spec, "--environment", "staging")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "retraining: started" in first.stdout, first.stdout
    second = stack.cli("monitor", "--spec", spec, "--environment", "staging")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "retraining: cooldown" in second.stdout, second.stdout
    retrains = stack.flow_runs(f"model:{model}", "trigger:drift")
    assert len(retrains) == 1, retrains
    commit = project.head
    assert retrains[0]["parameters"]["commit"] == commit
    assert retrains[0]["name"] == f"{model}@{commit[:8]}"

    firing = wait_until("the drift alert to fire", lambda: prometheus.query(alert), timeout=120)
    assert {a["metric"]["feature"] for a in firing} >= {"age", "device", "pages_viewed"}

    # What the monitor flow recorded: PSI per signal agreeing with Prometheus's rule, plots.
    checks = _monitoring_runs(stack, model)
    assert [r.data.tags["verdict"] for r in checks] == ["drifted", "drifted", "stable"]
    latest = checks[0]
    assert {"age", "device", "pages_viewed"} <= set(latest.data.tags["drifted"].split(","))
    rule = {s["metric"]["feature"]: float(s["value"][1])
            for s in prometheus.query(f"modelyard:input_psi:15m{{{selector}}}")}  # fmt: skip
    for feature, value in rule.items():
        # Same window and floor; the two reads are a few seconds apart.
        assert latest.data.metrics[f"psi.{feature}"] == pytest.approx(value, rel=0.15, abs=0.02)
    assert latest.data.metrics["psi.prediction"] > 0
    files = {
        f.path
        for f in MlflowClient(stack.url("mlflow")).list_artifacts(latest.info.run_id, "drift")
    }
    assert {"drift/drift_psi.png", "drift/prediction_distribution.png",
            "drift/input_distributions.png", "drift/report.json"} <= files  # fmt: skip
    assert checks[1].data.tags["retrain_run"] == retrains[0]["id"]  # the check that started it
    assert "retrain_run" not in latest.data.tags and latest.data.tags["retrain"].startswith(
        "cooldown"
    )
    artifact = _prefect_artifact(stack, f"{model}-staging-drift")
    assert "**drifted**" in artifact["data"] and "| age |" in artifact["data"]

    # The firing alert reached a person: one grouped message per model and environment (the
    # shipped routes), at the webhook with its token and in the on-call mailbox.
    webhook, mailbox = receivers
    drifted = {"model": model, "environment": "staging"}
    posts = wait_until("the drift alert at the webhook", lambda: [
        p for p in webhook.posts if p["body"]["groupLabels"] == drifted], timeout=120)  # fmt: skip
    post = posts[0]
    assert post["authorization"] == f"Bearer {WEBHOOK_TOKEN}"
    assert post["body"]["status"] == "firing" and post["body"]["receiver"] == "people"
    sent = {(a["labels"]["alertname"], a["labels"].get("feature")) for a in post["body"]["alerts"]}
    assert {("ModelyardInputDrift", f) for f in ("age", "device", "pages_viewed")} <= sent
    mails = wait_until("the drift alert in the mailbox", lambda: [
        m for m in mailbox.messages if model in m.as_string()], timeout=60)  # fmt: skip
    assert mails[0]["To"] == ON_CALL and "[FIRING:" in mails[0]["Subject"]


def test_a_removed_host_is_dropped_without_a_restart(stack):
    """File-based discovery: Prometheus follows the targets files as they change."""
    folder = stack.workspace / "stack" / "prometheus" / "targets"
    extra = folder / "gone-staging.json"
    extra.write_text(json.dumps([{"targets": ["127.0.0.1:9"], "labels": {"model": "gone"}}]))
    prometheus = Prometheus(stack.url("prometheus"))
    wait_until("the new target", lambda: prometheus.query('up{model="gone"}'), timeout=60)
    extra.unlink()
    wait_until("the target dropped", lambda: not _active_target(stack, "gone"), timeout=60)


# --- helpers -------------------------------------------------------------------------------------


class Webhook:
    """An HTTP receiver on loopback that records every JSON post and its Authorization."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                posts.append({"authorization": self.headers.get("Authorization"),
                              "body": json.loads(body)})  # fmt: skip
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def __enter__(self) -> Webhook:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    """A real SMTP server (aiosmtpd) on loopback standing in for the relay: keeps every mail."""

    def __init__(self) -> None:
        self.messages: list[email.message.Message] = []
        self.controller = Controller(self, hostname="127.0.0.1", port=free_port())
        self.relay = f"127.0.0.1:{self.controller.port}"

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.messages.append(email.message_from_bytes(envelope.content))  # type: ignore[attr-defined]
        return "250 OK"

    def __enter__(self) -> Mailbox:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        assert response.status_code == 200, f"{expr}: {response.text}"
        return response.json()["data"]["result"]

    def values(self, expr: str) -> list[float]:
        return [float(r["value"][1]) for r in self.query(expr)]


class Client:
    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30,
                                 headers={"Authorization": f"Bearer {token.strip()}"})  # fmt: skip

    def predict(self, rows: list[dict]) -> None:
        for start in range(0, len(rows), ROWS_PER_REQUEST):
            chunk = rows[start : start + ROWS_PER_REQUEST]
            response = self.http.post("/invocations", json={"dataframe_records": chunk})
            assert response.status_code == 200, response.text

    def bad_requests(self) -> None:
        """Client mistakes, so the dashboard's error panel has something to show."""
        for body in ({"dataframe_records": [{"age": "old"}]}, {"instances": 7}):
            assert self.http.post("/invocations", json=body).status_code == 400


def _rows(seed: int) -> list[dict]:
    """Rows of the example's own generator: the distribution the model was trained on."""
    frame = example_data("ad_clicks").generate(6000, seed).drop(columns=["clicked"])
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in frame.to_dict("records")
    ]


def _monitoring_runs(stack: Stack, model: str) -> list:
    client = MlflowClient(stack.url("mlflow"))
    experiment = client.get_experiment_by_name("modelyard-monitoring")
    return client.search_runs([experiment.experiment_id], f"tags.model = '{model}'",
                              order_by=["attributes.start_time DESC"])  # fmt: skip


def _prefect_artifact(stack: Stack, key: str) -> dict:
    response = httpx.post(f"{stack.url('prefect')}/api/artifacts/latest/filter",
                          json={"artifacts": {"key": {"any_": [key]}}}, timeout=10)  # fmt: skip
    response.raise_for_status()
    found = response.json()
    assert found, f"no Prefect artifact {key}"
    return found[0]


def dashboard_queries(model: str, shadow: bool) -> list[tuple[str, str]]:
    """Each panel target and annotation of the dashboard, its variables filled in as Grafana
    would for this model with every environment selected: those of a shadow's panel alone, or
    all the others."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    queries += [(a["name"], a["expr"]) for a in dashboard["annotations"]["list"]]
    queries = [(title, expr) for title, expr in queries if ("modelyard_shadow_" in expr) == shadow]
    assert len(queries) >= (2 if shadow else 10)
    fill = {"$model": model, "$environment": ".*", "$__rate_interval": "1m", "$__range": "10m"}
    pattern = re.compile("|".join(re.escape(k) for k in sorted(fill, key=len, reverse=True)))
    return [(title, pattern.sub(lambda m: fill[m.group(0)], expr)) for title, expr in queries]


def _active_target(stack: Stack, model: str) -> bool:
    response = httpx.get(f"{stack.url('prometheus')}/api/v1/targets", timeout=10)
    active = response.json()["data"]["activeTargets"]
    return any(t["labels"].get("model") == model for t in active)


def test_dashboard_uses_only_known_metrics():
    """A renamed metric would leave a panel empty in production; names must exist."""
    names = set(re.findall(r"\b(modelyard[:_][a-z0-9_:]+)", DASHBOARD.read_text()))
    rules = (RULES / "rules.yml").read_text()
    source = "".join(p.read_text() for p in (ROOT / "src/modelyard/serve").glob("*.py"))
    for name in names:
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert f"record: {name}" in rules or f'"{base}"' in source, name
