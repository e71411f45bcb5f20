# The two commands of the README: `make deploy` and `make test`. Both create .venv first.
PY      := .venv/bin/python
CONFIG  ?= configs/cpu.toml
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: deploy test test-all test-e2e baseline-checkpoint lint profile bench bench-prune bench-quant bench-vit bench-profile bench-coverage \
	bench-latency bench-cold bench-default bench-llm bench-vila gpu-check clean venv

# Reinstall only when the dependency list or the pinned set changes: the stamp is older than them then.
# Editable, so the checkout's code is what runs; `.venv/bin/edgepipe` is the console entry point.
.venv/.stamp: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -c constraints.txt --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[cpu,dev]"
	test -x .venv/bin/edgepipe
	touch $@

venv: .venv/.stamp

deploy: .venv/.stamp
	$(PY) -m pipeline run --config $(CONFIG) $(ARGS)

# The default's vendored baseline, re-created: the one-cycle recipe (98.80 % where it was made), then copied
# over data/checkpoints/simple_cnn_mnist.pt (commit it with data/checkpoints/README.md updated).
BASELINE_RECIPE := --set model.weights= --set baseline.epochs=2 --set baseline.lr=3e-3 --set baseline.batch_size=64 \
	--set baseline.schedule=onecycle
baseline-checkpoint: .venv/.stamp
	$(PY) -m pipeline run --config configs/cpu.toml $(BASELINE_RECIPE) --until baseline --run baseline-checkpoint --force baseline
	cp runs/baseline-checkpoint/01_baseline/model.pt data/checkpoints/simple_cnn_mnist.pt
	sha256sum data/checkpoints/simple_cnn_mnist.pt

# Re-time the artifacts, then repackage: the manifest's `chosen` and the report's "why shipped" quote
# what this profile measured. (The package stage would rerun anyway: it depends on the profile's file.)
profile: .venv/.stamp
	$(PY) -m pipeline run --config $(CONFIG) --from profile --force profile package $(ARGS)

# The fast suite (under 5 minutes): tests marked slow, gpu, e2e, load or heavy are left out.
test: .venv/.stamp
	$(PY) -m pytest -q -m "not slow and not gpu and not load and not e2e and not heavy" --durations=15 $(PYTEST_ARGS)

# End to end through the real command line, the default deploy with two busy loops beside it, and the heavy tests
# (minutes): CI runs it after `make test`.
test-e2e: .venv/.stamp
	$(PY) -m pytest -q -s -m "(e2e or load or heavy) and not slow" --durations=5 $(PYTEST_ARGS)

test-all: .venv/.stamp
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

lint: .venv/.stamp
	.venv/bin/ruff check .

bench: bench-prune bench-quant bench-vit bench-profile

bench-prune: .venv/.stamp
	$(PY) -m benchmarks.bench_prune

bench-quant: .venv/.stamp
	$(PY) -m benchmarks.bench_quant

bench-vit: .venv/.stamp
	$(PY) -m benchmarks.bench_vit

bench-profile: .venv/.stamp
	$(PY) -m benchmarks.bench_profile

bench-coverage: .venv/.stamp
	$(PY) -m benchmarks.bench_coverage

bench-latency: .venv/.stamp
	$(PY) -m benchmarks.bench_latency

bench-default: .venv/.stamp
	$(PY) -m benchmarks.bench_default

# The decoder (configs/llm-cpu.toml: training, pruning, distillation, INT4; tens of minutes on 2 cores) against
# its targets and the peer recipes, side by side: benchmarks/llm.md.
bench-llm: .venv/.stamp
	$(PY) -m benchmarks.bench_llm

bench-vila: .venv/.stamp
	$(PY) -m benchmarks.bench_vila

bench-cold: .venv/.stamp
	$(PY) -m benchmarks.bench_cold

# The torch-CUDA paths (fine-tune on CUDA, torch-CUDA latency): skips with one line where there is no CUDA.
gpu-check: .venv/.stamp
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf runs .pytest_cache build *.egg-info
