# Self-sufficient targets: each creates .venv on a fresh machine, installs the package, then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-smoke clean browser mutate

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch/torchvision pinned to the wheels the machine's pip serves from local disk (torchvision is needed by timm).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev,examples]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning-opt fit --config examples/configs/quickstart.yaml
	@echo ""
	@echo "TensorBoard:  $(BIN)/tensorboard --logdir lightning_logs"

# The dashboard's browser check needs Debian's chromium + chromium-driver (installed here when missing; needs root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

# Two pytest workers, each taking whole files (module fixtures stay shared): most of a multi-rank test is process
# start-up and waiting on collectives, so two workers on two cores halve the wall time (docs/TESTING.md).
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --timeout=300 -p no:cacheprovider --durations=15 -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

# Mutation testing of strategies/, optim/ and stats/ against the in-process tests (outside `make test`; about
# 40 min on 2 cores). Scores per module: docs/TESTING.md; the strategies' survivors: docs/MUTATION_SURVIVORS.md.
mutate: $(STAMP)
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2
	$(BIN)/python tools/mutation_report.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --out benchmarks/RESULTS_latest.md

bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks.run --smoke

clean:
	rm -rf lightning_logs .pytest_cache mutants
