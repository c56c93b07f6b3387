"""MNIST as the core reads it: the four IDX files, their checksums, and loading them.

The pipeline reads MNIST from ``data/MNIST/raw`` (the folder that
``torchvision.datasets.MNIST(root="data", download=False)`` reads): the four official
uncompressed IDX files, which ``verify_mnist`` checks against their MD5s. Fetching them is the
download stage's business (``pipeline/mnist_sources.py``).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import torch

# --------------------------------------------------------------------------
# The facts: file names and MD5s of the official uncompressed IDX files.
# --------------------------------------------------------------------------

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"

#: Uncompressed IDX file name -> MD5 of the official file.
MNIST_FILES: dict[str, str] = {
    TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
    TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
    TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
    TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
}

IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension
ROWS = COLS = 28
N_TRAIN = 60000
N_TEST = 10000


class MnistFormatError(ValueError):
    """An IDX file (or a rebuilt data set) does not have the expected layout."""


def md5_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """MD5 hex digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------
# Verification and loading
# --------------------------------------------------------------------------


def verify_mnist(raw_dir: Path) -> list[str]:
    """Names of the four IDX files in ``raw_dir`` that are missing or fail their MD5.

    An empty list means all four files are present and correct.
    """
    raw_dir = Path(raw_dir)
    bad: list[str] = []
    for name, expected in MNIST_FILES.items():
        path = raw_dir / name
        if not path.is_file() or md5_file(path) != expected:
            bad.append(name)
    return bad


def _read_idx(path: Path, magic: int, dims: tuple[int, ...]) -> np.ndarray:
    """Read one IDX file, checking its magic number, shape and size."""
    ndim = len(dims) + 1
    header_size = 4 * (1 + ndim)
    with open(path, "rb") as handle:
        header = handle.read(header_size)
        if len(header) != header_size:
            raise MnistFormatError(f"{path}: file too short for an IDX header")
        found_magic, *shape = struct.unpack(f">I{ndim}I", header)
        if found_magic != magic:
            raise MnistFormatError(
                f"{path}: bad IDX magic number 0x{found_magic:08x}, "
                f"expected 0x{magic:08x}"
            )
        if tuple(shape[1:]) != dims:
            raise MnistFormatError(
                f"{path}: item shape {tuple(shape[1:])}, expected {dims}"
            )
        count = int(np.prod(shape))
        data = np.fromfile(handle, dtype=np.uint8, count=count + 1)
    if data.size != count:
        raise MnistFormatError(
            f"{path}: {data.size} data bytes, header says {count}"
        )
    return data.reshape(shape)


def load_mnist(raw_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST images and labels from the IDX files in ``raw_dir``.

    Returns ``(images, labels)``: a uint8 tensor of shape (N, 28, 28) and an
    int64 tensor of shape (N,), with N = 60000 for ``train=True`` and 10000
    otherwise. Raises :class:`MnistFormatError` for a malformed file.
    """
    raw_dir = Path(raw_dir)
    image_name, label_name = (
        (TRAIN_IMAGES, TRAIN_LABELS) if train else (TEST_IMAGES, TEST_LABELS)
    )
    images = _read_idx(raw_dir / image_name, IMAGE_MAGIC, (ROWS, COLS))
    labels = _read_idx(raw_dir / label_name, LABEL_MAGIC, ())
    if images.shape[0] != labels.shape[0]:
        raise MnistFormatError(
            f"{raw_dir}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def random_subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` of ``images`` drawn at random without replacement, in an order fixed by ``seed``
    (all of them, in file order, when ``n`` is not smaller).

    Metrics compare samples against a random subset rather than the first N: the MNIST files
    are not shuffled (the first 5000 test digits come from other writers than the last 5000),
    so a leading slice is a biased reference.
    """
    if n >= images.shape[0]:
        return images
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[order[:n]]


# --------------------------------------------------------------------------
# IDX encoding (used to rebuild the files from the package mirror)
# --------------------------------------------------------------------------


def encode_idx_images(images: np.ndarray) -> bytes:
    """IDX bytes (magic 0x00000803, N, 28, 28, then pixels) for uint8 images (N, 28, 28)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (ROWS, COLS):
        raise MnistFormatError(
            f"images must be uint8 (N, {ROWS}, {COLS}), got {images.dtype} {images.shape}"
        )
    header = struct.pack(">IIII", IMAGE_MAGIC, images.shape[0], ROWS, COLS)
    return header + np.ascontiguousarray(images).tobytes()


def encode_idx_labels(labels: np.ndarray) -> bytes:
    """IDX bytes (magic 0x00000801, N, then labels) for integer labels 0..255 of shape (N,)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise MnistFormatError(f"labels must be 1-D integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise MnistFormatError("labels must lie in 0..255")
    header = struct.pack(">II", LABEL_MAGIC, labels.shape[0])
    return header + labels.astype(np.uint8).tobytes()
