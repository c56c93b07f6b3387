"""Fixtures shared by the tests: the real MNIST files (fetched once per session) and the feature
classifier trained on them, and one share of the CPU per pytest-xdist worker. Helpers live in
tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from diffusion.mnist import verify_mnist
from pipeline.mnist_sources import fetch_mnist
from tests.helpers import REPO


def pytest_configure(config: pytest.Config) -> None:
    """Under ``pytest -n N`` give each worker's torch 1/N of the cores: OpenMP threads beyond the
    cores wait on each other at every parallel region, which slows both workers far more than
    sharing does. Subprocesses of the tests inherit the count through OMP_NUM_THREADS."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


@pytest.fixture(scope="session")
def trained_classifier(mnist_raw_dir: Path):
    """The feature classifier trained once per session with the default params on all of MNIST."""
    import torch

    from diffusion.classifier import train_classifier
    from diffusion.mnist import load_mnist

    defaults = yaml.safe_load((REPO / "params.yaml").read_text())
    images, labels = load_mnist(mnist_raw_dir, train=True)
    return train_classifier(images, labels, epochs=defaults["classifier"]["epochs"],
                            batch_size=defaults["classifier"]["batch_size"],
                            lr=defaults["classifier"]["lr"], seed=defaults["seed"],
                            device=torch.device("cpu"))


@pytest.fixture(scope="session")
def mnist_raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the four verified MNIST IDX files: the repo's own copy, or fetched once."""
    for candidate in (os.environ.get("MNIST_CACHE"), REPO / "data" / "MNIST" / "raw"):
        if candidate and Path(candidate).is_dir() and not verify_mnist(Path(candidate)):
            return Path(candidate)
    raw = tmp_path_factory.mktemp("mnist") / "MNIST" / "raw"
    fetch_mnist(raw, log=lambda message: None)
    return raw
