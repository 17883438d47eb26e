# The README's commands. `make setup` builds .venv on a fresh machine; `make test`
# and `make demo` build it first when it is missing or out of date.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser test demo clean-venv

setup: $(STAMP) browser

# Debian's Chromium for the web page's browser tests (Playwright drives it; it downloads
# no browser of its own).
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

$(STAMP): pyproject.toml constraints.txt scripts/deps.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: on this kind of machine pip takes the CPU build lying on disk.
	$(PIP) install -q -c constraints.txt torch
	# everything else from pyproject.toml, except insightface and invisible-watermark ...
	$(PY) scripts/deps.py --exclude insightface --exclude invisible-watermark > $(VENV)/requirements.txt
	$(PIP) install -q -c constraints.txt -r $(VENV)/requirements.txt
	# ... which come last, without their dependencies (they would replace
	# onnxruntime-gpu and opencv-python-headless with their CPU/GUI twins).
	$(PIP) install -q -c constraints.txt --no-deps insightface invisible-watermark
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP) browser
	$(PY) -m pytest -n 2 --dist loadgroup

demo: $(STAMP)
	$(PY) scripts/demo.py

clean-venv:
	rm -rf $(VENV)
