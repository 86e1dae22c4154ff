# llada-edge: `make run` (the main job on the embedded tiny checkpoint) and `make test`.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The tiny preset trained here (synth --preset tiny-trained: rebuilt in seconds from the patch committed under
# artifacts/, or trained, 10-20 minutes on 2 cores, when the code changed since; cached in build/cache, where the
# tests find it too); CHECKPOINT=build/tiny-ckpt is the same preset with random weights.
CHECKPOINT ?= build/tiny-trained
TARGET ?= onnxruntime
# The tensorrt targets need the dense MoE lowering: their own build folder, so the onnxruntime one keeps its graphs.
BUILD ?= build/engines-tiny$(if $(filter tensorrt%,$(TARGET)),-dense)
PRECISION ?= fp32
SM ?= sm89 sm120

.PHONY: install typings run engines bench test lint clean tiny-trained-patch check-tiny-trained-patch

install: $(VENV)/.installed

# torch is installed first and pinned: 2.13.0 is the CPU build on these machines' disk; any other
# version (or an open range pulled in by another package) downloads a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[torch,onnx,quant,rtx,serve,dev]"
	$(MAKE) --no-print-directory typings
	touch $@

# Type information for mypy (pyproject's mypy_path): stubgen's stubs of tensorrt_rtx's own pybind11 binding, the
# TensorRT API both flavours share, with the signatures of the installed version. (tensorrt-stubs 10.13 does not
# parse: parameters named `in`, a non-default parameter after defaults; and installed it leaves an importable
# empty `tensorrt` package.) One binding signature is not valid Python (add_scale_nd: a required parameter after
# defaults); it gets a default.
typings:
	rm -rf $(VENV)/typings
	$(VENV)/bin/stubgen --quiet -p tensorrt_rtx_bindings -o $(VENV)/typings
	sed -i 's/power: Weights = \.\.\., channel_axis: typing.SupportsInt)/power: Weights = ..., channel_axis: typing.SupportsInt = ...)/' \
		$(VENV)/typings/tensorrt_rtx_bindings/tensorrt_rtx.pyi
	mkdir -p $(VENV)/typings/tensorrt_rtx
	printf 'from tensorrt_rtx_bindings import *\nfrom tensorrt_rtx_bindings import __version__ as __version__\n' \
		> $(VENV)/typings/tensorrt_rtx/__init__.pyi

# Written atomically by `synth`: config.json exists only once the folder is complete.
build/tiny-ckpt/config.json: | install
	$(PY) -m llada_edge.cli synth --preset tiny --out build/tiny-ckpt --force

build/tiny-trained/config.json: | install
	$(PY) -m llada_edge.cli synth --preset tiny-trained --cache build/cache --out build/tiny-trained --force

# After a change to the code that decides the trained values (llada_edge/training, model, synthetic.py, layout.py:
# the fingerprint), write the new fingerprint's patch under artifacts/ (training it unless build/cache has it) and
# commit it; the patches of other fingerprints are removed. check-tiny-trained-patch trains afresh and compares:
# the image side must come out byte-identical, the training report's figures within 0.05 x max(1, |figure|)
# (stage timings left out).
tiny-trained-patch: install
	$(PY) -m llada_edge.training.cache make-patch --cache build/cache

check-tiny-trained-patch: install
	$(PY) -m llada_edge.training.cache check-patch

SYNTHETIC := $(filter build/tiny-ckpt build/tiny-trained,$(CHECKPOINT))

# The main job: text-to-image, then understanding and editing of the generated image, on the
# torch reference backend (images under build/run/).
run: install $(if $(SYNTHETIC),$(SYNTHETIC)/config.json)
	@mkdir -p build/run
	$(PY) -m llada_edge.cli run t2i --model $(CHECKPOINT) --prompt "a lighthouse on a cliff at dusk" \
		--height 256 --width 256 --out build/run/t2i.png
	$(PY) -m llada_edge.cli run understand --model $(CHECKPOINT) --image build/run/t2i.png \
		--prompt "What is in this picture?" --max-new-tokens 64
	$(PY) -m llada_edge.cli run edit --model $(CHECKPOINT) --image build/run/t2i.png \
		--prompt "make it night" --out build/run/edit.png

# Synthetic checkpoint -> ONNX export (validated against the reference) -> engines for TARGET/PRECISION.
# onnxruntime: quantized graphs with an accuracy report, then one t2i, one understanding and one edit request and a
# timing table. tensorrt-rtx: real TensorRT-RTX engines for the compute capabilities SM (no GPU needed to build;
# they run on RTX GPUs), each with an engine census; PRECISION fp16 | bf16 | fp8 | int4 | mixed | fp32.
# tensorrt: the same with full TensorRT (needs it installed and a GPU). Both then report the accuracy of the GPU
# graphs the engines were built from (on ONNX Runtime's CPU provider; bf16 has no CPU kernels there).
# Re-running skips every up-to-date step.
engines: install $(if $(SYNTHETIC),$(SYNTHETIC)/config.json)
	$(PY) -m llada_edge.cli export --checkpoint $(CHECKPOINT) --out $(BUILD) \
		--moe $(if $(filter tensorrt%,$(TARGET)),dense,ort)
	$(if $(filter onnxruntime,$(TARGET)),$(if $(filter-out fp32,$(PRECISION)),$(PY) -m llada_edge.cli build \
		--build $(BUILD) --target onnxruntime --precision $(PRECISION)),$(PY) -m llada_edge.cli build --build $(BUILD) \
		--target $(TARGET) --precision $(PRECISION) $(if $(filter tensorrt-rtx,$(TARGET)),--sm $(SM)))
	$(if $(filter onnxruntime,$(TARGET)),$(PY) -m llada_edge.cli demo --model $(BUILD) --precision $(PRECISION) \
		--out $(BUILD)/demo-$(PRECISION))
	$(if $(filter tensorrt%,$(TARGET)),$(if $(filter fp8 int4 mixed fp16,$(PRECISION)),$(PY) -m llada_edge.cli report \
		--build $(BUILD) --precision $(PRECISION) --graphs gpu))

# Latency vs the PyTorch eager reference and the memory roofline (tiny pipelines + real-dimension layers on
# this CPU): benchmarks/results/bench.{json,md,png}. About 10 minutes on 2 cores. FULL=BUILD adds the full-model
# section (benchmarks/full_model.py) on an existing real-size build, e.g. one from `llada-edge stream`
# (README, "The whole model on this CPU"), without rebuilding it; FULL_PRECISION picks its engines (default int4).
FULL ?=
FULL_PRECISION ?= int4
bench: install
	$(PY) benchmarks/bench.py --out benchmarks/results $(if $(FULL),--full $(FULL) --full-precision $(FULL_PRECISION))

# ruff, then mypy (files and strictness in pyproject.toml [tool.mypy]): zero errors or the target fails.
lint: install
	$(PY) -m ruff check llada_edge tests benchmarks
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q --durations=30

clean:
	rm -rf build .pytest_cache .ruff_cache
