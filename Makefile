# Two commands do all the set-up on a fresh machine:
#   make demo         install into .venv, then run `replay demo` (the main job)
#   make test         install into .venv, then run the test suite
# Ray (the `ray` extra: `replay experiment --ray`) is installed too, so that its tests run (about 15 s).
# The extension is built against the torch installed first (CPU build 2.13.0 by default;
# TORCH_SPEC=torch==2.14.1 gives a CUDA build, and then the CUDA kernels are built too).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

.PHONY: install demo quickstart test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet numpy scipy matplotlib safetensors tqdm scikit-learn pytest pytest-benchmark ninja wheel "setuptools>=64" "ray>=2.40"
	$(PY) -m pip install --quiet --no-build-isolation -e .
	touch $@

demo: install
	$(VENV)/bin/replay demo

quickstart: install
	$(PY) examples/quickstart.py

test: install
	$(PY) -m pytest -q

# The benchmarks (pytest-benchmark, candidates interleaved; minutes: the recording-overhead
# rounds are whole training runs), then the README's tables from their JSON. `make test` runs them once at tiny sizes (the smoke mode, benches/conftest.py).
bench: install
	$(PY) -m pytest benches/ --benchmark-only --benchmark-json=benches/results.json
	$(PY) benches/tables.py benches/results.json

clean:
	rm -rf build replay/_C*.so *.egg-info
