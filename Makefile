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

# Extra overrides for `make eval` / `make cell`, e.g. `make cell ARGS="method=fastv run.limit=50"`
ARGS ?=
VTB := $(VENV)/bin/vtbench
# The default sweep (`make eval`): every method at three visual-token budgets, plus none and blind.
EVAL_SETTINGS ?= model=tiny benchmark=shapes run.limit=200 run.batch_size=8
EVAL_BUDGETS ?= 0.33,0.22,0.125
# controls without a budget: the reference and no image at all
EVAL_CONTROLS ?= none,blind
# random draws a fresh subset per sample; its seeds (method.params.seed, pooled in the tables)
EVAL_RANDOM_SEEDS ?= 0,1,2
EVAL_TOKEN_METHODS ?= fastv,ficoco_l,tome,ficoco_v,ficoco_vl,visionzip,vispruner,divprune,pool,downsample,pdrop,dart,sparsevlm
# compositions (methods/compose.py; conf/method/<name>.yaml, tiny settings in conf/model_method/tiny_<name>.yaml)
EVAL_COMPOSITIONS ?= shortv_fastv,redundancylens_fastv
# the default sweep: three grids (each a Hydra multirun with its own swept keys) run as one sweep by one
# `vtbench -m <grid> --next <grid> --next <grid>` command, answered by run.workers worker processes (default:
# one single-threaded worker per core, one per GPU; forked by one fork server; latency timed alone) that take
# the next grid's cells while the last ones of the previous grid still run; `make eval` and `make paper-check`
# run the same cells
EVAL_CONTROL_GRID = method=$(EVAL_CONTROLS) $(EVAL_SETTINGS) $(ARGS)
EVAL_RANDOM_GRID = method=random method.params.seed=$(EVAL_RANDOM_SEEDS) budget.kind=tokens budget.value=$(EVAL_BUDGETS) $(EVAL_SETTINGS) $(ARGS)
EVAL_METHOD_GRID = method=$(EVAL_TOKEN_METHODS),shortv_auto,redundancylens,$(EVAL_COMPOSITIONS) budget.kind=tokens budget.value=$(EVAL_BUDGETS) $(EVAL_SETTINGS) $(ARGS)
define EVAL_SWEEPS
	@echo "== the default sweep, three grids in one command: [1] controls $(EVAL_CONTROLS) (no budget); [2] random x seeds $(EVAL_RANDOM_SEEDS) x budgets $(EVAL_BUDGETS); [3] token methods, ShortV (shortv_auto) and RedundancyLens (layers from their calibrations, at the matching FLOPs) and the compositions $(EVAL_COMPOSITIONS) (layers as configured, FastV's keep_ratio set by the budget) x budgets $(EVAL_BUDGETS) (share of visual tokens)"
	$(VTB) -m $(EVAL_CONTROL_GRID) --next $(EVAL_RANDOM_GRID) --next $(EVAL_METHOD_GRID)
endef
# The recipe of the committed tiny model (see harness/assets/tiny-llava/README.md)
TINY_ARGS ?= --out harness/assets/tiny-llava --seed 0 --steps1 1500 --steps2 6000 --curriculum2 1500 --code-layer2 2 \
	--readout-layer2 5 --ground-weight2 1.0 --row-layer2 -1 --col-layer2 -1 --count-head2 2 --threads 2
# `make tiny-model-card`: the previous checkpoint measured beside the current one (its git revision)
CARD_BEFORE ?= 47d438b
# `make bench`: one torch thread timed by process CPU time, so a busy machine widens spreads but does not bias ratios;
# 11 interleaved prefill rounds (the medians of 5 moved by +-0.05 between runs on a shared CPU)
BENCH_ARGS ?= --threads 1 --clock cpu --repeats 11 --batch-methods none,random,fastv,tome,ficoco_v,ficoco_l,ficoco_vl,shortv,redundancylens
# `make paper`: seeded shapes val samples behind the motivating figures of the tiny model
PAPER_SAMPLES ?= 48
# extra pytest arguments, e.g. `make test PYTEST_ARGS="-k fastv --durations=20"`
PYTEST_ARGS ?=
# pytest-xdist workers (`make test PYTEST_WORKERS=0` runs in one process); worksteal rebalances the long
# subprocess tests at the end. Every process uses one torch/OpenMP thread (tests/conftest.py).
PYTEST_WORKERS ?= 2
PYTEST_XDIST := -n $(PYTEST_WORKERS) --dist worksteal

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
eval: $(STAMP) ## The default sweep: none, blind, random x 3 seeds and every method and composition x 3 budgets on tiny/shapes (resumable, parallel workers), then the report
	$(EVAL_SWEEPS)
	$(VENV)/bin/vtbench-report
	@# the records behind results/tables (`vtbench-report --store results/store` regenerates them exactly)
	@rm -rf results/store && mkdir -p results/store/records && cp $${VTBENCH_STORE:-runs/store}/records/*.json results/store/records/

.PHONY: sweep
sweep: eval ## Alias of `make eval`

.PHONY: cell
cell: $(STAMP) ## One cell (default: tiny model, method none, full shapes test split); prints its table
	$(VTB) $(ARGS)

# `make paper-check`: the default sweep's cells in the user's own store (evaluated, or reused when already
# there) against the committed table results/tables/*.csv (whatever cells it holds); exit 1 names any cell
# more than PAPER_TOLERANCE points away, or missing. A paper's table: `vtbench-report --paper <recipe>`.
PAPER_TOLERANCE ?= 1
.PHONY: paper-check
paper-check: $(STAMP) ## Does this machine reproduce the committed default table? (evaluates/reuses the sweep, compares; exit 1 if not)
	$(EVAL_SWEEPS)
	$(VENV)/bin/vtbench-report --paper default --tolerance $(PAPER_TOLERANCE) --out runs/paper_check

.PHONY: report
report: $(STAMP) ## Tables (md/csv/tex) and figures under results/ from the records in runs/store
	$(VENV)/bin/vtbench-report

.PHONY: paper
paper: $(STAMP) ## Paper FLOPs tables + motivating figures under results/paper/ (figures for the tiny model; the FiCoCo figure from $VTBENCH_STORE or runs/store, skipped when it has no records)
	$(VENV)/bin/vtbench-paper --out results/paper --model tiny --samples $(PAPER_SAMPLES)

.PHONY: calibrate
calibrate: $(STAMP) ## Calibration artefacts, e.g. `make calibrate ARGS="method=shortv"`
	$(VENV)/bin/vtbench-calibrate $(ARGS)

.PHONY: test
test: $(STAMP) ## Run the test suite without the `slow` tests (offline, CPU, 2 workers); CI also runs test-slow
	$(PY) -m pytest -q $(PYTEST_XDIST) -m "not slow" $(PYTEST_ARGS)

.PHONY: test-slow
test-slow: $(STAMP) ## Run the `slow` tests (subprocess kill/resume, lmms-eval's CLI, fvcore counts on many shapes)
	$(PY) -m pytest -q $(PYTEST_XDIST) -m slow $(PYTEST_ARGS)

.PHONY: test-all
test-all: $(STAMP) ## Run the whole suite in one pytest session (= test + test-slow)
	$(PY) -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS)

.PHONY: test-bad-input
test-bad-input: $(STAMP) ## Run only the bad-input catalogue
	$(PY) -m pytest -q $(PYTEST_XDIST) -m bad_input

.PHONY: flops
flops: $(STAMP) ## FLOPs breakdown of a config, e.g. `make flops ARGS="model=llava15_7b method=fastv"`
	$(VENV)/bin/vtbench-flops $(ARGS)

.PHONY: bench
bench: $(STAMP) ## Performance benchmark -> results/bench/<machine>.{md,csv,json} (run on an idle machine)
	$(VENV)/bin/vtbench-bench --out results/bench $(BENCH_ARGS) $(ARGS)

.PHONY: bench-gpu
bench-gpu: $(STAMP) ## GPU benchmark (CUDA, < 10 min): full-size random LLaVA-1.5-7B + LLaVA-NeXT-7B, fp16, every method -> results/bench/<gpu>-<arch>.{md,csv,json}
	$(VENV)/bin/vtbench-bench --gpu-full --out results/bench $(ARGS)

.PHONY: tiny-model
tiny-model: $(STAMP) ## Retrain the embedded tiny LLaVA on shapes (CPU, deterministic; see its model card)
	$(PY) -m harness.tiny_model.train $(TINY_ARGS) $(ARGS)
	$(PY) -m harness.tiny_model.evaluate --model harness/assets/tiny-llava --split test --n 500 --modes none,blank,black,random10 --batch-size 25 --card

.PHONY: tiny-model-card
tiny-model-card: $(STAMP) ## Measure the tiny model's properties against their thresholds (spread, content reading, redundancy, competence), before and after
	$(PY) -m harness.tiny_model.card --before $(CARD_BEFORE) $(ARGS)

.PHONY: tiny-families
tiny-families: $(STAMP) ## Tiny random checkpoints of the other families under runs/tiny/ (model=tiny_qwen2_vl, ...)
	$(PY) -m harness.models.tiny qwen2_vl runs/tiny/qwen2_vl
	$(PY) -m harness.models.tiny qwen2_5_vl runs/tiny/qwen2_5_vl
	$(PY) -m harness.models.tiny llava_onevision runs/tiny/llava_onevision

.PHONY: clean
clean: ## Remove local run outputs (records in runs/, Hydra outputs); keeps .venv and results/
	rm -rf outputs multirun runs

.PHONY: distclean
distclean: clean ## Also remove the virtual environment
	rm -rf $(VENV)
