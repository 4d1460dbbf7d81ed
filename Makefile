# The two commands for a fresh machine with Python 3.11 (see README.md):
#   make run    create .venv and run the whole study
#   make test   create .venv and run the test suite (what CI runs, via .ci/run)
# Options: DATA=<path or URL of cifar-10-python.tar.gz>, SNAKEMAKE_ARGS="...", PYTHON=python3.11,
#          GPU=1 (NVIDIA machines: install TensorFlow's GPU build, requirements-gpu.txt)

PYTHON ?= python3.11
VENV ?= .venv
DATA ?=
RESULTS ?= results
SNAKEMAKE_ARGS ?=
PYTEST_ARGS ?=
GPU ?=
REQUIREMENTS = $(if $(GPU),requirements-gpu.txt,requirements.txt)
STAMP = $(VENV)/.installed$(if $(GPU),-gpu)

# Jobs call `python`, so the environment's bin directory comes first.
export PATH := $(abspath $(VENV))/bin:$(PATH)

DATA_ARG = $(if $(DATA),--config data_source=$(abspath $(DATA)))

.PHONY: setup run test publish lint

$(STAMP): $(REQUIREMENTS) requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r $(REQUIREMENTS)
	touch $@

setup: $(STAMP)

run: setup
	snakemake $(DATA_ARG) $(SNAKEMAKE_ARGS)

test: setup
	python -m pytest $(PYTEST_ARGS)

# Publish a (finished or running) study run's small outputs into reports/study/, for git.
publish: setup
	python workflow_scripts/publish.py --results $(RESULTS) --out reports/study  # RESULTS may list several

lint: setup
	snakemake --lint
	snakefmt --check .
