# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= engines/tiny-model
ENGINES ?= engines/tiny
OUTDIR ?= engines/out

.PHONY: install demo test gpu-test gpu-wheels capi clean

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

# The gpu-marked tests. GPU_PY (default python3), when it has torch with CUDA, runs them as it is: no venv,
# no install, no network, so its own CUDA torch, cupy and onnxruntime(-gpu) are what is tested; the checkout
# goes on its path (build/gpu-path maps sdrt_export to export/). Not a venv with --system-site-packages: one
# made from a python that is itself a venv does not see that venv's packages. What it lacks of the tests'
# packages is listed first (install those into it, or put them on PYTHONPATH). Without a torch with CUDA,
# .venv (CPU torch) runs them and they skip, saying why.
GPU_PY ?= python3
GPU_NEEDS := pytest numpy PIL tokenizers tqdm onnxruntime diffusers transformers onnx onnxscript polygraphy \
	onnx_graphsurgeon safetensors scipy array_api_strict cupy
define GPU_REPORT
import importlib.util as u, sys
import torch
line = [sys.executable, f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}"]
if u.find_spec("onnxruntime"):
    import onnxruntime as o
    line.append(f"onnxruntime {o.__version__} ({', '.join(o.get_available_providers())})")
line += [f"{n}: {'yes' if u.find_spec(n) else 'no'}" for n in ("cupy", "tensorrt", "tensorrt_rtx")]
print("gpu-test:", " | ".join(line))
missing = [n for n in sys.argv[1:] if u.find_spec(n) is None]
if missing:
    print("gpu-test: this python lacks", ", ".join(missing), "(tests that need them fail or skip)")
endef
export GPU_REPORT

gpu-test:
	@if $(GPU_PY) -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then \
		mkdir -p build/gpu-path && ln -sfn "$(CURDIR)/export" build/gpu-path/sdrt_export && \
		{ [ ! -d build/gpu-wheels ] || $(GPU_PY) scripts/gpu_site.py unpack build/gpu-wheels build/gpu-site; } && \
		export PYTHONPATH="$(CURDIR):$(CURDIR)/build/gpu-path$${PYTHONPATH:+:$$PYTHONPATH}:$(CURDIR)/build/gpu-site" && \
		$(GPU_PY) -c "$$GPU_REPORT" $(GPU_NEEDS) && $(GPU_PY) -m pytest -m gpu -q -rs; \
	else \
		echo "gpu-test: $(GPU_PY) has no torch with CUDA; running in $(VENV), where the GPU tests skip"; \
		$(MAKE) --no-print-directory install && $(BIN)/python -m pytest -m gpu -q -rs; \
	fi

# For a GPU box without internet: the pure-Python test packages it may lack, as wheels; carry build/gpu-wheels
# there and `make gpu-test` unpacks those it lacks into build/gpu-site (scripts/gpu_site.py).
gpu-wheels: install
	$(BIN)/python scripts/gpu_site.py download build/gpu-wheels

# libsdrt, the C ABI (capi/sdrt.h): build/capi/libsdrt.so, sdrt.pc and the examples/c/txt2img example
capi: install
	$(BIN)/python capi/build.py build/capi

clean:
	rm -rf $(VENV) engines/tiny engines/tiny-model engines/out build
