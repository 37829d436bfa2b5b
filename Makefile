.PHONY: bootstrap up test lint bench clean

PY := .venv/bin/python
ARGS ?=
CPU_ARGS ?= --protocols rest,grpc
OPEN_ARGS ?=
PYTEST_ARGS ?=

bootstrap:
	@scripts/bootstrap.sh

up: bootstrap
	.venv/bin/infermesh up $(ARGS)

test: bootstrap
	$(PY) -m pytest $(PYTEST_ARGS)

lint: bootstrap
	.venv/bin/ruff check cli services control deploy tests bench
	.venv/bin/mypy --strict cli services control deploy tests bench

bench: bootstrap
	$(PY) -m bench.run_all $(ARGS)
	$(PY) -m bench.cpu_per_request $(CPU_ARGS)
	$(PY) -m bench.open_tails $(OPEN_ARGS)
	$(PY) -m bench.features
	$(PY) -m bench.cache
	$(PY) -m bench.jobs

clean:
	rm -rf .infermesh
