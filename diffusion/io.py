"""Files that are whole or absent: atomic writes and safe loading of model files.

Every output goes to a temporary name in its target folder and is renamed into place
(``os.replace`` is atomic on POSIX), so a process killed mid-write never leaves a truncated
file that a later stage or DVC would take as done. Model files are loaded with
``torch.load(weights_only=True)``: a file carrying pickled code is refused, never executed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_torch(obj: Any, path: Path | str) -> None:
    """torch.save, atomically and byte-reproducibly.

    Saving through a file object names the archive's records "archive/..." rather than after
    the (random) temporary file name, so equal contents give equal bytes.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        torch.save(obj, file)


def save_json(obj: Any, path: Path | str) -> None:
    """Pretty JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_text(text: str, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class UnsafeModelFileError(ValueError):
    """A model file that would need arbitrary unpickling to load."""


def load_torch(path: Path | str, map_location: torch.device | str = "cpu") -> Any:
    """torch.load with ``weights_only=True``: tensors and plain containers only, never code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError for a disallowed global
        message = str(error)
        if "weights_only" in message or "Unsupported global" in message:
            found = next((line.split("GLOBAL", 1)[1].split()[0] for line in message.splitlines()
                          if "Unsupported global: GLOBAL" in line), "an object")
            raise UnsafeModelFileError(
                f"{path}: refused to load: it holds {found}, a pickled object other than tensors "
                "and plain values (it may carry code); only weights files are allowed") from None
        raise
