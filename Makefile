# dedup-consumer developer tasks.  `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVICES := scripts/services.sh
LINT_PATHS := consumer handlers schemas tests scripts
TYPED_PATHS := consumer handlers schemas

.PHONY: help install services services-down services-status migrate lint typecheck test bench demo orders-demo sample chaos clean \
	test-containers compose-demo containers-images asyncapi asyncapi-deps

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install the package with its dev extras

$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
		$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv \
			|| { apt-get update -q && apt-get install -y -q python3-venv; }; \
			$(PYTHON) -m venv $(VENV); }; \
	fi
	# compat: a path entry, not an import hook, so mypy sees the package (setuptools docs,
	# "Development mode": static analysers cannot follow the default editable finder).
	$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	@touch $@

# The broker also gets its SASL_SSL listener (tests/integration/test_secure_kafka.py, which
# fails under CI=true without it); KAFKA_SECURE_PORT= (empty) leaves it out.
services: ## start Kafka, Redis and PostgreSQL under .services/ and write .env
	KAFKA_SECURE_PORT="$${KAFKA_SECURE_PORT-19094}" bash $(SERVICES) up

services-down: ## stop the services started by `make services`
	bash $(SERVICES) down

services-status: ## show which services run
	bash $(SERVICES) status

migrate: install services ## apply the database migrations
	set -a; . ./.env; set +a; $(BIN)/python -m consumer migrate handlers.app:app

lint: install ## ruff check
	$(BIN)/ruff check $(LINT_PATHS)

typecheck: install ## mypy on the packages
	$(BIN)/mypy $(TYPED_PATHS)

# The official AsyncAPI parser the tests validate `consumer asyncapi`'s documents with
# (tests/asyncapi/): npm ci from the lock file, install scripts off. Without npm, a laptop
# goes on (those tests skip); CI=true stops here, as the tests would fail there.
NPM_DIR := tests/asyncapi
NPM_STAMP := $(NPM_DIR)/node_modules/.installed
asyncapi-deps: $(NPM_STAMP) ## install @asyncapi/parser (npm ci) into tests/asyncapi/node_modules

$(NPM_STAMP): $(NPM_DIR)/package.json $(NPM_DIR)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix $(NPM_DIR) --ignore-scripts --no-audit --no-fund --loglevel=error \
		&& touch $@; \
	elif [ "$${CI:-}" = true ]; then \
		echo "make: CI=true and npm is missing: tests/asyncapi/ needs Node.js 20+ and npm" >&2; \
		exit 1; \
	else \
		echo "make: npm not found: tests/asyncapi/ will skip (install Node.js 20+ and npm)" >&2; \
	fi

# The committed docs/asyncapi.yaml, written with no CONSUMER_* setting but the servers (env -i)
# so it does not depend on a local .env, then validated by the official parser. Servers:
# ASYNCAPI_BOOTSTRAP, the address `make services` gives Kafka. docs/asyncapi.md shows the command.
ASYNCAPI_BOOTSTRAP ?= 127.0.0.1:19092
asyncapi: install asyncapi-deps ## write docs/asyncapi.yaml (handlers.app:app) and validate it
	env -i PATH="$$PATH" HOME="$$HOME" $(BIN)/consumer asyncapi handlers.app:app \
		--bootstrap $(ASYNCAPI_BOOTSTRAP) -o docs/asyncapi.yaml
	node $(NPM_DIR)/validate.mjs docs/asyncapi.yaml >/dev/null

# pytest exits 5 when it collected no test: that is a failure here, we always have tests.
test: install services asyncapi-deps ## lint, typecheck, then the whole test suite against the services
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory typecheck
	set -a; . ./.env; set +a; \
	rc=0; $(BIN)/pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; that is a failure" >&2; exit 1; fi; \
	exit $$rc

# Options go in ARGS, e.g. `make bench ARGS="--quick"` or `ARGS="--records 20000 --repeats 1"`.
bench: install services ## benchmark: raw vs framework vs naive (docs/benchmarks.md)
	set -a; . ./.env; set +a; $(BIN)/python -m scripts.bench $(ARGS)

# Options go in ARGS, e.g. `make demo ARGS="--count 5000 --keep"`; the services stay up after.
# `make compose-demo` runs it on docker-compose.yml's services: DEMO_SERVICES= DEMO_ENV=<its env>.
DEMO_SERVICES ?= services
DEMO_ENV ?= ./.env
demo: install $(DEMO_SERVICES) ## the payments service under duplicates, conflicts and a crash, audited
	set -a; . $(DEMO_ENV); set +a; $(BIN)/python -m scripts.demo $(ARGS)

# Options in ARGS, e.g. `make orders-demo ARGS="--count 1000 --ports 25800-25899"`.
orders-demo: install services ## HTTP + outbox example: orders posted, relay killed, audited
	set -a; . ./.env; set +a; $(BIN)/python -m scripts.orders_demo $(ARGS)

# The catalog sample (docs/sample.md): its TestApp tests, the rates client faked, then the app
# under `consumer run --workers 2` against the services and the real rates service, SIGKILLed
# mid-run and run again. Its HTTP server takes a port of DEDUP_TEST_HTTP_PORTS (25800-25899).
SAMPLE_TESTS := tests/integration/test_catalog_app.py tests/integration/test_catalog_sample.py
sample: install services ## the catalog sample (lifespan, deps, middleware, Avro + JSON), tested
	set -a; . ./.env; set +a; $(BIN)/pytest $(SAMPLE_TESTS) $(PYTEST_ARGS)

# Its own Kafka/Redis/PostgreSQL (.services/chaos, ports 29092/26379/25432), started, faulted
# and stopped by the run itself: the shared services are never touched. Options in ARGS,
# e.g. `make chaos ARGS="--records 5000 --faults 8 --seed 2"`. Last line of output: JSON.
chaos: install ## exactly-once audit under injected faults (docs/guarantees.md)
	$(BIN)/python -m scripts.chaos $(ARGS)

# Containers (docs/services.md): a private Docker engine under .services/docker when none
# answers, images built locally from Debian's packages, every container removed afterwards.
# Ports: CONTAINERS_KAFKA_PORT, CONTAINERS_KAFKA_CONTROLLER_PORT, CONTAINERS_REDIS_PORT,
# CONTAINERS_PG_PORT. Tests in CONTAINERS_TESTS; the chaos run starts its own processes.
CONTAINERS := scripts/containers.sh
CONTAINERS_TESTS ?= tests/integration --deselect tests/integration/test_chaos.py
containers-images: ## build the local Docker images (cached by their recipe's checksum)
	bash $(CONTAINERS) run -- true

test-containers: install ## the integration tier on containers started by testcontainers
	bash $(CONTAINERS) run -- bash -c 'rc=0; $(BIN)/pytest --services=containers \
		$(CONTAINERS_TESTS) $(PYTEST_ARGS) || rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "make test-containers: no tests collected" >&2; exit 1; fi; \
		exit $$rc'

compose-demo: install ## docker-compose.yml up with the local images, `make demo` on it, down
	bash $(CONTAINERS) compose -- bash -c '$(MAKE) --no-print-directory demo DEMO_SERVICES= \
		DEMO_ENV="$$COMPOSE_ENV_FILE" ARGS="$(ARGS)"'

clean: ## stop the services and delete their data and logs (keeps the Kafka jars)
	bash $(SERVICES) clean
