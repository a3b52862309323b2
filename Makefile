# One entry point for set-up, demo and tests. Every target creates .venv (Python 3.12) and
# installs the project into it with the exact versions in constraints.txt when needed.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# python3.12 from PATH, else the newest 3.12 that pyenv has installed.
PYTHON312 ?= $(shell for c in python3.12 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r); do \
	"$$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$c"; break; }; done)

.PHONY: install demo test clean

$(BIN)/python:
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found; install it (e.g. 'pyenv install 3.12') or pass PYTHON312=/path/to/python3.12" >&2; exit 2; }
	$(PYTHON312) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Pretrains the tiny Qwen3-like MoE on the CPU from a fresh runs/demo.
demo: install
	rm -rf runs/demo
	$(BIN)/sdmoe-train configs/tiny-qwen3-moe.yaml run.dir=runs/demo

# Two pytest workers, one test file each at a time (its fixtures' runs are shared within the file):
# a one-process run uses one core, so one worker alone would leave the other core idle.
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs .pytest_cache
