# Switchboard: `make run` starts the platform, `make demo` shows it working, `make test` proves it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install run demo test bench load chaos clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,bench]"
	touch $@

run: install
	$(BIN)/switchboard run

demo: install
	$(BIN)/switchboard demo

# Tests take RabbitMQ and Redis from AMQP_URL and REDIS_URL (else testcontainers, else they skip).
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Locust load tests against a platform of its own (or LOAD_ARGS="--url ..."); reports in var/load/<scenario>/.
load: install
	$(BIN)/python load/run.py $(LOAD_ARGS)

# The long chaos scenarios (kill every service, an agent, restart RabbitMQ and Redis); prints recovery times.
chaos: install
	$(BIN)/python -m tests.chaos.run_chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
