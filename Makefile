# llada-edge: `make run` (the main job on the embedded tiny checkpoint) and `make test`.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CHECKPOINT ?= build/tiny-ckpt
BUILD ?= build/engines-tiny
TARGET ?= onnxruntime
PRECISION ?= fp32

.PHONY: install run engines bench test lint clean

install: $(VENV)/.installed

# torch is installed first and pinned: 2.13.0 is the CPU build on these machines' disk; any other
# version (or an open range pulled in by another package) downloads a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[torch,onnx,quant,dev]"
	touch $@

# Written atomically by `synth`: config.json exists only once the folder is complete.
build/tiny-ckpt/config.json: | install
	$(PY) -m llada_edge.cli synth --preset tiny --out build/tiny-ckpt --force

# The main job: text-to-image, then understanding and editing of the generated image, on the
# torch reference backend (images under build/run/).
run: install $(if $(filter build/tiny-ckpt,$(CHECKPOINT)),build/tiny-ckpt/config.json)
	@mkdir -p build/run
	$(PY) -m llada_edge.cli run t2i --model $(CHECKPOINT) --prompt "a lighthouse on a cliff at dusk" \
		--height 256 --width 256 --out build/run/t2i.png
	$(PY) -m llada_edge.cli run understand --model $(CHECKPOINT) --image build/run/t2i.png \
		--prompt "What is in this picture?" --max-new-tokens 64
	$(PY) -m llada_edge.cli run edit --model $(CHECKPOINT) --image build/run/t2i.png \
		--prompt "make it night" --out build/run/edit.png

# Synthetic checkpoint -> ONNX export (validated against the reference) -> engines for TARGET/PRECISION
# (with an accuracy report) -> one t2i, one understanding and one edit request on ONNX Runtime -> timing
# table. TARGET=tensorrt exports the dense MoE lowering and needs TensorRT + a GPU. Re-running skips every
# up-to-date step.
engines: install $(if $(filter build/tiny-ckpt,$(CHECKPOINT)),build/tiny-ckpt/config.json)
	$(PY) -m llada_edge.cli export --checkpoint $(CHECKPOINT) --out $(BUILD) \
		--moe $(if $(filter tensorrt,$(TARGET)),dense,ort)
	$(if $(filter fp32,$(PRECISION)),$(if $(filter tensorrt,$(TARGET)),$(PY) -m llada_edge.cli build --build $(BUILD) \
		--target $(TARGET) --precision $(PRECISION)),$(PY) -m llada_edge.cli build --build $(BUILD) --target $(TARGET) \
		--precision $(PRECISION))
	$(if $(filter onnxruntime,$(TARGET)),$(PY) -m llada_edge.cli demo --model $(BUILD) --precision $(PRECISION) \
		--out $(BUILD)/demo-$(PRECISION))

# Latency vs the PyTorch eager reference and the memory roofline (tiny pipelines + real-dimension layers on
# this CPU): benchmarks/results/bench.{json,md,png}. About 10 minutes on 2 cores.
bench: install
	$(PY) benchmarks/bench.py --out benchmarks/results

# ruff, then mypy (files and strictness in pyproject.toml [tool.mypy]): zero errors or the target fails.
lint: install
	$(PY) -m ruff check llada_edge tests benchmarks
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q --durations=8

clean:
	rm -rf build .pytest_cache .ruff_cache
