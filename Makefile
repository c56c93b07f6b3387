# The two commands of a fresh machine: `make repro` (set up, run the pipeline) and
# `make test` (set up, run the tests). `make install` alone sets up.
PYTHON ?= python3
# torch 2.14.1 with torchvision 0.29.1 is the pair this project is tested with; on machines
# that already have a working torch (Colab), `make install TORCH=` skips it.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install repro test

install:
	$(if $(TORCH),$(PYTHON) -m pip install -q $(TORCH))
	$(PYTHON) -m pip install -q -e ".[test]"

repro: install
	dvc repro

test: install
	$(PYTHON) -m pytest -q
