# charlm: `make demo` trains a small model for about a minute and shows what it learned;
# `make test` runs the test suite. Both create the virtual environment on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of PyTorch. Override for a CUDA box, e.g. `make install TORCH=torch`.
TORCH  ?= torch==2.13.0
DEMO   ?= checkpoints/demo

.PHONY: install test demo lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check charlm tests benchmarks

# The built-in corpus is CPython's own documentation (pydoc_data), so the demo needs no download.
demo: install
	$(BIN)/python -m charlm.data.prepare data/pydoc.txt
	rm -rf $(DEMO)
	$(BIN)/charlm train data/pydoc.txt --out $(DEMO) --max-time 60s --hidden 256 --eval-every 100
	@echo "--- sample (temperature 0.8) ---"
	$(BIN)/charlm sample $(DEMO) --temp 0.8 --length 400 --prime "The " --seed 1
	@echo "--- held-out perplexity ---"
	$(BIN)/charlm eval $(DEMO) --perplexity

# Quality on text the model never saw, against a plain PyTorch reference in the same run: train
# both on the first 90% of CORPUS for BUDGET seconds each, score the next 5% and the last 5%.
CORPUS ?= data/pydoc.txt
BUDGET ?= 600
bench: install $(CORPUS)
	$(BIN)/python benchmarks/generalise.py --corpus corpus=$(CORPUS) --no-stdlib --budget $(BUDGET)

data/pydoc.txt: | install
	$(BIN)/python -m charlm.data.prepare $@

clean:
	rm -rf $(VENV) checkpoints .pytest_cache .hypothesis
