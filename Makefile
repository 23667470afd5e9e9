# Two commands on a fresh machine with nothing but Python 3 (3.10 or newer):
#   make demo   the embedded diffusion model vs its CLIP counterpart, offline
#   make test   the tests (offline, CPU; the slow ones with: make test-slow)
# The first use creates .venv and installs the package and the demo plugin (demo/, its own
# distribution) into it; later uses reuse it, and an
# edit to pyproject.toml reinstalls (the stamp file is older than pyproject.toml then).

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow

demo: $(STAMP)
	$(VENV)/bin/clip_benchmark_diffusion demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

$(STAMP): pyproject.toml demo/pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]' -e ./demo
	touch $@
