"""Real servers for the tests: an MLflow tracking server (SQLite) and a Prefect API, on loopback."""

from __future__ import annotations

import ast
import contextlib
import functools
import gc
import glob
import importlib.util
import itertools
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from unittest import mock

import pytest
import yaml
from _pytest.mark.expression import Expression
from hypothesis import HealthCheck, settings

from modelyard.config import Settings, disable_telemetry
from modelyard.ports import free_port

if TYPE_CHECKING:  # tests.serving imports this module
    from click.testing import Result

    from tests.serving import Built

ROOT = Path(__file__).resolve().parents[1]
disable_telemetry()

# --- property tests: one verdict per commit in CI, exploration elsewhere ------------------------
# CI (CI=true) derandomizes: every run of a commit draws the same examples, so a red build is the
# commit's fault and a rerun reproduces it (`CI=true pytest ...`). Elsewhere each session draws a
# fresh seed and prints it; `--hypothesis-seed=N` replays it. `make fuzz` multiplies budgets.
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],  # wall-clock: must not decide a verdict
)  # fmt: skip
settings.register_profile("explore", print_blob=True)
IN_CI = os.environ.get("CI", "").lower() == "true"
settings.load_profile("ci" if IN_CI else "explore")
FUZZ_SCALE = int(os.environ.get("MODELYARD_FUZZ_SCALE", "1"))


def examples(ci_budget: int) -> int:
    """A property's example budget: what CI affords, times MODELYARD_FUZZ_SCALE (`make fuzz`)."""
    return ci_budget * FUZZ_SCALE


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Outside CI, a session seed chosen here (Hypothesis's plugin applies it), so that a
    failure can name the seed that found it."""
    if not IN_CI and config.getoption("hypothesis_seed") is None:
        config.option.hypothesis_seed = str(random.SystemRandom().getrandbits(64))


# The serving images tests build carry the model's name as their OCI title.
_MODEL_IMAGES = ["docker", "images", "--no-trunc", "--filter",
                 "label=org.opencontainers.image.title",
                 "--format", "{{.ID}} {{.Repository}}:{{.Tag}}"]  # fmt: skip


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # xdist's controller, or a run without it
        session.config.stash[_IMAGES_BEFORE] = _model_images()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Remove the serving images this run built, once every worker is done: each pipeline run
    builds one, and a machine that runs the suite often filled its disk (711 images, 17 GB).
    Images that were there before, or that a container still runs, stay."""
    before = session.config.stash.get(_IMAGES_BEFORE, None)
    if before is None:
        return
    now = _model_images()
    # Every name of each new image (one pushed to a registry has two): an image goes when its
    # last name does. Without --force, an image a running container uses is refused, and stays.
    names = sorted({name for image, names in now.items() if image not in before for name in names})
    if names:
        subprocess.run(["docker", "rmi", *names], capture_output=True, timeout=300)


_IMAGES_BEFORE = pytest.StashKey[dict[str, set[str]]]()


def _model_images() -> dict[str, set[str]]:
    """Image id -> its names (repository:tag, or the id when it has none)."""
    if not os.environ.get("DOCKER_HOST") or shutil.which("docker") is None:
        return {}
    try:
        listed = subprocess.run(_MODEL_IMAGES, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return {}
    images: dict[str, set[str]] = {}
    for line in listed.stdout.splitlines() if listed.returncode == 0 else []:
        image, name = line.split(" ", 1)
        images.setdefault(image, set()).add(image if name == "<none>:<none>" else name)
    return images


def pytest_report_header(config: pytest.Config) -> str:
    if IN_CI:
        return "hypothesis: derandomized (CI=true): every run draws the same examples"
    return f"hypothesis: --hypothesis-seed={config.getoption('hypothesis_seed')}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and not IN_CI and item.get_closest_marker("hypothesis") is not None:
        seed = item.config.getoption("hypothesis_seed")
        report.sections.append(("hypothesis seed", f"Reproduce: pytest {item.nodeid} "
                                                   f"--hypothesis-seed={seed}"))  # fmt: skip


# --- tiers: `make check` runs what needs no server, no Docker engine and no network --------------
# A test is in the integration tier when it is marked `docker` or uses a fixture that starts a
# server; everything else must run in-process (tests/test_architecture.py keeps that honest).
SERVER_FIXTURES = frozenset({"servers", "mlflow_server", "prefect_api", "moto", "postgres",
                             "wheelhouse", "alertmanager_server", "signed_in_stack"})  # fmt: skip


# Where a tier's time goes: MODELYARD_TEST_CPU_PROFILE=FILE appends, per test, its wall time and
# the whole machine's CPU time meanwhile (servers, Docker builds and Ansible's hosts included).
# Meaningful with one worker (`-n 1` or none); docs/contributing.md shows what it found.
CPU_PROFILE = os.environ.get("MODELYARD_TEST_CPU_PROFILE")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    started, used = time.monotonic(), _machine_cpu_seconds()
    yield
    if CPU_PROFILE:
        with open(CPU_PROFILE, "a") as out:
            out.write(f"{item.nodeid}\t{time.monotonic() - started:.1f}\t"
                      f"{_machine_cpu_seconds() - used:.1f}\n")  # fmt: skip


def _machine_cpu_seconds() -> float:
    if not CPU_PROFILE:
        return 0.0
    with open("/proc/stat") as stat:
        ticks = [int(n) for n in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """A test module none of whose tests the `-m` expression can select is left out without
    being imported: `make check` then never loads the integration modules' Prefect, MLflow
    server and pipeline imports (3 s of each worker's collection)."""
    expression = config.option.markexpr
    if expression and collection_path.name.startswith("test_") and collection_path.suffix == ".py":
        return unselectable(collection_path, expression) or None
    return None


def unselectable(module: Path, expression: str) -> bool:
    """Whether `expression` (as `-m` takes it) selects no test of `module`, judged from the
    marks its `pytestmark` gives every test, whatever other marks each test may have."""
    given = module_marks(module)
    if "docker" in given:
        given.add("integration")  # as pytest_itemcollected marks each of its tests
    compiled = Expression.compile(expression)
    free = sorted(compiled.idents() - given)
    for chosen in itertools.product((False, True), repeat=len(free)):
        present = given | {name for name, on in zip(free, chosen, strict=True) if on}
        try:
            if compiled.evaluate(functools.partial(_has_mark, present)):
                return False
        except _Undecided:
            return False
    return True


class _Undecided(Exception):
    """A mark's arguments are asked for (`-m "slow(reason='x')"`): pytest judges those."""


def _has_mark(present: set[str], name: str, /, **kwargs: object) -> bool:
    if kwargs:
        raise _Undecided
    return name in present


def module_marks(module: Path) -> set[str]:
    """The names of the marks a module's last top-level `pytestmark = ...` gives all its tests;
    none if it is set any other way (in a block, added to), as only importing would tell."""
    try:
        tree = ast.parse(module.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return set()  # pytest reports it when it imports the module
    top = [node for node in tree.body
           if isinstance(node, ast.Assign) and _sets_pytestmark(node)]  # fmt: skip
    stores = [node for node in ast.walk(tree)
              if isinstance(node, ast.Name) and node.id == "pytestmark"
              and isinstance(node.ctx, ast.Store)]  # fmt: skip
    if not top or len(stores) != sum(map(_sets_pytestmark, top)):
        return set()
    return {
        node.attr for node in ast.walk(top[-1].value)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
        and node.value.attr == "mark"
    }  # fmt: skip


def _sets_pytestmark(node: ast.Assign) -> int:
    """How many of `node`'s targets are `pytestmark`."""
    return sum(
        isinstance(target, ast.Name) and target.id == "pytestmark" for target in node.targets
    )


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """After pytest's own last collection: each test process then exits without the
    interpreter's final collections over all the tests imported (2-3 s a worker; as the CLI
    does, modelyard.cli)."""
    gc.freeze()


def pytest_itemcollected(item: pytest.Item) -> None:
    # Marked as each test is collected: xdist reads the groups in its own
    # pytest_collection_modifyitems, which may run before any other.
    if item.get_closest_marker("docker") or SERVER_FIXTURES & set(
        getattr(item, "fixturenames", ())
    ):
        item.add_marker(pytest.mark.integration)
    if item.get_closest_marker("xdist_group") is None and _shares_a_module_fixture(item):
        # `make test` runs with --dist loadgroup: a module's tests that share a fixture built
        # once per module (registered versions, SSH hosts, a stack) stay on one worker, which
        # builds it once. Every other test goes to whichever worker is free.
        item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if getattr(config.option, "loadgroup", False):  # set in xdist workers under --dist loadgroup
        _name_the_groups(items)
    # The long tests first, so that no worker starts one when the others are nearly done.
    items.sort(key=lambda item: item.get_closest_marker("integration") is None)


def _name_the_groups(items: list[pytest.Item]) -> None:
    """What xdist's loadgroup does in each worker, done for pytest 9: the scheduler groups
    tests by an `@group` suffix on their node ids, which pytest-xdist 3.8 writes to
    `item._nodeid`, an attribute pytest 9 no longer reads (it keeps `item._id`)."""
    from _pytest.nodeid import coerce_node_id

    for item in items:
        marker = item.get_closest_marker("xdist_group")
        if marker is not None and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{marker.args[0]}")


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(
        definitions[-1].scope == "module" for definitions in info.name2fixturedefs.values()
    )


@pytest.fixture(autouse=True)
def _process_state_put_back() -> Iterator[None]:
    """What entry points write process-wide (a flow run puts MLflow's credentials in the
    environment; the CLI's callback Prefect's settings too) and MLflow's global URIs, which
    the core only sets for one fluent call, are put back after every test, so that no verdict
    depends on which test ran before (two such leaks failed CI before: 52ee26b, af031e6)."""
    from mlflow.tracking._model_registry import utils as registry_uri
    from mlflow.tracking._tracking_service import utils as tracking_uri

    environ = dict(os.environ)
    uris = tracking_uri._tracking_uri, registry_uri._registry_uri
    yield
    if dict(os.environ) != environ:
        os.environ.clear()
        os.environ.update(environ)
    tracking_uri._tracking_uri, registry_uri._registry_uri = uris


def wait_for(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def _template(run_root: Path, name: str, make: Callable[[Path], None]) -> Path:
    """A database made once for all the run's workers (`make` writes it), as one file."""
    from modelyard.atomic import exclusive

    database = run_root / f"{name}-template" / f"{name}.db"
    with exclusive(run_root / f"{name}-template.lock"):
        if not database.exists():
            made = database.with_name("making.db")
            made.parent.mkdir(exist_ok=True)
            make(made)
            vacuumed = database.with_name("vacuumed.db")
            with sqlite3.connect(made) as db:  # fold a write-ahead log into the file itself
                db.execute("VACUUM INTO ?", (str(vacuumed),))
            vacuumed.rename(database)
    return database


@pytest.fixture(scope="session")
def _empty_mlflow_db(run_root: Path) -> Path:
    """A SQLite MLflow store with its schema made: creating one runs MLflow's migrations, which
    take seconds; copying this one takes milliseconds."""

    def make(path: Path) -> None:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(f"sqlite:///{path}", str(path.parent / "artifacts"))

    return _template(run_root, "mlflow", make)


@pytest.fixture(scope="session")
def empty_prefect_db(run_root: Path) -> Path:
    """A SQLite Prefect database with every migration applied. A Prefect server that starts on
    a new file migrates it first: 7-13 s of CPU, against 5 s for the whole start on this one."""

    def make(path: Path) -> None:
        subprocess.run(
            [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
            env={**os.environ, "PREFECT_SERVER_DATABASE_CONNECTION_URL": sqlite_url(path)},
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip

    return _template(run_root, "prefect", make)


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(scope="session")
def run_root(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The folder every worker of this run shares (xdist gives each worker a basetemp below it)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session")
def built_house(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The house-prices example trained, exported and sealed, for tests that only read it:
    built once per worker (its PMML export starts a JVM). Modules that use it share one xdist
    group, so that one worker builds it."""
    from tests.serving import build_example

    return build_example("house_prices", tmp_path_factory.mktemp("house"))


@pytest.fixture
def local_settings(tmp_path: Path, _empty_mlflow_db: Path) -> Settings:
    """Settings for in-process tests: a workspace and an MLflow store (SQLite, in process) of
    the test's own, holding three versions of a model `m`."""
    from modelyard import registry

    database = tmp_path / "mlflow.db"
    shutil.copy(_empty_mlflow_db, database)
    settings = Settings(workspace=tmp_path / "ws", mlflow_tracking_uri=f"sqlite:///{database}")
    client = registry.connect(settings)
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", "file:///nowhere")
    return settings


class MlflowServer:
    """A real `mlflow server` with a SQLite store and proxied artifacts, stoppable and
    restartable on the same port and store (the fault tests take it away mid-run)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        # As `modelyard stack up` starts it: without MLflow's job runner (stack._mlflow).
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with (self.root / "server.log").open("a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=env)  # fmt: skip
        wait_for(f"{self.url}/health")
        return self

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)  # gunicorn and its worker
            self.process.wait(timeout=30)
            self.process = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory, empty_prefect_db: Path) -> Iterator[str]:
    """A real Prefect API server (Prefect's own test harness starts it in a subprocess), on a
    copy of the migrated template database."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    storage = tmp_path_factory.mktemp("prefect-storage")
    with (
        temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}),
        _prefect_harness(tmp_path_factory.mktemp("prefect-db"), empty_prefect_db),
    ):
        yield str(PREFECT_API_URL.value())


@contextlib.contextmanager
def _prefect_harness(folder: Path, template: Path) -> Iterator[None]:
    """`prefect_test_harness` with its database file in `folder`, copied from `template`. The
    harness names a new temporary folder for it; this hands it `folder` instead."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL
    from prefect.testing import utilities

    database = folder / "prefect-test.db"  # the name the harness gives it
    shutil.copy(template, database)
    with contextlib.ExitStack() as stack:
        with mock.patch.object(utilities, "mkdtemp", lambda: str(folder)):
            stack.enter_context(utilities.prefect_test_harness(server_startup_timeout=120))
        used = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
        assert used == sqlite_url(database), f"the harness no longer uses {database}: {used}"
        yield


@pytest.fixture(scope="session", autouse=True)
def _workspace_of_its_own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each test process (each xdist worker) gets a workspace of its own, never the developer's
    `.modelyard` that the Makefile exports: stack state, locks and releases are per workspace."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MODELYARD_WORKSPACE", str(tmp_path_factory.mktemp("workspace")))
        yield


@pytest.fixture(scope="session")
def wheelhouse(run_root: Path) -> Path:
    """One wheelhouse for every worker of the run (the slow part of a first image build):
    modelyard fills it under a file lock, as concurrent runs on one machine would."""
    house = run_root / "wheelhouse"
    house.mkdir(exist_ok=True)
    return house


@pytest.fixture
def servers(
    mlflow_server: str,
    prefect_api: str,
    wheelhouse: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> dict[str, str]:
    """Point modelyard at the real servers, with a fresh workspace per test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # `modelyard` subprocesses use the session's Prefect server too, as a configured project's
    # would: an embedded one per run costs its migrations each time (the embedded path is
    # test_init_then_run_then_serve_a_users_csv's, and `make demo`'s).
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.setenv("MODELYARD_WORKSPACE", str(tmp_path / "workspace"))
    # No serving image unless a test is about one (it sets "always"): a build and its infra
    # gate cost a run about 10 s, and most runs prove something else.
    monkeypatch.setenv("MODELYARD_BUILD_IMAGE", "never")
    # The wheelhouse is the slow part of a first image build; share it across tests.
    monkeypatch.setenv("MODELYARD_WHEELHOUSE", str(wheelhouse))
    for name in ("GITHUB_SHA", "GIT_COMMIT", "CI_COMMIT_SHA", "MODELYARD_GIT_COMMIT"):
        monkeypatch.delenv(name, raising=False)
    return {"mlflow": mlflow_server, "prefect": prefect_api}


def example_data(example: str) -> ModuleType:
    """An example's own data.py, whose `generate` makes the rows its model was trained on."""
    module_spec = importlib.util.spec_from_file_location(
        f"{example}_data", ROOT / "examples" / example / "data.py"
    )
    assert module_spec and module_spec.loader
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class Project:
    """An example copied into its own git repository, as a user's project would be."""

    def __init__(self, root: Path, example: str, name: str) -> None:
        self.root = root
        self.spec_path = root / "examples" / example / "modelyard.yaml"
        shutil.copytree(ROOT / "examples" / example, self.spec_path.parent)
        shutil.copytree(ROOT / "model_tests", root / "model_tests")
        # A model name per test: the MLflow server is shared by the whole session.
        # No deploy section: tests that deploy write their own environments.
        self.write_spec({**self.spec(), "name": name, "deploy": {}})
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.email", "ci@example.invalid")
        self.git("config", "user.name", "CI")
        self.commit("initial")

    def git(self, *args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=self.root, check=True, capture_output=True, text=True
        )
        return done.stdout.strip()

    def commit(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.head

    @property
    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def spec(self) -> dict:
        return yaml.safe_load(self.spec_path.read_text())

    def write_spec(self, data: dict, commit: str | None = None) -> None:
        self.spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
        if commit:
            self.commit(commit)


def _model_name(request: pytest.FixtureRequest, prefix: str) -> str:
    return f"{prefix}-{request.node.name}".replace("[", "-").replace("]", "")[:60]


@pytest.fixture
def house(tmp_path: Path, request: pytest.FixtureRequest) -> Project:
    return Project(tmp_path / "house-repo", "house_prices", _model_name(request, "house"))


@pytest.fixture
def ads(tmp_path: Path, request: pytest.FixtureRequest) -> Project:
    return Project(tmp_path / "ads-repo", "ad_clicks", _model_name(request, "ads"))


def run_cli(
    *args: str, env: dict[str, str | None] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """The real `modelyard` console script, as a user or CI runs it (`env`: None unsets)."""
    exe = Path(sys.executable).with_name("modelyard")
    return subprocess.run(
        [str(exe), *args],
        capture_output=True,
        text=True,
        env=environment(env),
        cwd=cwd,
        timeout=600,
    )


def invoke_cli(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """The CLI in this process (Typer's runner): exit code, stdout and stderr as the console
    script gives them, without the second or two a new interpreter spends importing."""
    from typer.testing import CliRunner

    from modelyard.cli import app
    from modelyard.cli.common import settings

    # A command reads the settings once per process: this call's `env` must be read, and must
    # not outlive it (what the command exports is put back by _process_state_put_back).
    settings.cache_clear()
    try:
        return CliRunner().invoke(app, list(args), env=env)
    finally:
        settings.cache_clear()


def environment(changes: dict[str, str | None] | None) -> dict[str, str]:
    """This process's environment with `changes`, a None value removing its variable."""
    merged = {**os.environ, **(changes or {})}
    return {name: value for name, value in merged.items() if value is not None}


@pytest.fixture(scope="session")
def moto() -> Iterator[str]:
    """moto in server mode on loopback: the one stand-in, for AWS's APIs (S3, ECR, EC2, IAM)."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/moto-api/", timeout=60)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


# --- PostgreSQL: Debian's, a cluster per test module ---------------------------------------------
PG_PASSWORD = "pg-secret-5f2c9a"


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        pytest.fail(f"PostgreSQL's {name} is missing: `make stack` installs Debian's postgresql")
    return found[-1]


def _as_postgres(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI runs the tests as root.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass(frozen=True)
class Postgres:
    port: int
    psql: Callable[..., str]  # (sql, database="postgres") -> output, as the superuser
    password: str  # role `modelyard`'s; must never show in a log, argv or tag


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster of its own on a loopback port, with a password-only role
    `modelyard` that may create databases."""
    folder = Path(tempfile.mkdtemp(prefix="modelyard-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", "postgres",
                                 "--auth-local=trust", "--auth-host=scram-sha-256"]),
                   check=True, capture_output=True)  # fmt: skip
    server = subprocess.Popen(
        _as_postgres([_pg_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
                      "-c", "listen_addresses=127.0.0.1"]),
        stdout=(folder / "log").open("w"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip

    def psql(sql: str, database: str = "postgres") -> str:
        return subprocess.run(
            _as_postgres([_pg_bin("psql"), "-h", str(folder), "-p", str(port), "-U", "postgres",
                          "-d", database, "-tAc", sql]),
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip

    try:
        deadline = time.monotonic() + 120
        while subprocess.run(_as_postgres([_pg_bin("pg_isready"), "-h", str(folder), "-p",
                                           str(port)]), capture_output=True).returncode != 0:  # fmt: skip
            assert server.poll() is None, (folder / "log").read_text()[-3000:]
            assert time.monotonic() < deadline, "PostgreSQL not ready within 120 s"
            time.sleep(0.2)
        psql(f"CREATE ROLE modelyard LOGIN CREATEDB PASSWORD '{PG_PASSWORD}'")
        yield Postgres(port, psql, PG_PASSWORD)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
