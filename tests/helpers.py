"""Helpers the tests share: tiny params, synthetic MNIST files and scratch pipeline repos.

A scratch repo is a copy of the project's code, dvc.yaml and params.yaml in a temporary folder,
made a git + DVC repo, with tiny params so the whole pipeline runs in about a minute on a CPU.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import yaml

from diffusion.mnist import MNIST_FILES, encode_idx_images, encode_idx_labels

REPO = Path(__file__).resolve().parents[1]

# Small enough for a 2-core CPU, large enough that every metric has the samples it needs.
TINY_PARAMS = {
    "data": {"train_subset": 256},
    "ddpm": {"n_T": 10},
    "ddgm": {"n_T": 10},
    "train": {"epochs": 1, "batch_size": 64, "grid_every": 1, "grid_size": 4, "holdout_subset": 64},
    "sample": {"n_samples": 32, "steps": 10, "batch_size": 32},
    "evaluate": {"n_samples": 32, "psnr_t": [0.2, 0.5, 0.9], "batch_size": 32},
    "classifier": {"epochs": 1, "batch_size": 64, "train_subset": 8192},
    "sweep": {"steps": [2, 10], "n_samples": 16},
    "plot": {"n_digits": 2, "t_show": [0, 0.5, 1]},
}


def train_config(**overrides):
    """A ``TrainConfig`` of params.yaml's train section, seed and data scale (precision auto),
    with ``overrides``."""
    from diffusion.training import TrainConfig

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return TrainConfig(**{**params["train"], "seed": params["seed"], "precision": "auto",
                          "data_scale": params["data"]["scale"], **overrides})


def merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_synthetic_mnist(raw_dir: Path, n_train: int = 512, n_test: int = 128) -> None:
    """Random-pixel IDX files with the real names (not the real MD5s): for stages past download."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = list(MNIST_FILES)
    for (images_name, labels_name), n in (((names[0], names[1]), n_train), ((names[2], names[3]), n_test)):
        (raw_dir / images_name).write_bytes(encode_idx_images(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        (raw_dir / labels_name).write_bytes(encode_idx_labels(rng.integers(0, 10, n, dtype=np.uint8)))


def make_scratch_repo(root: Path, params: dict | None = None, mnist_dir: Path | None = None,
                      git: bool = True) -> Path:
    """Copy the pipeline into ``root`` with TINY_PARAMS merged with ``params``.

    ``mnist_dir`` holds real MNIST files to place in data/MNIST/raw; None writes synthetic ones.
    """
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("diffusion", "pipeline", "stages"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    values = merge(yaml.safe_load((REPO / "params.yaml").read_text()), merge(TINY_PARAMS, params or {}))
    (root / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    raw = root / "data" / "MNIST" / "raw"
    if mnist_dir is not None:
        raw.mkdir(parents=True)
        for name in MNIST_FILES:
            shutil.copy(mnist_dir / name, raw / name)
    else:
        write_synthetic_mnist(raw)
    if git:
        init_git_and_dvc(root)
    return root


def init_git_and_dvc(root: Path) -> None:
    """Make ``root`` a git + DVC repo (analytics off) and commit everything but data/."""
    run = lambda *cmd: subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True)
    run("git", "init", "-q", "-b", "main")
    run("git", "config", "user.email", "tests@example.com")
    run("git", "config", "user.name", "tests")
    run("dvc", "init", "-q")
    run("dvc", "config", "core.analytics", "false")
    run("git", "add", "-A", ":!data")
    run("git", "commit", "-q", "-m", "scratch pipeline")


def stage_env() -> dict[str, str]:
    """Environment for running stages in a scratch repo: its own MLflow store, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1")
    return env
