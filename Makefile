# The two quick-start commands are `make demo` and `make test`; both create .venv when absent.
SHELL := /bin/bash
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= .demo
DEMO_ROWS ?= 2000
DEMO_BAD ?= 12
PYTEST_ARGS ?=

.PHONY: setup system-deps test test-unit lint demo bench bench-job clean lock airflow-ui

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

# PostgreSQL (Debian's package) for the tests that run Airflow as deployed; each test starts
# and stops its own server in a temp dir, so the package's own cluster is stopped after install.
# Chromium and its driver (Debian's packages) for the browser test of the trigger form.
PG_INITDB = $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb) $(shell command -v initdb))
system-deps:
	@if [ -z "$(PG_INITDB)" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing PostgreSQL (Debian package postgresql) for the real-topology tests ..."; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql > /dev/null; \
			service postgresql stop > /dev/null 2>&1 || true; \
		else \
			echo "PostgreSQL is missing: run 'sudo apt-get install postgresql' (the real-topology tests need it)" >&2; \
			exit 1; \
		fi; \
	fi
	@if ! command -v chromium > /dev/null || ! command -v chromedriver > /dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing headless Chromium (Debian packages chromium chromium-driver) for the trigger form's browser test ..."; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver > /dev/null; \
		else \
			echo "Chromium is missing: run 'sudo apt-get install chromium chromium-driver' (the trigger form's browser test needs it)" >&2; \
			exit 1; \
		fi; \
	fi

setup: $(VENV)/.installed

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup system-deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

# The DAG run locally: Airflow on SQLite under $(DEMO_DIR)/airflow, local Ray, local storage.
DEMO_ABS = $(abspath $(DEMO_DIR))
AIRFLOW_ENV = AIRFLOW_HOME=$(DEMO_ABS)/airflow AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__LOAD_EXAMPLES=False EMB_DEPLOYMENT_ALLOWED_URI_PREFIXES='s3://,gs://,$(DEMO_ABS)' \
	PYTHONPATH=$(CURDIR):$(CURDIR)/dags
DEMO_CONF = {"manifest_uri": "$(DEMO_ABS)/manifest", "output_uri": "$(DEMO_ABS)/output", \
	"model_uri": "$(DEMO_ABS)/model", "partition_rows": $(DEMO_PARTITION_ROWS), "batch_size": 32, "poll_interval_s": 2}
DEMO_PARTITION_ROWS ?= 1000
DEMO_NIGHT_ROWS ?= 200

demo: setup
	rm -rf $(DEMO_DIR)/output $(DEMO_DIR)/manifest
	$(PY) -m ray_jobs demo-assets --out $(DEMO_DIR) --rows $(DEMO_ROWS) --bad-images $(DEMO_BAD) --files 4
	$(AIRFLOW_ENV) $(VENV)/bin/airflow db migrate > $(DEMO_DIR)/airflow-db.log 2>&1
	@echo "running the multimodal_embeddings DAG (airflow dags test; log: $(DEMO_DIR)/dags-test.log) ..."
	@$(AIRFLOW_ENV) EMB_RETRIES=0 $(VENV)/bin/airflow dags test multimodal_embeddings -c '$(DEMO_CONF)' \
		> $(DEMO_DIR)/dags-test.log 2>&1 || { tail -40 $(DEMO_DIR)/dags-test.log; exit 1; }
	@$(PY) -m ray_jobs summary --output $(DEMO_DIR)/output --label "night 1"
	@echo
	@echo "night 2: the manifest gains $(DEMO_NIGHT_ROWS) rows and loses a file; the DAG runs again (log: $(DEMO_DIR)/dags-test-2.log) ..."
	@$(PY) -m ray_jobs demo-night --out $(DEMO_DIR) --add-rows $(DEMO_NIGHT_ROWS) --drop-files 1
	@$(AIRFLOW_ENV) EMB_RETRIES=0 $(VENV)/bin/airflow dags test multimodal_embeddings -c '$(DEMO_CONF)' \
		> $(DEMO_DIR)/dags-test-2.log 2>&1 || { tail -40 $(DEMO_DIR)/dags-test-2.log; exit 1; }
	@$(PY) -m ray_jobs summary --output $(DEMO_DIR)/output --label "night 2"

airflow-ui: setup  ## the same DAG in the Airflow UI: http://localhost:8080 (credentials printed by standalone)
	$(AIRFLOW_ENV) $(VENV)/bin/airflow standalone

# The fair benchmarks (docs/performance.md); BENCH_ARGS e.g. "--steady-s 3 --reps 1" for a smoke run.
BENCH_PRESET ?= albert-base-vit-s16
BENCH_ARGS ?=
bench: setup
	RAY_ADDRESS=local $(PY) bench/pipeline_vs_torch.py --preset $(BENCH_PRESET) $(BENCH_ARGS)

bench-job: setup
	RAY_ADDRESS=local $(PY) bench/job_vs_torch.py --preset $(BENCH_PRESET)

lock:
	$(PY) -m pip freeze --exclude torch > constraints.txt

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
