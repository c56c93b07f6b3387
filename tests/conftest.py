"""Fixtures shared by the tests: the real MNIST files (fetched once per session) and the feature
classifier trained on them. Helpers live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from diffusion.mnist import verify_mnist
from pipeline.mnist_sources import fetch_mnist
from tests.helpers import REPO


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
