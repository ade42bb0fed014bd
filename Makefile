# Two commands: `make demo` and `make test`. Each creates .venv when missing and installs
# the project into it. Without a GPU, torch is the CPU wheel (torch==2.13.0); with one, the
# CUDA build. Override with `make test TORCH_SPEC='torch==X'` (and PIP_EXTRA='--index-url ...').
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.privdistill-installed
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch>=2.6,<2.15
DEMO_NAME ?= demo

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then spec='$(TORCH_SPEC)'; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then spec='$(TORCH_GPU)'; \
	else spec='$(TORCH_CPU)'; fi; \
	echo "installing $$spec"; $(PY) -m pip install --quiet $(PIP_EXTRA) "$$spec"
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/privdistill demo --name $(DEMO_NAME)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
