# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= engines/tiny-model
ENGINES ?= engines/tiny
OUTDIR ?= engines/out

.PHONY: install demo test gpu-test capi clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: the CPU wheel lies on local disk; an unpinned torch pulls CUDA wheels.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[export,test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/sdrt make-model $(MODEL) --arch tiny --seed 0 --force
	$(BIN)/sdrt export --model $(MODEL) --out $(ENGINES) --min-size 64 --max-size 512 --max-batch 2 --force
	$(BIN)/sdrt build-engines --model $(MODEL) --out $(ENGINES) --backend ort-cpu
	$(BIN)/sdrt txt2img --engines $(ENGINES) --prompt "a photo of a cat" --steps 20 --seed 42 \
		--width 256 --height 256 --out $(OUTDIR)/cat.png
	@echo '$(OUTDIR)/cat.png shows noise, by design: the tiny model has random weights; for a real picture run the same on a diffusers folder: sdrt export --model PATH --out engines/mine, then sdrt txt2img --engines engines/mine --prompt "a photo of a cat" --out cat.png (sdrt info engines/mine says what was built).'

# Runs every test; the gpu-marked ones skip without an NVIDIA GPU, CUDA and tensorrt/tensorrt_rtx.
test: install
	$(BIN)/python -m pytest -q

gpu-test: install
	$(BIN)/python -m pytest -m gpu -q

# libsdrt, the C ABI (capi/sdrt.h): build/capi/libsdrt.so, sdrt.pc and the examples/c/txt2img example
capi: install
	$(BIN)/python capi/build.py build/capi

clean:
	rm -rf $(VENV) engines/tiny engines/tiny-model engines/out build
