# The two set-up commands of the README: each creates or reuses .venv and installs the project into it.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test gpu-dry-run lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## the embedded default: digits, SimCLR teacher, EGA vs CE-only, on a local Ray
	$(VENV)/bin/ega-ray distill

test: $(STAMP)  ## the whole test suite (slow multi-process tests included)
	$(VENV)/bin/ruff check ega_ray tests jobs bench
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist worksteal --durations=10 tests

gpu-dry-run: $(STAMP)  ## bench/gpu_check.sh's steps on CPU at tiny sizes, so that the GPU check cannot rot (CI)
	PYTHON=$(VENV)/bin/python bash bench/gpu_check.sh --dry-run

clean:
	rm -rf runs
