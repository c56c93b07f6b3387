"""Files that are whole or absent: atomic writes and safe loading of model files.

Every output goes to a temporary name in its target folder and is renamed into place
(``os.replace`` is atomic on POSIX), so a process killed mid-write never leaves a truncated
file that a later stage or DVC would take as done. Model files are loaded with
``torch.load(weights_only=True)``: a file carrying pickled code is refused, never executed.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import numpy as np


_UMASK = os.umask(0)
os.umask(_UMASK)
# A write that fails with less than this free beside it failed for want of space, whatever the
# writer's message says (torch's zip writer: "unexpected pos", "N requested and M written").
_NEARLY_FULL_BYTES = 1 << 20


class NoSpaceError(OSError):
    """A write failed because the file system is full; the message names the folder."""

    def __init__(self, folder: Path) -> None:
        super().__init__(errno.ENOSPC, f"no space left on {folder}: free some space and re-run")

    def __str__(self) -> str:
        return self.strerror


def _out_of_space(error: BaseException, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


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
    except BaseException as error:
        full = isinstance(error, Exception) and _out_of_space(error, path.parent)  # before unlink
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full:
            raise NoSpaceError(path.parent) from error
        raise


# The key under which save_torch stores the SHA-256 of everything else in the file.
CHECKSUM_KEY = "sha256"


def content_digest(obj: Any) -> str:
    """SHA-256 of a nested structure of dicts, lists, tensors and plain values.

    Tensors count by dtype, shape and bytes, so the digest is the same wherever the tensor
    lives; a flipped bit anywhere in the weights changes it.
    """
    digest = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=str):
                digest.update(repr(key).encode() + b":")
                walk(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                walk(item)
            digest.update(b"]")
        elif isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor {flat.dtype} {tuple(value.shape)}:".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())

    walk(obj)
    return digest.hexdigest()


def save_torch(obj: dict[str, Any], path: Path | str) -> None:
    """torch.save of a dict with its checksum, atomically and byte-reproducibly.

    The file carries ``content_digest`` of its contents under CHECKSUM_KEY, checked by
    ``load_torch``: torch's zip reader does not verify its CRCs, so flipped bytes would load.
    Saving through a file object names the archive's records "archive/..." rather than after
    the (random) temporary file name, so equal contents give equal bytes.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        torch.save({**obj, CHECKSUM_KEY: content_digest(obj)}, file)


def save_json(obj: Any, path: Path | str) -> None:
    """Pretty JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_array(array: np.ndarray, path: Path | str) -> None:
    """A NumPy array as .npy (no pickles), atomically."""
    import numpy as np  # imported here, as in load_samples: the stages that save none skip it

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            np.save(file, array, allow_pickle=False)


def save_text(text: str, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class ModelFileError(ValueError):
    """A model, classifier or resume file that cannot be used; the message is one line."""


class UnsafeModelFileError(ModelFileError):
    """A model file that would need arbitrary unpickling to load."""


def load_torch(path: Path | str, map_location: torch.device | str = "cpu",
               expect: tuple[str, ...] = (), kind: str = "file") -> dict[str, Any]:
    """A file written by ``save_torch``, checked: tensors and plain containers only, never code
    (``weights_only=True``), and its checksum must match.

    Raises ``ModelFileError`` (one line naming the file) for a missing, empty, truncated,
    foreign or damaged file, or one without the top-level keys ``expect`` of a ``kind``
    (e.g. "model file"), and its subclass ``UnsafeModelFileError`` for pickled code.
    """
    if not Path(path).is_file():
        raise ModelFileError(f"{path}: no such file")
    if Path(path).stat().st_size == 0:
        raise ModelFileError(f"{path}: the file is empty")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError for a disallowed global
        message = str(error)
        if "weights_only" in message or "GLOBAL" in message:
            # "Unsupported global: GLOBAL os.system" or "... unsupported GLOBAL os.system whose ..."
            named = re.search(r"GLOBAL\s+([\w.]+)", message)
            found = named.group(1) if named else "an object"
            raise UnsafeModelFileError(
                f"{path}: refused to load: it holds {found}, a pickled object other than tensors "
                "and plain values (it may carry code); only weights files are allowed") from None
        first = message.strip().splitlines()[0].split(". ")[0] if message.strip() \
            else type(error).__name__
        raise ModelFileError(f"{path}: not a readable torch file, truncated or damaged "
                             f"({first})") from None
    if not isinstance(obj, dict) or CHECKSUM_KEY not in obj:
        raise ModelFileError(f"{path}: not a file written by this project (it has no checksum)")
    stored = obj.pop(CHECKSUM_KEY)
    if stored != content_digest(obj):
        raise ModelFileError(f"{path}: damaged: its contents do not match the checksum written "
                             "with them")
    missing = [key for key in expect if key not in obj]
    if missing:
        raise ModelFileError(f"{path}: not a {kind} (it lacks {', '.join(missing)})")
    return obj


class SamplesFileError(ValueError):
    """A samples file that is not the sample stage's uint8 (N, 28, 28) array; one line."""


NPY_MAGIC = b"\x93NUMPY"


def load_samples(path: Path | str, image_shape: tuple[int, int] = (28, 28)) -> np.ndarray:
    """Generated images written by the sample stage: a ``.npy`` file of uint8 (N, 28, 28).

    Anything else is refused rather than scored: float images in [0, 1] or [0, 255] give
    plausible-looking but wrong FIDs once converted. Pickled arrays are never loaded.
    """
    import numpy as np

    path = Path(path)
    try:
        with open(path, "rb") as file:
            magic = file.read(len(NPY_MAGIC))
    except OSError as error:
        raise SamplesFileError(f"{path}: cannot read it ({error.strerror})") from None
    if magic != NPY_MAGIC:
        raise SamplesFileError(f"{path}: not a NumPy .npy file")
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise SamplesFileError(f"{path}: not a plain NumPy array ({str(error).splitlines()[0]})") from None
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != image_shape \
            or images.shape[0] == 0:
        what = f"{images.dtype} {images.shape}"
        if images.dtype.kind == "f" and images.size and np.isnan(images).any():
            what += " holding NaN"
        raise SamplesFileError(f"{path}: expected uint8 images of shape (N, {image_shape[0]}, "
                               f"{image_shape[1]}) with N >= 1, got {what}")
    return images
