# llada-edge: `make run` (the main job on the embedded tiny checkpoint) and `make test`.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CHECKPOINT ?= build/tiny-ckpt

.PHONY: install run test lint clean

install: $(VENV)/.installed

# torch is installed first and pinned: 2.13.0 is the CPU build on these machines' disk; any other
# version (or an open range pulled in by another package) downloads a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[torch,onnx,dev]"
	touch $@

# Written atomically by `synth`: config.json exists only once the folder is complete.
build/tiny-ckpt/config.json: | install
	$(PY) -m llada_edge.cli synth --preset tiny --out build/tiny-ckpt --force

run: install $(if $(filter build/tiny-ckpt,$(CHECKPOINT)),build/tiny-ckpt/config.json)
	$(PY) -m llada_edge.cli reference --model $(CHECKPOINT)

lint: install
	$(PY) -m ruff check llada_edge tests benchmarks

test: lint
	$(PY) -m pytest -q --durations=8

clean:
	rm -rf build .pytest_cache .ruff_cache
