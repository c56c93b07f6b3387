"""What several stages share: the stage's model argument, paths, data on the device, progress."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from diffusion.io import ModelFileError, SamplesFileError, load_samples
from diffusion.mnist import (
    N_TEST,
    N_TRAIN,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    load_mnist,
    md5_file,
    random_subset,
)
from pipeline.paths import RAW_DIR
from pipeline.tracking import Run, TrackingUnavailableError, finish_open_runs

Loaded = TypeVar("Loaded")


def model_argument(stage: str) -> str:
    """Parse the one positional argument of a per-model stage: a name of params.yaml's
    ``models`` (checked when the stage loads its params: dvc.yaml declares its section)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}")
    parser.add_argument("model", help="which model's branch of the pipeline (params.yaml: models)")
    return parser.parse_args().model


def open_run(stage: str, model: str | None = None, **kwargs) -> Run:
    """The stage's MLflow run (``pipeline.tracking.Run``; ``parent_model_file``, ``run_id``), or
    one line and exit 1 when the store cannot be opened."""
    try:
        return Run(stage, model, **kwargs)
    except TrackingUnavailableError as error:
        fail(str(error))


def log_mnist(run: Run, train: bool, used: int, context: str, how: str = "the first") -> None:
    """MNIST's training or test set as an input of ``run`` (its "Datasets"): the digest is the
    MD5 of its two IDX files, and a tag says how many images were used (``how``: "the first"
    or "random")."""
    names, total = ((TRAIN_IMAGES, TRAIN_LABELS), N_TRAIN) if train else ((TEST_IMAGES, TEST_LABELS), N_TEST)
    digest = hashlib.md5("".join(md5_file(RAW_DIR / name) for name in names).encode()).hexdigest()
    used = min(used or total, total)
    run.log_dataset(f"MNIST {'train' if train else 'test'}", digest, RAW_DIR, context,
                    tags={"images": f"all {total}" if used == total else f"{how} {used} of {total}"})


class Silent:
    """Stands in for the MLflow run and the progress bar on ranks other than 0: does nothing."""

    run_id = experiment_id = None

    def log_params(self, *args, **kwargs) -> None:
        pass

    log_metrics = log_artifact = log_image = finish = epoch_done = close = log_params

    @contextlib.contextmanager
    def system_metrics(self, resume: bool = False) -> Iterator[None]:
        yield


def mlflow_scores(scores: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Sample scores under their MLflow names: ``precision`` and ``recall`` of the samples are
    ``sample_precision`` and ``sample_recall`` there, as ``precision`` is also a param."""
    renamed = {"precision": "sample_precision", "recall": "sample_recall"}
    return {prefix + renamed.get(key, key): value for key, value in scores.items()}


def warn(message: str) -> None:
    """``warning: <message>`` on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_or_exit(loader: Callable[..., Loaded], path: Path, *args, **kwargs) -> Loaded:
    """``loader(path, ...)`` for a model or classifier file; a file that is missing, damaged,
    foreign or carries pickled code (``ModelFileError``) ends the stage with one line."""
    try:
        return loader(path, *args, **kwargs)
    except ModelFileError as error:
        writer = "classifier" if path.parent.name == "classifier" else f"train@{path.parent.name}"
        fail(f"{error}; it is not used: re-create it with `dvc repro --force {writer}`")


def samples_or_exit(path: Path) -> np.ndarray:
    """The sample stage's images (uint8 (N, 28, 28)), or one line and exit 1 for anything else."""
    try:
        return load_samples(path)
    except SamplesFileError as error:
        fail(f"{error}; re-create it with `dvc repro --force sample@{path.parent.name}`")


def stage_main(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a stage's ``main``: a stage that fails leaves no MLflow run RUNNING (FAILED, or
    KILLED on Ctrl-C), and a full disk is said in one line, not a traceback."""
    @functools.wraps(main)
    def wrapper() -> None:
        try:
            main()
        except KeyboardInterrupt:
            finish_open_runs("KILLED")
            raise
        except SystemExit as exit_:
            if exit_.code not in (None, 0):
                finish_open_runs("KILLED" if exit_.code == 130 else "FAILED")
            raise
        except OSError as error:
            finish_open_runs("FAILED")
            if error.errno == errno.ENOSPC:
                fail(str(error))
            raise
        except BaseException:
            finish_open_runs("FAILED")
            raise
    return wrapper


def fail(message: str, status: int = 1) -> None:
    """One line on stderr, non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def mnist_on(device: torch.device, train: bool, subset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images (uint8) and labels on ``device``; ``subset`` > 0 keeps the first N."""
    images, labels = load_mnist(RAW_DIR, train=train)
    if subset:
        images, labels = images[:subset], labels[:subset]
    return images.to(device), labels.to(device)


def mnist_reference(device: torch.device, train: bool, n: int, seed: int) -> torch.Tensor:
    """``n`` MNIST images (uint8, on ``device``) drawn at random (``diffusion.mnist.random_subset``)."""
    return random_subset(load_mnist(RAW_DIR, train=train)[0], n, seed).to(device)


class EpochProgress:
    """A tqdm bar on a terminal; one line per epoch (loss, images/s, time left) otherwise."""

    def __init__(self, total_epochs: int, first_epoch: int, label: str) -> None:
        self.total, self.label = total_epochs, label
        self.started, self.first = time.perf_counter(), first_epoch
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_epochs, initial=first_epoch, desc=label, unit="epoch")

    def epoch_done(self, epoch: int, train_loss: float, heldout_loss: float,
                   images_per_s: float) -> None:
        elapsed = time.perf_counter() - self.started
        left = elapsed / max(epoch - self.first, 1) * (self.total - epoch)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{train_loss:.4f}", heldout=f"{heldout_loss:.4f}",
                                 img_s=f"{images_per_s:.0f}")
            self.bar.update(1)
        else:
            print(f"{self.label} epoch {epoch}/{self.total}  loss {train_loss:.4f}  "
                  f"held-out {heldout_loss:.4f}  {images_per_s:.0f} img/s  "
                  f"time left {left / 60:.1f} min", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
