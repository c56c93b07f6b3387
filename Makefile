# The commands of a fresh machine: `make repro` (set up, run the pipeline with params.yaml),
# `make quick` (set up, run the CPU-sized experiment of quick.yaml), `make cpu-hour` (the longer
# CPU experiment of cpu-hour.yaml) and `make test` (set up, run the tests). `make install` alone
# sets up.
PYTHON ?= python3
# torch 2.14.1 with torchvision 0.29.1 is the pair this project is tested with; on machines
# that already have a working torch (Colab), `make install TORCH=` skips it.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install repro quick cpu-hour test

install:
	$(if $(TORCH),$(PYTHON) -m pip install -q $(TORCH))
	$(PYTHON) -m pip install -q -e ".[test]"

# Without a GPU, tools.estimate first says how long the run will take here (Ctrl-C to stop).
repro: install
	$(PYTHON) -m tools.estimate
	dvc repro

quick: install
	$(PYTHON) -m tools.quick quick.yaml

cpu-hour: install
	$(PYTHON) -m tools.quick cpu-hour.yaml

# The suite in TEST_WORKERS processes (pytest-xdist), one test file per process at a time, so
# that a file's module-wide fixtures (a tiny pipeline run, an MLflow server) are built once.
TEST_WORKERS ?= 2
test: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
