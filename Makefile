# vtbench — `make help` lists the targets. Everything runs offline on CPU by default.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vtbench-installed
LMMS_EVAL_VERSION := 0.7.3

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
export TRANSFORMERS_VERBOSITY ?= error

# Extra overrides for `make eval`, e.g. `make eval ARGS="run.limit=50"`
ARGS ?=
# pytest selection, e.g. `make test PYTEST_ARGS="-m 'not slow'"`
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "vtbench targets:\n"} /^[a-zA-Z_-]+:.*##/ {printf "  \033[36m%-15s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c requirements.lock -e '.[eval,dev]'
	$(PY) -m pip install -q --no-deps lmms-eval==$(LMMS_EVAL_VERSION)
	@touch $@

.PHONY: setup
setup: $(STAMP) ## Create .venv with pip and install vtbench (+ lmms-eval with --no-deps)

.PHONY: eval
eval: $(STAMP) ## Run the default evaluation (tiny model, shapes, CPU, offline) and print the table
	$(VENV)/bin/vtbench $(ARGS)

.PHONY: test
test: $(STAMP) ## Run the test suite (offline, CPU)
	$(PY) -m pytest -q $(PYTEST_ARGS)

.PHONY: test-bad-input
test-bad-input: $(STAMP) ## Run only the bad-input catalogue
	$(PY) -m pytest -q -m bad_input

.PHONY: flops
flops: $(STAMP) ## FLOPs breakdown of a config, e.g. `make flops ARGS="model=llava15_7b method=fastv"`
	$(VENV)/bin/vtbench-flops $(ARGS)

.PHONY: tiny-model
tiny-model: $(STAMP) ## Retrain the embedded tiny LLaVA on shapes (CPU, deterministic; see its model card)
	$(PY) -m harness.tiny_model.train $(ARGS)

.PHONY: clean
clean: ## Remove local run outputs (records in runs/, Hydra outputs); keeps .venv and results/
	rm -rf outputs multirun runs

.PHONY: distclean
distclean: clean ## Also remove the virtual environment
	rm -rf $(VENV)
