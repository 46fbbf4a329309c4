# charlm: `make demo` trains a small model for about a minute and shows what it learned;
# `make test` runs the test suite and builds the docs. Both create the virtual environment on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of PyTorch. Override for a CUDA box, e.g. `make install TORCH=torch`.
TORCH  ?= torch==2.13.0
DEMO   ?= checkpoints/demo

.PHONY: install test demo lint docs figures bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[all,dev,docs]"
	touch $@

# The test suite, then the documentation (so CI, which runs `make test`, checks the docs build too).
test: install
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory docs

# The documentation site (mkdocs, Material theme) into site/. --strict fails on any warning (a
# broken link or anchor, a page missing from the nav, a docstring mkdocstrings cannot render), but
# not with --quiet, which hides the warnings that strict mode counts: keep it off.
docs: install
	@test -x $(BIN)/mkdocs || $(BIN)/pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The docs' pictures (docs/images/*.png) from real runs on data/pydoc.txt: a few minutes.
figures: install data/pydoc.txt
	$(BIN)/python docs/figures.py

# The GPU path on a machine with CUDA (install a CUDA build of torch: `make install TORCH=torch`):
# the tests marked cuda (skipped elsewhere, as in CI), then the speed benchmark on the GPU, which
# prints its table and one JSON object. Fails at once where there is no GPU to check.
gpu-check: install
	@$(BIN)/python -c "import torch, sys; torch.cuda.is_available() or sys.exit('make gpu-check: no CUDA GPU here (torch ' + torch.__version__ + ')'); print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| cuDNN', torch.backends.cudnn.version())"
	$(BIN)/python -m pytest -m cuda -q -rs tests/test_cuda.py
	$(BIN)/python benchmarks/speed.py --device cuda --seconds 3

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
