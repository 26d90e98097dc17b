# The two quick-start commands are `make demo` and `make test`; both create .venv when absent.
SHELL := /bin/bash
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= .demo
DEMO_ROWS ?= 2000
DEMO_BAD ?= 12
PYTEST_ARGS ?=

.PHONY: setup test test-unit lint demo bench clean lock

$(VENV)/.installed: requirements.txt constraints.txt
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	@touch $@

setup: $(VENV)/.installed

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

demo: setup
	$(PY) -m ray_jobs demo-assets --out $(DEMO_DIR) --rows $(DEMO_ROWS) --bad-images $(DEMO_BAD)
	$(PY) -m ray_jobs embed --manifest $(DEMO_DIR)/manifest --output $(DEMO_DIR)/output \
		--model $(DEMO_DIR)/model --num-stages 2

bench: setup
	$(PY) bench/pipeline_vs_torch.py

lock:
	$(PY) -m pip freeze --exclude torch > constraints.txt

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
