# Everything runs from a local virtual environment that `make setup` creates.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch unless told otherwise: e.g. `make setup TORCH=torch` on a CUDA box.
TORCH ?= torch==2.13.0

.PHONY: setup test demo bench chromium clean

setup: $(VENV)/.installed .cache/tiktoken/r50k_base.tiktoken

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

# The GPT-2 BPE file, obtained once so that everything after works offline.
.cache/tiktoken/r50k_base.tiktoken: | $(VENV)/.installed
	$(PY) tokenizer.py --fetch

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) tokenize_data.py --out data/demo

# Optional: Chromium for the web page's browser test (tests/test_serve.py skips it when absent). Debian/Ubuntu, as root.
chromium:
	apt-get update && apt-get install -y chromium

clean:
	rm -rf data checkpoints .pytest_cache
