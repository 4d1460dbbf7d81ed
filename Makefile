# The two commands for a fresh machine with Python 3.11 (see README.md):
#   make run    create .venv and run the whole study
#   make test   create .venv and run the test suite (what CI runs, via .ci/run)
#   make verify-published   retrain the published runs' first epochs and compare (after any change
#                           to training code): RUNS=model_09_seed0,model_17_seed0 EPOCHS=2 (0: whole
#                           runs and their evaluation); RECORD=1 adds the checks to reports/study;
#                           ON_OTHER_MACHINE=skip: runs recorded on another machine kind fail at
#                           once, "machine differs", instead of being retrained
# Options: DATA=<path or URL of cifar-10-python.tar.gz>, SNAKEMAKE_ARGS="...", PYTHON=python3.11,
#          GPU=1 (NVIDIA machines: install TensorFlow's GPU build, requirements-gpu.txt),
#          BACKEND=jax (train on Keras' JAX backend; with GPU=1: jax[cuda12], requirements-jax-gpu.txt),
#          RESULTS=results (the results directory), CORES=2 (verify-published), PYTEST_ARGS="..."
# Also: make setup (the .venv alone), make publish RESULTS="dir ..." (a study run's small outputs
#       into reports/study/), make lint (snakemake --lint, snakefmt, ruff check and format)

PYTHON ?= python3.11
VENV ?= .venv
DATA ?=
RESULTS ?= results
SNAKEMAKE_ARGS ?=
PYTEST_ARGS ?=
GPU ?=
BACKEND ?=
RUNS ?=
EPOCHS ?= 2
ON_OTHER_MACHINE ?= retrain
CORES ?= 2
RECORD ?=
REQUIREMENTS = $(if $(GPU),$(if $(filter jax,$(BACKEND)),requirements-jax-gpu.txt,requirements-gpu.txt),requirements.txt)
STAMP = $(VENV)/.installed$(if $(GPU),-gpu$(if $(filter jax,$(BACKEND)),-jax))

# Jobs call `python`, so the environment's bin directory comes first.
export PATH := $(abspath $(VENV))/bin:$(PATH)

DATA_ARG = $(if $(DATA)$(BACKEND),--config $(if $(DATA),data_source=$(abspath $(DATA))) $(if $(BACKEND),backend=$(BACKEND)))
DATA_ITEM = $(if $(DATA),data_source=$(abspath $(DATA)))

.PHONY: setup run test publish lint verify-published

# The packages are byte-compiled on all cores afterwards (pip compiles one file after another: the
# install took 73 s, now 55 s, on an AMD EPYC); like pip's own step, it skips files that do not
# compile (Python 2 test data in some packages).
$(STAMP): $(REQUIREMENTS) requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet --no-compile -r $(REQUIREMENTS)
	$(VENV)/bin/python -c "import compileall, sys; compileall.compile_dir(sys.argv[1], quiet=2, workers=0)" $(VENV)/lib
	touch $@

setup: $(STAMP)

run: setup
	snakemake $(DATA_ARG) $(SNAKEMAKE_ARGS)

test: setup
	python -m pytest $(PYTEST_ARGS)

# Publish a (finished or running) study run's small outputs into reports/study/, for git.
publish: setup
	python tools/publish.py --results $(RESULTS) --out reports/study  # RESULTS may list several

# One job per run, each with the thread count and precision its provenance records; a run that
# differs fails the command with its run, epoch and column (the job's log is shown), after the
# other runs are checked (--keep-going). RECORD=1 records the identical checks even then (the
# published runs come from two CPU kinds: each kind verifies its own), and still exits non-zero.
# The published runs are config.yaml's entries and the refit and study entries of presets/protocols.yaml.
verify-published: setup
	snakemake verify_published --keep-going --cores $(CORES) --show-failed-logs $(SNAKEMAKE_ARGS) --configfile presets/protocols.yaml \
	    --config $(DATA_ITEM) results_dir=$(RESULTS) run_models=null 'verify={runs: [$(RUNS)], epochs: $(EPOCHS), on_other_machine: $(ON_OTHER_MACHINE)}'; \
	status=$$?; $(if $(RECORD),python workflow_scripts/verify_published.py record --published reports/study \
	    $(RESULTS)/verify/*/seed_*/epochs_*.json && python tools/publish.py --refresh --out reports/study || status=1;) \
	exit $$status

lint: setup
	snakemake --lint
	snakefmt --check .
	ruff check .
	ruff format --check .
