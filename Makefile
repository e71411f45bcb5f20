# The two commands of the README: `make deploy` and `make test`. Both create .venv first.
PY      := .venv/bin/python
CONFIG  ?= configs/cpu.toml
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: deploy test test-all profile bench bench-prune bench-quant bench-vit bench-profile clean venv

# Reinstall only when a requirements file changes: the stamp is older than it then.
.venv/.stamp: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: .venv/.stamp

deploy: .venv/.stamp
	$(PY) -m pipeline run --config $(CONFIG) $(ARGS)

profile: .venv/.stamp
	$(PY) -m pipeline run --config $(CONFIG) --from profile --until profile --force profile $(ARGS)

# Fast suite plus the end-to-end smoke test; tests marked slow or gpu are left out.
test: .venv/.stamp
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: .venv/.stamp
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: bench-prune bench-quant bench-vit bench-profile

bench-prune: .venv/.stamp
	$(PY) -m benchmarks.bench_prune

bench-quant: .venv/.stamp
	$(PY) -m benchmarks.bench_quant

bench-vit: .venv/.stamp
	$(PY) -m benchmarks.bench_vit

bench-profile: .venv/.stamp
	$(PY) -m benchmarks.bench_profile

clean:
	rm -rf runs .pytest_cache
