# Two entry points for a fresh clone: `make quickstart` (the main job) and `make test`.
# Both create .venv, install PyTorch and phalanx into it, then run.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel by default. For CUDA: make quickstart TORCH_SPEC=torch TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.phalanx-installed

.PHONY: quickstart test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	# the independent attack check (tests/eval/test_crosscheck_torchattacks.py): torchattacks declares
	# torchvision, which it never imports and which would pull another torch build, hence --no-deps
	$(BIN)/pip install --quiet --no-deps "torchattacks==3.5.1"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/phalanx quickstart

test: $(STAMP)
	$(BIN)/ruff check --select F src tests benchmarks scripts
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.dverge --arch conv --members 3 --batch-size 128 --iters 20 --impl fast

clean:
	rm -rf $(VENV) runs
