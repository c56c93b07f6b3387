"""DVC stage ``download``: make sure data/MNIST/raw holds the four verified MNIST IDX files.

Run from the repository root as ``python -m stages.download``. Reads the param
``data.local_dir`` ("" = no local folder; a relative path is relative to the
repository root) and calls :func:`diffusion.mnist.fetch_mnist`. If no source
can provide the files it prints ``error: <one line>`` to stderr and exits 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

from diffusion.mnist import MNIST_FILES, MnistUnavailableError, fetch_mnist
from stages.common import stage_main
from stages.params import ParamsError, load_params

RAW_DIR = Path("data") / "MNIST" / "raw"


@stage_main
def main() -> None:
    try:
        params = load_params("download")
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    local = params["data"]["local_dir"].strip()
    local_dir = Path(local).expanduser() if local else None
    try:
        fetch_mnist(RAW_DIR, local_dir=local_dir)
    except MnistUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"download: {RAW_DIR}: all {len(MNIST_FILES)} MNIST IDX files present, MD5 verified")


if __name__ == "__main__":
    main()
