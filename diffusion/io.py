"""Files that are whole or absent: atomic writes and safe loading of model files.

Every output goes to a temporary name in its target folder and is renamed into place
(``os.replace`` is atomic on POSIX), so a process killed mid-write never leaves a truncated
file that a later stage or DVC would take as done. Model files are loaded with
``torch.load(weights_only=True)``: a file carrying pickled code is refused, never executed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Temporary files of ``path`` left by an earlier writer that was killed (SIGKILL skips the
    cleanup below) are removed first, so they never end up in a DVC output folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get a normal file's mode
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
        if "weights_only" in message or "GLOBAL" in message:
            # "Unsupported global: GLOBAL os.system" or "... unsupported GLOBAL os.system whose ..."
            named = re.search(r"GLOBAL\s+([\w.]+)", message)
            found = named.group(1) if named else "an object"
            raise UnsafeModelFileError(
                f"{path}: refused to load: it holds {found}, a pickled object other than tensors "
                "and plain values (it may carry code); only weights files are allowed") from None
        raise
