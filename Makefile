# The two set-up commands of the README: each creates or reuses .venv and installs the project into it,
# at the versions of requirements.lock (the ones cluster.yaml's nodes install too).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast durations gpu-dry-run lint clean install-tools lock

$(STAMP): pyproject.toml requirements.lock
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.lock
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

# after changing pyproject.toml's dependencies: pin every package again (needs the package index)
lock: $(STAMP)
	$(VENV)/bin/pip-compile --quiet --all-extras --strip-extras --allow-unsafe --no-emit-index-url \
	  --no-emit-find-links --output-file requirements.lock pyproject.toml

demo: $(STAMP)  ## the embedded default: digits, SimCLR teacher, EGA vs CE-only, on a local Ray
	$(VENV)/bin/ega-ray distill

# the tests copy a checkout with rsync as `ray up` does, and make separate hosts with `ip netns` and `unshare`
# (tests/multihost.py): installed here when missing (Debian/Ubuntu)
APT_TOOLS := $(if $(shell command -v rsync),,rsync) $(if $(shell command -v ip),,iproute2) \
	$(if $(shell command -v unshare),,util-linux)
ifneq ($(strip $(APT_TOOLS)),)
TOOLS := install-tools
endif
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

install-tools:
	$(SUDO) apt-get install -y -q $(APT_TOOLS) >/dev/null || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(APT_TOOLS); }

# loadgroup: the tests of an xdist_group (one multi-host cluster) share a process; the others are spread, handed
# out in tests/conftest.py's order (those without Ray first, then the Ray ones longest first by tests/durations.json),
# which xdist would otherwise change
PYTEST := $(VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup --no-loadscope-reorder
# the tests that need only Python and torch: tests/conftest.py's FAST_TIER, pyproject.toml's markers
FAST_TIER := not ray and not cluster and not multihost and not heavy and not gpu

test: $(STAMP) $(TOOLS)  ## the whole test suite: every tier (local Ray, clusters, heavy, fast)
	$(VENV)/bin/ruff check ega_ray tests jobs bench
	$(PYTEST) --durations=10 tests

test-fast: $(STAMP) $(TOOLS)  ## after each edit: ruff + the tests without Ray or heavy models
	$(VENV)/bin/ruff check ega_ray tests jobs bench
	$(PYTEST) -m "$(FAST_TIER)" tests

durations: $(STAMP) $(TOOLS)  ## the whole suite, writing each test's seconds to tests/durations.json (its order)
	$(PYTEST) --write-durations tests

gpu-dry-run: $(STAMP)  ## bench/gpu_check.sh's steps on CPU at tiny sizes, so that the GPU check cannot rot (CI)
	PYTHON=$(VENV)/bin/python bash bench/gpu_check.sh --dry-run

clean:
	rm -rf runs
