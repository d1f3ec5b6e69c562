# `make demo`: set up .venv and run the quickstart (embedded Ray, CPU, local MLflow).
# `make test`: set up .venv, check the layout (ruff, import-linter: launcher -> cluster -> trainer -> admm)
#              and run the test suite on TEST_WORKERS processes (pytest-xdist; each file stays on one, the
#              cluster tests share one cluster; TEST_WORKERS=0 runs them in this process). `make lint` runs the two checks alone.
# `make gpu-bundle`: build .gpu-bundle/, what a bare GPU machine needs to run `python -m bench.gpu_suite`
#              (wheels, data, setup.sh; bench/README.md "GPU" has the command that carries it).
# The packed CIFAR-10 files are looked up in $TDC_DATA_ROOT, by default ../shared/data/cifar10.
VENV ?= .venv
PY := $(VENV)/bin/python
TDC_DATA_ROOT ?= $(abspath ../shared/data/cifar10)
export TDC_DATA_ROOT
# Three: most tests wait much of their time (process and Ray start-ups, polling a job), so three keep 2 CPUs busy
# (measured on 2 AMD EPYC cores beside a training run: 3 processes 13m59s, 4 processes 14m38s).
TEST_WORKERS ?= 3
# DeepSpeed picks its CPU accelerator when no GPU is present; saying so silences its probe warning.
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: setup demo lint test clean gpu-bundle

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/tdcompress run configs/quickstart.yaml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

gpu-bundle: setup
	$(PY) -m bench.gpu_bundle --out .gpu-bundle

clean:
	rm -rf runs mlruns.db mlruns-artifacts .pytest_cache
